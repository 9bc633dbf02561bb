"""Models shared by hf_tome load merged in plain transformers: ``trust_remote_code=True`` runs the saved
``modeling_hf_tome.py``, which imports no hf_tome, with the same outputs as hf_tome.

The loads run in a subprocess where ``sys.modules["hf_tome"] = None`` makes every hf_tome import fail: only torch and
transformers are left. These are ``compat`` tests, so .ci/run runs them again in its second environment (the oldest
transformers of the range, no extras). Module level imports only torch, transformers and pytest.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model

pytestmark = pytest.mark.compat

REMOTE_LOADS = r"""
import json, sys, warnings
sys.modules["hf_tome"] = None  # any import of hf_tome fails: torch and transformers only
import torch, transformers
from transformers.utils import logging

logging.enable_propagation()
records = []
import logging as std_logging
class Keep(std_logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
std_logging.getLogger("transformers").addHandler(Keep())

cases = json.loads(sys.argv[1])
out = {}
try:
    import hf_tome  # noqa
    out["hf_tome_importable"] = True
except ImportError:
    out["hf_tome_importable"] = False
Auto = transformers.AutoModelForImageClassification
for name, case in cases.items():
    data = torch.load(case["data"])
    result = {}
    records.clear()
    model = Auto.from_pretrained(case["folder"], trust_remote_code=True).eval()
    with torch.no_grad():
        result["diff"] = (model(pixel_values=data["pixels"]).logits - data["hf_tome"]).abs().max().item()
    result["class"] = type(model).__name__
    result["module"] = type(model).__module__
    result["tokens_in"] = model.tome_compute().tokens_in
    result["saved_tome"] = getattr(model.config, "tome", None)
    if case.get("override"):
        override = Auto.from_pretrained(case["folder"], trust_remote_code=True, **case["override"]).eval()
        with torch.no_grad():
            logits = override(pixel_values=data["pixels"]).logits
        result["override_diff"] = (logits - data["hf_tome_override"]).abs().max().item()
        result["override_tome"] = override.config.tome
    base = transformers.AutoModel.from_pretrained(case["folder"], trust_remote_code=True).eval()
    result["auto_model_class"] = type(base).__name__
    result["remote_messages"] = [message for message in records if "hf_tome" in message]
    records.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain = Auto.from_pretrained(case["folder"]).eval()
        result["plain_class"] = type(plain).__module__ + "." + type(plain).__name__
        with torch.no_grad():
            result["plain_stock_diff"] = (plain(pixel_values=data["pixels"]).logits - data["stock"]).abs().max().item()
        result["plain_messages"] = records[:] + [str(w.message) for w in caught]
    except Exception as error:  # DC-ViT's slim blocks do not fit the stock model
        result["plain_error"] = f"{type(error).__name__}: {error}"
        result["plain_messages"] = records[:]
    if case.get("pipeline"):
        try:
            import PIL.Image  # the image-classification pipeline needs pillow (.ci's second environment may lack it)
        except ImportError:
            result["pipeline"] = "skipped: no pillow"
        else:
            records.clear()
            classifier = transformers.pipeline("image-classification", model=case["folder"], trust_remote_code=True)
            image = PIL.Image.new("RGB", (40, 48), (120, 30, 200))
            top = classifier(image, top_k=1)[0]
            pixels = classifier.image_processor(images=image, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                probabilities = classifier.model(pixel_values=pixels).logits.softmax(-1)[0]
            result["pipeline"] = {"class": type(classifier.model).__name__, "top_score": top["score"],
                                  "model_score": probabilities.max().item(),
                                  "errors": [m for m in records if "not supported" in m]}
    out[name] = result
print(json.dumps(out))
"""


def _pixels() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(2, 3, 32, 32)


def _logits(model, pixels) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=pixels).logits


def _save_case(root: Path, name: str, model, stock, override: dict | None = None, save=None) -> dict:
    import hf_tome

    folder = root / name
    (save or (lambda m, f: m.save_pretrained(f)))(model, folder)
    pixels = _pixels()
    data = {"pixels": pixels, "stock": _logits(stock, pixels),
            "hf_tome": _logits(hf_tome.AutoModelForImageClassification.from_pretrained(folder), pixels)}
    torch.testing.assert_close(data["hf_tome"], _logits(model, pixels), atol=1e-5, rtol=0)  # hf_tome's own round trip
    if override:
        data["hf_tome_override"] = _logits(hf_tome.AutoModelForImageClassification.from_pretrained(folder, **override),
                                           pixels)
    torch.save(data, root / f"{name}.pt")
    return {"folder": str(folder), "data": str(root / f"{name}.pt"), "override": override}


def _budget_table(model, rows: list[tuple[list[int], list[int], float]]) -> list[dict]:
    import hf_tome

    full = hf_tome.compute_report(model).gmacs
    table = []
    for prune_kept, merge_kept, accuracy in rows:
        config = hf_tome.ToMeConfig(prune_kept=prune_kept, merge_kept=merge_kept)
        gflops = hf_tome.compute_report(model, config=config).gmacs
        table.append({"gflops": gflops, "fraction": gflops / full, "prune_kept": prune_kept, "merge_kept": merge_kept,
                      "accuracy": accuracy})
    return table


def dcvit_model():
    """A tiny ViT compressed as ``hf-tome compress`` leaves it: stock classes, two slim blocks, one dropped."""
    from hf_tome.dcvit import blocks

    model = make_model("vit-cls", num_hidden_layers=6)
    layers = blocks.encoder_layers(model)
    blocks.compress_layer(layers[2], 40)
    blocks.compress_layer(layers[3], 24)
    blocks.compress_layer(layers[4], 0)
    blocks.record_compression(model, method="dc-vit", target=0.7, base_model="google/vit-base-patch16-224",
                              num_samples=16, samples_source="fashion-mnist, split 'train'", gmacs=0.0021,
                              full_gmacs=0.003, measured={"accuracy": 0.71, "original_accuracy": 0.74})
    return model


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Three models saved by hf_tome (ToMe ViT, budget-table Dinov2, DC-ViT ViT) and what the subprocess, with torch
    and transformers only, made of them."""
    import hf_tome
    from hf_tome.dcvit.model_card import save_with_card

    root = tmp_path_factory.mktemp("shared")
    cases = {}
    vit = hf_tome.apply(make_model("vit-cls"), r=6)
    cases["tome_vit"] = _save_case(root, "tome_vit", vit, make_model("vit-cls"), {"tome_r": 3})
    # Written as JSON: building a ViTImageProcessor needs pillow, which .ci's second environment lacks.
    (root / "tome_vit" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    cases["tome_vit"]["pipeline"] = True
    dinov2 = make_model("dinov2-cls")
    table = _budget_table(dinov2, [([65] * 4, [65] * 4, 0.9), ([65, 50, 40, 30], [65, 45, 30, 20], 0.85),
                                   ([65, 30, 20, 15], [65, 25, 15, 10], 0.8)])
    hf_tome.apply(dinov2, budget_table=table, budget=0.75)
    cases["budget_dinov2"] = _save_case(root, "budget_dinov2", dinov2, make_model("dinov2-cls"), {"tome_budget": 0.6})
    dcvit = dcvit_model()
    cases["dcvit_vit"] = _save_case(root, "dcvit_vit", dcvit, make_model("vit-cls", num_hidden_layers=6),
                                    {"tome_r": 4}, save=save_with_card)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules"), "PYTHONWARNINGS": "ignore"}
    finished = subprocess.run([sys.executable, "-c", REMOTE_LOADS, json.dumps(cases)], capture_output=True, text=True,
                              timeout=600, env=env, cwd=root)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return {"root": root, "cases": cases, "result": json.loads(finished.stdout.strip().splitlines()[-1]),
            "table": table}


def test_the_subprocess_cannot_import_hf_tome(shared):
    assert shared["result"]["hf_tome_importable"] is False


@pytest.mark.parametrize("name", ["tome_vit", "budget_dinov2", "dcvit_vit"])
def test_trust_remote_code_runs_merged_with_hf_tome_outputs(shared, name):
    result = shared["result"][name]
    assert result["diff"] <= 1e-5, result
    assert result["override_diff"] <= 1e-5, result  # tome_r= / tome_budget= set there too
    assert result["module"].endswith(".modeling_hf_tome")  # the saved remote code, not hf_tome


def test_remote_code_reduces_tokens_as_saved(shared):
    result = shared["result"]
    assert result["tome_vit"]["class"] == "ToMeViTForImageClassification"
    assert result["tome_vit"]["tokens_in"] == [65, 59, 53, 47]  # r=6 in every block
    assert result["tome_vit"]["override_tome"]["r"] == 3
    # the 0.75 budget picks the row kept at [65, 45, 30, 20] (0.70 of the MACs); 0.6 the smallest (0.56)
    assert result["budget_dinov2"]["tokens_in"] == [65, 65, 45, 30]
    assert result["budget_dinov2"]["saved_tome"]["budget"] == 0.75
    assert result["budget_dinov2"]["override_tome"]["merge_kept"] == [65, 25, 15, 10]
    # DC-ViT: slim blocks 2-4 reduce nothing (no attention to match on), the others merge r=4
    assert result["dcvit_vit"]["tokens_in"] == [65, 65, 65, 65, 65, 65]
    assert result["dcvit_vit"]["override_tome"]["r"] == 4
    assert result["tome_vit"]["auto_model_class"] == "ToMeViTModel"  # AutoModel: the base model, merged


MARKER = "hf_tome.token_merging_off.load_with_trust_remote_code_True"


def test_pipeline_with_trust_remote_code_runs_merged_without_a_not_supported_error(shared):
    result = shared["result"]["tome_vit"]["pipeline"]
    if isinstance(result, str):
        pytest.skip(result)
    assert result["class"] == "ToMeViTForImageClassification" and result["errors"] == []
    assert abs(result["top_score"] - result["model_score"]) < 1e-5


def test_without_trust_remote_code_transformers_loads_the_stock_model_and_warns(shared):
    """transformers' load report (a logged warning) lists the marker tensor saved with the weights."""
    result = shared["result"]
    for name in ("tome_vit", "budget_dinov2"):
        assert result[name]["plain_class"].startswith("transformers.models."), result[name]
        assert result[name]["plain_stock_diff"] <= 1e-5  # every token through every layer
        [report] = result[name]["plain_messages"]
        assert "LOAD REPORT" in report and MARKER in report and "UNEXPECTED" in report
    assert "plain_error" in result["dcvit_vit"]  # the slim blocks do not fit the stock ViT
    assert MARKER in result["dcvit_vit"]["plain_messages"][0]
    for name in ("tome_vit", "budget_dinov2", "dcvit_vit"):  # the remote classes load the marker silently
        assert result[name]["remote_messages"] == []


def test_the_saved_remote_code_imports_no_hf_tome_and_is_regenerated_from_the_sources(shared):
    from hf_tome.hub import bundle

    for name in ("tome_vit", "budget_dinov2", "dcvit_vit"):
        text = (Path(shared["cases"][name]["folder"]) / "modeling_hf_tome.py").read_text()
        assert text == bundle.remote_code()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                assert not any(alias.name.split(".")[0] == "hf_tome" for alias in node.names)
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "hf_tome" and node.level == 0
    # the digest in the header is that of the current source files, in the order the header lists them
    modules = bundle.modules_in_order()
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.encode() + b"\0" + bundle.source_path(module).read_bytes() + b"\0")
    assert f"Sources digest: {digest.hexdigest()}" in text
    assert {"hf_tome.hub.remote", "hf_tome.adapters.vit", "hf_tome.adapters.dinov2", "hf_tome.dcvit.blocks",
            "hf_tome.core.reduce"} <= set(modules)


def test_config_names_the_stock_class_and_the_remote_classes(shared):
    config = json.loads((Path(shared["cases"]["tome_vit"]["folder"]) / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    assert config["auto_map"] == {"AutoModel": "modeling_hf_tome.HfTomeViTModel",
                                  "AutoModelForImageClassification": "modeling_hf_tome.HfTomeViTForImageClassification"}
    assert config["tome"]["r"] == 6
    dinov2 = json.loads((Path(shared["cases"]["budget_dinov2"]["folder"]) / "config.json").read_text())
    classifier = dinov2["auto_map"]["AutoModelForImageClassification"]
    assert classifier == "modeling_hf_tome.HfTomeDinov2ForImageClassification"


def test_bundle_renames_names_two_modules_define():
    from hf_tome.hub import bundle

    text = bundle.remote_code()
    assert "def _loop_module__adapters_dinov2(" in text and "loop_module=_loop_module__adapters_dinov2" in text
    assert "def encoder_layers__dcvit_blocks(" in text  # blocks imports encoder's as find_encoder_layers
    assert "find_encoder_layers" not in text
    assert text.count("from __future__ import annotations") == 1


def test_bundle_is_made_from_the_sources_on_disk(monkeypatch, tmp_path):
    """No stored copy: an edit of an inlined hf_tome module shows in the next bundle (and in its digest)."""
    import shutil

    from hf_tome.hub import bundle

    before = bundle.remote_code()
    copy = tmp_path / "hf_tome"
    shutil.copytree(bundle.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    reduce = copy / "core" / "reduce.py"
    reduce.write_text(reduce.read_text() + "\n\nEDITED_FOR_THE_TEST = 1\n")
    monkeypatch.setattr(bundle, "PACKAGE_ROOT", copy)
    after = bundle.remote_code()
    assert "EDITED_FOR_THE_TEST = 1" in after and "EDITED_FOR_THE_TEST" not in before
    assert after.split("Sources digest: ")[1][:64] != before.split("Sources digest: ")[1][:64]

"""Sharing hf_tome models: push_to_hub (the Hub faked at the HTTP layer), model cards, pipelines, and what plain
transformers does with a shared model when hf_tome is imported."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from conftest import make_model
from PIL import Image
from test_hub import MARKER, dcvit_model

import hf_tome
from hf_tome.hub import bundle, publish
from hf_tome.hub.card import render_card


class FakeHub:
    """The Hub's HTTP API as huggingface_hub's client (httpx2) calls it to create a repo and upload a folder."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict[str, bytes]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            body = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/me/{body['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:  # every file goes inline in the commit ("regular"), none through LFS
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            files = {}
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            self.commits.append(files)
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/x/commit/" + "0" * 40,
                                              "commitOid": "0" * 40})
        return httpx2.Response(404, json={"error": f"not faked: {path}"})


@pytest.fixture
def hub():
    fake = FakeHub()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
    huggingface_hub.close_session()  # the next call builds its client from the factory above
    yield fake
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
    huggingface_hub.close_session()


@pytest.fixture
def transformers_log(caplog):
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Remote code copied by transformers goes to a temporary folder."""
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def _processor() -> transformers.ViTImageProcessor:
    return transformers.ViTImageProcessor(size={"height": 32, "width": 32})


def _images() -> list[Image.Image]:
    return [Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))
            for seed in range(2)]


def _budget_dinov2():
    model = make_model("dinov2-cls")
    full = hf_tome.compute_report(model).gmacs
    table = []
    for kept, accuracy in (([65] * 4, 0.9), ([65, 45, 30, 20], 0.85)):
        gflops = hf_tome.compute_report(model, config=hf_tome.ToMeConfig(prune_kept=kept, merge_kept=kept)).gmacs
        table.append({"gflops": gflops, "fraction": gflops / full, "prune_kept": kept, "merge_kept": kept,
                      "accuracy": accuracy})
    return hf_tome.apply(model, budget_table=table, budget=0.8)


def test_push_to_hub_uploads_the_remote_code_auto_map_and_card(hub):
    model = hf_tome.apply(make_model("vit-cls"), r=4)
    model.push_to_hub("me/tiny-tome", token="hf_fake")
    [files] = hub.commits
    assert {"config.json", "model.safetensors", "modeling_hf_tome.py", "README.md"} <= files.keys()
    assert ("POST", "/api/repos/create") in hub.requests
    assert files["modeling_hf_tome.py"].decode() == bundle.remote_code()
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_hf_tome.HfTomeViTForImageClassification"
    assert config["tome"]["r"] == 4 and config["architectures"] == ["ViTForImageClassification"]
    card = files["README.md"].decode()
    for text in ("- hf-tome", "- token-merging", "- vit", 'from_pretrained("me/tiny-tome", trust_remote_code=True)',
                 'hf_tome.AutoModelForImageClassification.from_pretrained("me/tiny-tome")', "GMACs"):
        assert text in card, text


def test_push_of_a_dcvit_model_uploads_its_card_and_the_code_that_rebuilds_it(hub, tmp_path):
    from hf_tome.dcvit.model_card import push_compressed_to_hub

    student = dcvit_model()  # stock classes, as hf-tome compress leaves it
    _processor().save_pretrained(tmp_path)
    push_compressed_to_hub(student, "me/tiny-dcvit", token="hf_fake",
                           extra_files={"preprocessor_config.json": tmp_path / "preprocessor_config.json"})
    hf_tome.apply(student, r=2).push_to_hub("me/tiny-dcvit-tome", token="hf_fake")
    for files, repo in zip(hub.commits, ("me/tiny-dcvit", "me/tiny-dcvit-tome"), strict=True):
        assert {"modeling_hf_tome.py", "README.md", "config.json", "model.safetensors"} <= files.keys()
        assert "auto_map" in json.loads(files["config.json"])
        card = files["README.md"].decode()
        assert "- dc-vit" in card and "- token-merging" in card and "block_compression" in card
        assert f'from_pretrained("{repo}", trust_remote_code=True)' in card
        assert "| accuracy | 71.00% | 74.00% |" in card  # measured figures config.block_compression carries
    assert "preprocessor_config.json" in hub.commits[0]


def test_save_pretrained_with_push_to_hub_saves_then_uploads(hub, tmp_path):
    model = hf_tome.apply(make_model("deit-cls"), r=2)
    model.save_pretrained(tmp_path / "deit", push_to_hub=True, repo_id="me/deit-tome", token="hf_fake")
    assert (tmp_path / "deit" / "modeling_hf_tome.py").is_file()
    [files] = hub.commits
    assert json.loads(files["config.json"])["auto_map"] == {
        "AutoModel": "modeling_hf_tome.HfTomeDeiTModel",
        "AutoModelForImageClassification": "modeling_hf_tome.HfTomeDeiTForImageClassification"}


def test_card_of_a_budget_table_model_lists_the_measured_rows(tmp_path):
    card = str(render_card(_budget_dinov2(), repo_id="me/dinov2-budgets"))
    assert "- prune-merge" in card and "- dinov2" in card
    assert "| 100.0% | 90.00% |" in card and "85.00% |" in card  # each row's fraction and measured accuracy
    assert "| prune_kept | [65, 45, 30, 20] |" in card  # the row the 0.8 budget picks
    assert 'from_pretrained("me/dinov2-budgets", trust_remote_code=True, tome_budget=0.5)' in card
    assert "GMACs per\n32x32 image" in card


def test_card_lists_the_merge_rule_and_mode_default_or_not(tmp_path):
    config = hf_tome.ToMeConfig(r=2, merge_rule="pitome", merge_mode="mlerp", prune_matched_layers=1)
    hf_tome.apply(make_model("vit-cls"), config).save_pretrained(tmp_path / "pitome")
    card = (tmp_path / "pitome" / "README.md").read_text()
    assert "| merge_rule | pitome |" in card and "| merge_mode | mlerp |" in card and "| r | 2 |" in card
    assert "| prune_matched_layers | 1 |" in card
    default = str(render_card(hf_tome.apply(make_model("vit-cls"), r=2)))
    assert "| merge_rule | bipartite |" in default and "| merge_mode | mean |" in default
    assert "prune_matched_layers" not in default  # only shown when used


def test_pipeline_given_an_hf_tome_model_logs_no_not_supported_error(transformers_log):
    merged = hf_tome.apply(make_model("vit-cls"), r=8)
    classifier = transformers.pipeline("image-classification", model=merged, image_processor=_processor())
    assert len(classifier(_images()[0], top_k=2)) == 2
    assert not [r for r in transformers_log.records if "is not supported" in r.getMessage()]


def test_pipeline_given_a_saved_folder_warns_or_runs_merged(tmp_path, transformers_log, modules_cache):
    folder = tmp_path / "vit-tome"
    hf_tome.apply(make_model("vit-cls"), r=8).save_pretrained(folder)
    _processor().save_pretrained(folder)
    with pytest.warns(UserWarning, match=r"saved by hf-tome with token merging r=8, but transformers\."
                                         r"AutoModelForImageClassification.from_pretrained loaded it as the stock "
                                         r"ViTForImageClassification: token merging is off\. Load it with "
                                         r"hf_tome.AutoModelForImageClassification.from_pretrained\(\.\.\.\), or pass "
                                         r"trust_remote_code=True to run the modeling_hf_tome.py saved with it\.$"):
        plain = transformers.pipeline("image-classification", model=str(folder))
    assert type(plain.model) is transformers.ViTForImageClassification
    remote = transformers.pipeline("image-classification", model=str(folder), trust_remote_code=True)
    assert type(remote.model).__name__ == "ToMeViTForImageClassification"
    assert type(remote.model).__module__.endswith("modeling_hf_tome")
    reference = transformers.pipeline("image-classification", image_processor=_processor(),
                                      model=hf_tome.AutoModelForImageClassification.from_pretrained(folder))
    got, expected = remote(_images(), top_k=3), reference(_images(), top_k=3)
    assert [[p["label"] for p in scores] for scores in got] == [[p["label"] for p in scores] for scores in expected]
    np.testing.assert_allclose([[p["score"] for p in s] for s in got], [[p["score"] for p in s] for s in expected],
                               atol=1e-6)
    messages = [r.getMessage() for r in transformers_log.records]
    assert not [m for m in messages if "is not supported" in m or MARKER in m]


def test_transformers_auto_classes_with_hf_tome_imported(tmp_path, modules_cache):
    folder = tmp_path / "vit-shared"
    hf_tome.apply(make_model("vit-cls"), r=8).save_pretrained(folder)
    model = transformers.AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, tome_r=3)
    assert model.config.tome["r"] == 3 and model.tome_compute().tokens_in == [65, 62, 59, 56]
    plain_folder = tmp_path / "vit-plain"
    make_model("vit-cls").save_pretrained(plain_folder)  # stock transformers: no remote code takes tome_r
    with pytest.raises(TypeError, match=r"does not take tome_r: .* Load with hf_tome's Auto class instead"):
        transformers.AutoModelForImageClassification.from_pretrained(plain_folder, trust_remote_code=True, tome_r=3)


def test_hf_tome_loads_a_shared_model_without_a_load_report(tmp_path, transformers_log):
    folder = tmp_path / "shared"
    hf_tome.apply(make_model("dinov2-cls"), r=4).save_pretrained(folder)
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(folder)
    assert loaded.tome_config.r == 4
    assert not [r for r in transformers_log.records if "LOAD REPORT" in r.getMessage()]


def test_a_family_the_remote_code_does_not_serve_is_saved_with_a_warning(tmp_path):
    swin = transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=3))
    hf_tome.apply(swin, r=1)
    with pytest.warns(UserWarning, match=r"saved without remote code, which serves ViT, DeiT and Dinov2 only"):
        swin.save_pretrained(tmp_path / "swin")
    assert not (tmp_path / "swin" / "modeling_hf_tome.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "swin" / "config.json").read_text())
    assert "hf-tome's remote code does not serve SwinForImageClassification" in (
        tmp_path / "swin" / "README.md").read_text()
    with pytest.raises(ValueError, match=r"remote code does not serve SwinForImageClassification: expected a model of "
                                         r"one of DeiTForImageClassification, .*ViTModel \(ViT, DeiT, Dinov2"):
        publish.write_hub_files(swin, tmp_path / "swin")


def test_import_hf_tome_alone_makes_save_pretrained_write_the_hub_files(tmp_path):
    """The publisher is a built-in plugin: nothing but ``import hf_tome`` is needed."""
    code = ("import sys, hf_tome, transformers, torch\n"
            "config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, "
            "intermediate_size=64, image_size=32, patch_size=8)\n"
            "model = hf_tome.apply(transformers.ViTForImageClassification(config), r=2)\n"
            f"model.save_pretrained({str(tmp_path / 'fresh')!r})\n"
            "print(sorted(name for name in sys.modules if name.startswith('hf_tome.hub')))\n")
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert {"modeling_hf_tome.py", "README.md", "config.json"} <= {p.name for p in (tmp_path / "fresh").iterdir()}
    assert torch.load is not None and Path(tmp_path / "fresh" / "README.md").read_text().startswith("---")


def test_the_warning_offers_remote_code_only_where_it_was_saved(tmp_path):
    """Swin has no remote code: its warning names hf_tome's loader only."""
    folder = tmp_path / "swin-tome"
    with pytest.warns(UserWarning, match="saved without remote code"):
        config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 1],
                                         window_size=4, num_labels=3)
        hf_tome.apply(transformers.SwinForImageClassification(config).eval(), r=2).save_pretrained(folder)
    with pytest.warns(UserWarning, match=r"token merging is off\. Load it with hf_tome\.AutoModelForImageClassification"
                                         r"\.from_pretrained\(\.\.\.\)\.$"):
        transformers.AutoModelForImageClassification.from_pretrained(folder)

"""Export of merged models: exportable ops, the mask under export, torch.export, ONNX in Optimum's layout.

Every ONNX check runs one export at batch size 2 and compares onnxruntime with PyTorch at batch sizes 1 and 5
(float32, 1e-4). The fast tests use the TorchScript exporter where they can (it takes a second); the family matrix
on the default (dynamo) exporter is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
import transformers as T
from conftest import make_model

import hf_tome
from hf_tome.cli import main as cli
from hf_tome.core.ops import bipartite_soft_matching, exportable
from hf_tome.core.ops.exportable import descending_order, gather_rows, scatter_into, stable_descending_order
from hf_tome.dcvit import blocks
from hf_tome.export.onnx import export_onnx
from hf_tome.export.program import export_program
from hf_tome.integration.budget_table import FULL_GFLOPS_KEY

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
BATCHES = (1, 5)

AST = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, num_labels=5,
           max_length=32, num_mel_bins=16, patch_size=4, frequency_stride=3, time_stride=4)
WHISPER = dict(vocab_size=100, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=1,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
               max_source_positions=32, max_target_positions=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)
VIDEO = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, num_labels=5)
SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, mlp_ratio=2.0,
            num_labels=5)


def _build(model_class, config) -> torch.nn.Module:
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_class(config).eval()


# family -> (build a tiny random model, the two r > 0 exported besides r=0)
FAMILIES = {
    "vit": (lambda: make_model("vit-cls", num_hidden_layers=3), (4, 8)),
    "vit-base": (lambda: make_model("vit", num_hidden_layers=3), (4, 8)),
    "deit": (lambda: make_model("deit-teacher", num_hidden_layers=3), (4, 8)),
    "dinov2": (lambda: make_model("dinov2-cls", num_hidden_layers=3), (4, 8)),
    "dinov2-reg": (lambda: make_model("dinov2-reg-cls", num_hidden_layers=3), (4, 8)),
    "ast": (lambda: _build(T.ASTForAudioClassification, T.ASTConfig(**AST)), (3, 6)),
    "whisper": (lambda: _build(T.WhisperForConditionalGeneration, T.WhisperConfig(**WHISPER)), (4, 8)),
    "swin": (lambda: _build(T.SwinForImageClassification, T.SwinConfig(**SWIN)), (1, 2)),
    "videomae": (lambda: _build(T.VideoMAEForVideoClassification, T.VideoMAEConfig(
        **VIDEO, num_frames=6, image_size=12, patch_size=4, tubelet_size=2)), (3, 5)),
    "vivit": (lambda: _build(T.VivitForVideoClassification, T.VivitConfig(
        **VIDEO, num_frames=4, image_size=16, tubelet_size=[2, 4, 4])), (3, 5)),
}


def _sample(model, batch: int) -> tuple[str, torch.Tensor]:
    """The input name and a random input of ``batch`` examples for ``model``."""
    config = model.config
    generator = torch.Generator().manual_seed(batch)
    if config.model_type == "whisper":
        return "input_features", torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions,
                                             generator=generator)
    if config.model_type == "audio-spectrogram-transformer":
        return "input_values", torch.randn(batch, config.max_length, config.num_mel_bins, generator=generator)
    size = config.image_size
    if hasattr(config, "num_frames"):
        return "pixel_values", torch.randn(batch, config.num_frames, 3, size, size, generator=generator)
    return "pixel_values", torch.randn(batch, 3, size, size, generator=generator)


def _reference(model, name: str, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            output = model.get_encoder()(**{name: inputs})
        else:
            output = model(**{name: inputs})
    return {key: value for key, value in output.items() if key in ("logits", "last_hidden_state", "token_sizes")}


def _onnx_differences(path: Path, model) -> dict[int, float]:
    """Largest |onnxruntime - PyTorch| over every output, per batch size, from the one exported file."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    differences = {}
    for batch in BATCHES:
        name, inputs = _sample(model, batch)
        expected = _reference(model, name, inputs)
        names = [output.name for output in session.get_outputs()]
        assert set(names) == set(expected)
        got = dict(zip(names, session.run(names, {name: inputs.numpy()}), strict=True))
        differences[batch] = max((torch.from_numpy(got[key]) - expected[key]).abs().max().item() for key in names)
    return differences


def _check_family(family: str, r: int, exporter: str, tmp_path: Path, **options) -> None:
    build, _ = FAMILIES[family]
    model = hf_tome.apply(build(), r=r, **options)
    result = export_onnx(model, tmp_path, exporter=exporter, validate=False)
    differences = _onnx_differences(result.onnx_file, model)
    print(f"{family} r={r} {options} {exporter}: {differences}")
    assert max(differences.values()) <= ATOL, differences


def test_descending_order_is_a_stable_argsort(monkeypatch):
    torch.manual_seed(0)
    for trial in range(60):
        length = 1 + trial
        scores = torch.randint(-2, 3, (3, length)).float() if trial % 2 else torch.randn(3, length)
        scores[scores == -2] = -torch.inf  # ties and -inf, as protected rows score
        expected = scores.argsort(dim=-1, descending=True, stable=True)
        assert torch.equal(descending_order(scores), expected)
        assert torch.equal(stable_descending_order(scores), expected)
    # while a graph is captured the comparison form runs, with the same matching
    metric = torch.randn(3, 33, 8)
    metric[:, 10] = metric[:, 12]  # a tie
    eager = bipartite_soft_matching(metric, 8, protected=1)
    monkeypatch.setattr(exportable, "capturing_graph", lambda: True)
    captured = bipartite_soft_matching(metric, 8, protected=1)
    for name in ("unmerged_a", "merged_a", "destination_b"):
        assert torch.equal(getattr(captured, name), getattr(eager, name))
    target, sources = torch.randn(2, 7, 3), torch.randn(2, 5, 3)
    index = torch.randint(0, 7, (2, 5, 1)).expand(-1, -1, 3)
    for reduce in ("sum", "amax"):
        expected = target.scatter_reduce(1, index, sources, reduce)
        assert torch.equal(scatter_into(target, index, sources, reduce), expected)


class _OrderAndRows(torch.nn.Module):
    """The exported forms of the stable order and the row gather, on their own."""

    def forward(self, scores: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = stable_descending_order(scores)
        return order, gather_rows(rows, order[:, :5])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_order_is_stable_on_ties_and_row_gather_keeps_the_batch_dynamic(exporter, tmp_path):
    def sample(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.randint(-2, 3, (batch, 40)).float()  # many ties
        scores[scores == -2] = -torch.inf
        return scores, torch.randn(batch, 40, 6)

    path = tmp_path / "order.onnx"
    example = sample(2)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(_OrderAndRows(), example, str(path), dynamo=True, input_names=["scores", "rows"],
                          dynamic_shapes=({0: batch}, {0: batch}))
    else:
        torch.onnx.export(_OrderAndRows(), example, str(path), dynamo=False, input_names=["scores", "rows"],
                          dynamic_axes={"scores": {0: "batch"}, "rows": {0: "batch"}})
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" in ops and "GatherElements" not in ops, ops  # one Gather of whole rows
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    for size in (1, 5, 9):
        scores, rows = sample(size)
        order, gathered = session.run(None, {"scores": scores.numpy(), "rows": rows.numpy()})
        expected = scores.argsort(dim=-1, descending=True, stable=True)
        assert torch.equal(torch.from_numpy(order), expected)
        assert torch.equal(torch.from_numpy(gathered), rows.gather(1, expected[:, :5, None].expand(-1, -1, 6)))


def test_torch_export_of_a_merged_vit():
    model = hf_tome.apply(make_model("vit-cls", num_hidden_layers=2), r=8)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        direct = torch.export.export(model, (), {"pixel_values": torch.randn(2, 3, 32, 32)},
                                     dynamic_shapes={"pixel_values": {0: batch}})
    program = export_program(model)  # one input, the task's outputs (here the logits)
    for size in BATCHES:
        pixels = torch.randn(size, 3, 32, 32)
        with torch.no_grad():
            expected = model(pixel_values=pixels)
            torch.testing.assert_close(direct.module()(pixel_values=pixels).logits, expected.logits)
            torch.testing.assert_close(program.module()(pixels)[0], expected.logits)
    # the matching runs under no_grad, in a submodule of the program: no stable sort there either
    captured = {str(node.target) for graph in direct.graph_module.modules() if isinstance(graph, torch.fx.GraphModule)
                for node in graph.graph.nodes if node.op == "call_function"}
    assert "aten.index_add.default" in captured and not any("stable" in target for target in captured)


def test_a_user_mask_on_merged_tokens_is_still_refused():
    """No mask without a user mask (under export too); a user mask that masks something still meets the error."""
    model = hf_tome.apply(make_model("vit"), r=8)
    pixels, mask = torch.randn(2, 3, 32, 32), torch.ones(2, 65, dtype=torch.long)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="attention_mask cannot be combined with merged tokens"):
        model(pixel_values=pixels, attention_mask=mask)
    hf_tome.apply(model, r=0)  # without merging the user mask reaches the attention and changes the output
    with torch.no_grad():
        masked, plain = model(pixel_values=pixels, attention_mask=mask), model(pixel_values=pixels)
    torch.testing.assert_close(masked.last_hidden_state[0], plain.last_hidden_state[0])
    assert not torch.allclose(masked.last_hidden_state[1], plain.last_hidden_state[1])


def _saved_vit(folder: Path) -> Path:
    model = make_model("vit-cls", num_hidden_layers=2)
    model.save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf_tome_export_onnx_writes_optimum_layout(tmp_path):
    source, out = _saved_vit(tmp_path / "vit"), tmp_path / "onnx"
    assert cli.main(["export", "onnx", "--model", str(source), "--tome-r", "8", str(out)]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "model.onnx", "preprocessor_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["tome"]["r"] == 8 and config["architectures"] == ["ViTForImageClassification"]
    graph = onnx.load(str(out / "model.onnx")).graph
    axes = [(v.name, v.type.tensor_type.shape.dim[0].dim_param) for v in [*graph.input, *graph.output]]
    assert axes == [("pixel_values", "batch_size"), ("logits", "batch_size")]
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(source, tome_r=8).eval()
    assert max(_onnx_differences(out / "model.onnx", loaded).values()) <= ATOL


@pytest.mark.parametrize("family", ["vit", "vit-base", "deit", "dinov2", "ast", "whisper"])
def test_families_export_with_the_torchscript_exporter(family, tmp_path):
    _check_family(family, FAMILIES[family][1][1], "torchscript", tmp_path)


@pytest.mark.parametrize("rule", ["pitome", "agglomerative"])
@pytest.mark.parametrize("family", ["vit", "deit"])
def test_merge_rules_and_mlerp_export_with_the_torchscript_exporter(family, rule, tmp_path):
    _check_family(family, FAMILIES[family][1][1], "torchscript", tmp_path, merge_rule=rule, merge_mode="mlerp")


def test_prune_matched_layers_export_with_the_torchscript_exporter(tmp_path):
    _check_family("vit", FAMILIES["vit"][1][1], "torchscript", tmp_path, merge_mode="mlerp", prune_matched_layers=2)


def _budget_vit(folder: Path) -> Path:
    model = make_model("vit-cls")
    full = hf_tome.compute_report(model).gmacs
    rows = [(1.0, [65] * 4, [65] * 4, {}), (0.7, [65, 50, 40, 30], [65, 45, 30, 20], {}),
            (0.6, [65, 50, 40, 25], [65, 40, 25, 15], {"merge_match": "bipartite"})]
    table = [{"gflops": fraction * full, "fraction": fraction, "prune_kept": prune, "merge_kept": merge,
              "accuracy": 0.9, **extra} for fraction, prune, merge, extra in rows]
    hf_tome.apply(model, budget_table=table, extra={FULL_GFLOPS_KEY: full})
    model.save_pretrained(folder)
    return folder


def _dcvit(folder: Path) -> Path:
    model = make_model("dinov2-cls", num_hidden_layers=5)
    layers = blocks.encoder_layers(model)
    torch.manual_seed(0)
    blocks.compress_layer(layers[2], 7, torch.rand(blocks.mlp_width(layers[2])))
    blocks.compress_layer(layers[3], 0)
    blocks.record_compression(model, method="dc-vit")
    model.save_pretrained(folder)
    return folder


def _export_saved(source: Path, out: Path, exporter: str, *reduction: str) -> tuple[dict, dict[int, float]]:
    assert cli.main(["export", "onnx", "--model", str(source), "--exporter", exporter, *reduction, str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    option, value = reduction
    overrides = {"tome_budget": float(value)} if option == "--tome-budget" else {"tome_r": int(value)}
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(source, **overrides).eval()
    return config, _onnx_differences(out / "model.onnx", loaded)


@pytest.mark.parametrize("budget, merge_kept", [(0.75, [65, 45, 30, 20]), (0.6, [65, 40, 25, 15])])
def test_prune_merge_budgets_export(budget, merge_kept, tmp_path):
    config, differences = _export_saved(_budget_vit(tmp_path / "vit"), tmp_path / "onnx", "torchscript",
                                        "--tome-budget", str(budget))
    assert config["tome"]["merge_kept"] == merge_kept
    assert max(differences.values()) <= ATOL


def test_dcvit_blocks_export(tmp_path):
    config, differences = _export_saved(_dcvit(tmp_path / "dcvit"), tmp_path / "onnx", "torchscript", "--tome-r", "6")
    assert config["block_compression"]["mlp_kept"] == {"2": 7, "3": 0} and config["tome"]["r"] == 6
    assert max(differences.values()) <= ATOL


def test_a_failed_check_exits_1_and_keeps_the_files(tmp_path, monkeypatch, capsys):
    from hf_tome.export import onnx as export_module

    monkeypatch.setattr(export_module, "compare_with_onnxruntime", lambda path, prepared: {1: {"logits": 0.5}})
    source, out = _saved_vit(tmp_path / "vit"), tmp_path / "onnx"
    assert cli.main(["export", "onnx", "--model", str(source), "--exporter", "torchscript", str(out)]) == 1
    assert "differs from PyTorch by 5.00e-01 > --atol 0.001" in capsys.readouterr().err
    assert (out / "model.onnx").exists()


def _optimum_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``optimum-cli`` as installed: our command comes from the optimum.commands.register namespace. A source tree
    not (re)installed since the command was added gets the same layout from a folder put on PYTHONPATH."""
    env = dict(os.environ)
    try:
        installed = importlib.util.find_spec("optimum.commands.register.hf_tome") is not None
    except ModuleNotFoundError:  # no distribution installs a module in optimum.commands.register
        installed = False
    if not installed:
        register = tmp_path / "site" / "optimum" / "commands" / "register"
        register.mkdir(parents=True)
        (register / "hf_tome.py").symlink_to(ROOT / "hf_tome/export/optimum_register/hf_tome.py")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "site"), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_optimum_cli_export_hf_tome(tmp_path):
    source, out = _saved_vit(tmp_path / "vit"), tmp_path / "onnx"
    finished = _optimum_cli(["export", "hf-tome", "onnx", "--model", str(source), "--tome-r", "8", "--exporter",
                             "torchscript", str(out)], tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "onnxruntime vs PyTorch, batch 5" in finished.stdout
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "model.onnx", "preprocessor_config.json"]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("which", [0, 1, 2])
def test_families_export_with_dynamo(family, which, tmp_path):
    """ONNX (torch.export-based exporter) equals PyTorch at r=0 and two r > 0, batch sizes 1 and 5."""
    _check_family(family, (0, *FAMILIES[family][1])[which], "dynamo", tmp_path)


@pytest.mark.slow
def test_prune_merge_and_dcvit_export_with_dynamo(tmp_path):
    _, differences = _export_saved(_budget_vit(tmp_path / "vit"), tmp_path / "a", "dynamo", "--tome-budget", "0.6")
    assert max(differences.values()) <= ATOL
    _, differences = _export_saved(_dcvit(tmp_path / "dcvit"), tmp_path / "b", "dynamo", "--tome-r", "6")
    assert max(differences.values()) <= ATOL

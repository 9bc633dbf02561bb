"""Unified token compression: prune by class attention, then merge, per layer; FLOPs budgets and their table."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import IMAGE_MODELS, main_output, make_model, mlp_norms, tokens_seen_by

import hf_tome
from hf_tome.core.ops import class_attention, prune_and_merge, soft_prune_merge
from hf_tome.integration.budget_table import FULL_GFLOPS_KEY, select_budget_row

ALL = list(IMAGE_MODELS)
NUM_PATCHES = 64


def _kept(protected: int) -> tuple[list[int], list[int]]:
    total = NUM_PATCHES + protected
    return [total, 50 + protected, 40 + protected, 28 + protected], [total, 44 + protected, 30 + protected,
                                                                     20 + protected]


def _layers(model):
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.encoder.layer


def _record_counts(model, pixels) -> tuple[list[int], list[int]]:
    """Tokens entering every layer, and tokens reaching every MLP (after the layer's reduction)."""
    return (tokens_seen_by(_layers(model), lambda: model(pixels)),
            tokens_seen_by(mlp_norms(model), lambda: model(pixels)))


def test_class_attention_is_the_class_query_row_averaged_over_heads():
    torch.manual_seed(0)
    query, keys = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    bias = torch.randn(2, 1, 1, 10)
    full = ((query @ keys.transpose(-1, -2)) * 8**-0.5 + bias).softmax(-1)
    torch.testing.assert_close(class_attention(query[:, :, 0], keys, 8**-0.5, bias), full[:, :, 0].mean(1))


@pytest.mark.parametrize("protected", [1, 2])
def test_pruning_keeps_protected_and_most_attended_tokens(protected):
    torch.manual_seed(0)
    batch, heads, tokens, dim = 2, 2, 12, 4
    query = torch.zeros(batch, heads, dim)
    query[..., 0] = 10.0
    keys = torch.randn(batch, heads, tokens, dim) * 0.1
    attended = {0: [9, 3, 5], 1: [4, 10, 7]}  # per image, most attended first
    for image, order in attended.items():
        for strength, index in zip((3.0, 2.0, 1.0), order, strict=True):
            keys[image, :, index, 0] = strength
    keys[:, :, :protected, 0] = -5.0  # the class token itself is barely attended: it must be kept anyway
    scores = class_attention(query, keys, 1.0)
    metric = torch.randn(batch, tokens, dim)
    step = prune_and_merge(scores, metric, prune_kept=protected + 3, merge_kept=protected + 2, protected=protected)
    for image, order in attended.items():
        assert step.kept[image].tolist() == list(range(protected)) + sorted(order[:2])
        assert step.merged[image].tolist() == [order[2]]
        assert len(step.pruned[image]) == tokens - protected - 3
        assert step.merged_into[image].item() >= protected  # protected tokens absorb nothing
    x, size = torch.randn(batch, tokens, 5), torch.ones(batch, tokens, 1)
    merged = step.merge(x * size) / step.merge(size)
    torch.testing.assert_close(merged[:, :protected], x[:, :protected])
    assert step.merge(size).sum().item() == batch * (protected + 3)


def test_model_prunes_the_tokens_the_class_token_attends_least(pixels):
    eager = make_model("vit-cls", "eager")
    with torch.no_grad():
        attention = eager(pixels, output_attentions=True).attentions[1]  # block 1 sees block 0's output, unreduced
    class_row = attention[:, :, 0, 1:].mean(1)
    keep = 20
    expected = [sorted((class_row[i].topk(keep - 1).indices + 1).tolist()) for i in range(len(pixels))]
    model = make_model("vit-cls", "sdpa")
    hf_tome.apply(model, prune_kept=[65, keep, keep, keep], merge_kept=[65, keep, keep, keep], trace_source=True)
    with torch.no_grad():
        out = model.vit(pixels)
    held = out.token_source.sum(1)  # which original tokens survive
    for image in range(len(pixels)):
        survivors = held[image].nonzero().flatten().tolist()
        assert survivors == [0, *expected[image]]
    assert torch.equal(out.token_source[:, 0, 0], torch.ones(len(pixels)))  # class token still first, alone
    assert torch.equal(out.token_sizes, torch.ones(len(pixels), keep, 1))


@pytest.mark.parametrize("name", ALL)
def test_counts_per_layer_match_the_config(name, pixels):
    protected = IMAGE_MODELS[name][3]
    prune_kept, merge_kept = _kept(protected)
    model = make_model(name)
    hf_tome.apply(model, prune_kept=prune_kept, merge_kept=merge_kept)
    entering, reduced = _record_counts(model, pixels)
    assert entering == [merge_kept[0], *merge_kept[:-1]]
    assert reduced == merge_kept
    assert hf_tome.compute_report(model).tokens_out == merge_kept
    with torch.no_grad():
        assert model.base_model(pixels).last_hidden_state.shape[1] == merge_kept[-1]


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2-reg"])
def test_pruned_mass_leaves_and_merged_mass_stays(name, pixels):
    protected = IMAGE_MODELS[name][3]
    total = NUM_PATCHES + protected
    model = make_model(name)
    # Only block 1 compresses: prune to 40, merge down to 30; sizes then add up to exactly the 40 survivors.
    hf_tome.apply(model, prune_kept=[total, 40, 30, 30], merge_kept=[total, 30, 30, 30], trace_source=True)
    with torch.no_grad():
        out = model(pixels)
    assert torch.equal(out.token_sizes.sum(1).flatten(), torch.full((4,), 40.0))
    assert torch.equal(out.token_source.sum(-1, keepdim=True), out.token_sizes)
    assert torch.equal(out.token_sizes[:, :protected], torch.ones(4, protected, 1))
    assert out.token_positions.shape == (4, total) and int(out.token_positions.max()) < 30


@pytest.mark.parametrize("name", ALL)
def test_no_reduction_equals_unpatched(name, pixels):
    protected = IMAGE_MODELS[name][3]
    model = make_model(name)
    with torch.no_grad():
        reference = main_output(model(pixels))
        hf_tome.apply(model, prune_kept=[NUM_PATCHES + protected] * 4, merge_kept=[NUM_PATCHES + protected] * 4)
        patched = main_output(model(pixels))
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vit-cls", "deit-teacher", "dinov2-reg-cls"])
def test_eager_equals_sdpa_and_batch_invariance(name, pixels):
    prune_kept, merge_kept = _kept(IMAGE_MODELS[name][3])
    sdpa, eager = make_model(name, "sdpa"), make_model(name, "eager")
    for model in (sdpa, eager):
        hf_tome.apply(model, prune_kept=prune_kept, merge_kept=merge_kept)
    with torch.no_grad():
        batched = main_output(sdpa(pixels))
        torch.testing.assert_close(batched, main_output(eager(pixels)), atol=1e-5, rtol=0)
        single = torch.cat([main_output(sdpa(pixels[i : i + 1])) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_training_backward_reaches_every_weight_with_and_without_checkpointing(pixels):
    grads = []
    for checkpointing in (False, True):
        model = make_model("vit-cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        hf_tome.apply(model, prune_kept=[65, 50, 40, 30], merge_kept=[65, 45, 30, 20])
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(pixels, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
        assert [n for n, p in model.named_parameters() if p.grad is None and "mask_token" not in n] == []
        grads.append(model.vit.embeddings.patch_embeddings.projection.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_macs_match_the_formula_by_hand():
    with torch.device("meta"):
        model = T.DeiTForImageClassification(T.DeiTConfig(hidden_size=384, num_attention_heads=6,
                                                          intermediate_size=1536, num_labels=1000))
    prune_kept = [198, 180, 170, 150, 150, 140, 120, 110, 100, 90, 80, 70]
    merge_kept = [198, 170, 160, 150, 140, 120, 110, 100, 90, 80, 70, 60]
    hf_tome.apply(model, prune_kept=prune_kept, merge_kept=merge_kept)
    channels = 384
    expected = 196 * channels * 3 * 16 * 16 + channels * 1000  # patch embedding and the classifier
    tokens_in = 198
    for layer, merged in enumerate(merge_kept):
        out = tokens_in if layer == 0 else merged
        expected += 4 * tokens_in * channels**2 + 2 * tokens_in**2 * channels + 8 * out * channels**2
        tokens_in = out
    report = hf_tome.compute_report(model)
    assert report.total_macs == expected
    assert report.tokens_in == [198, 198, 170, 160, 150, 140, 120, 110, 100, 90, 80, 70]


@pytest.mark.parametrize("fields,message", [
    ({"prune_kept": [65, 50, 55, 30], "merge_kept": [65, 40, 30, 20]},
     r"ToMeConfig.prune_kept=\[65, 50, 55, 30\] is invalid: expected .*non-increasing with depth \(layer 2 keeps 55"),
    ({"prune_kept": [65, 50, 40, 30], "merge_kept": [65, 55, 30, 20]},
     r"ToMeConfig.merge_kept=\[65, 55, 30, 20\] is invalid: expected <= prune_kept at every layer \(layer 1\)"),
    ({"prune_kept": [65, 50, 40, 30], "merge_kept": [65, 45, 30, 0]},
     r"ToMeConfig.merge_kept=\[65, 45, 30, 0\] is invalid: expected a non-empty list of positive ints"),
    ({"r": 4, "prune_kept": [65, 50, 40, 30], "merge_kept": [65, 45, 30, 20]},
     r"ToMeConfig.r=4 is invalid: expected 0 when prune_kept/merge_kept are given"),
])
def test_bad_lists_raise_naming_field_value_and_allowed(fields, message):
    with pytest.raises(ValueError, match=message):
        hf_tome.ToMeConfig(**fields)


@pytest.mark.parametrize("fields,message", [
    ({"prune_kept": [65, 50, 40], "merge_kept": [65, 45, 30]},
     r"ToMeConfig.prune_kept=\[65, 50, 40\] is invalid for this model: expected 4 entries, one per layer"),
    ({"prune_kept": [65, 50, 40, 2], "merge_kept": [65, 45, 30, 2]},
     r"ToMeConfig.prune_kept=\[65, 50, 40, 2\] is invalid for this model: expected every entry > 2"),
])
def test_lists_are_checked_against_the_model(fields, message):
    model = make_model("deit-cls")
    with pytest.raises(ValueError, match=message):
        hf_tome.apply(model, **fields)
    assert not hf_tome.is_patched(model)


def test_soft_step_with_hard_weights_equals_the_hard_step():
    torch.manual_seed(3)
    batch, tokens, protected, prune_kept, merge_kept = 3, 16, 2, 11, 7
    x, metric, scores = torch.randn(batch, tokens, 6), torch.randn(batch, tokens, 4), torch.rand(batch, tokens)
    size = torch.randint(1, 3, (batch, tokens, 1)).float()
    step = prune_and_merge(scores, metric, prune_kept, merge_kept, protected)
    hard_size = step.merge(size)
    hard = step.merge(x * size) / hard_size
    ranks = torch.arange(tokens)
    soft, soft_size = soft_prune_merge(x, size, scores, metric, (ranks < merge_kept).float(),
                                       (ranks < prune_kept).float(), merge_kept, protected)
    present = soft_size[..., 0] > 0.5
    assert present.sum(1).tolist() == [merge_kept] * batch
    torch.testing.assert_close(soft[present].reshape(batch, merge_kept, 6), hard)
    torch.testing.assert_close(soft_size[present].reshape(batch, merge_kept, 1), hard_size)


def _table() -> list[dict]:
    return [
        {"gflops": 0.0010, "fraction": 1.0, "prune_kept": [65] * 4, "merge_kept": [65] * 4, "accuracy": 0.9},
        {"gflops": 0.0007, "fraction": 0.7, "prune_kept": [65, 50, 40, 30], "merge_kept": [65, 45, 30, 20],
         "accuracy": 0.85},
        {"gflops": 0.0005, "fraction": 0.5, "prune_kept": [65, 30, 20, 15], "merge_kept": [65, 25, 15, 10],
         "accuracy": 0.8},
    ]


def test_budget_selection_picks_the_row_with_most_flops_not_above():
    table = _table()
    assert select_budget_row(table, 0.75, 0.001)["fraction"] == 0.7
    assert select_budget_row(table, 0.7, 0.001)["fraction"] == 0.7
    assert select_budget_row(table, 0.69, 0.001)["fraction"] == 0.5
    assert select_budget_row(table, 1.0, 0.001)["fraction"] == 1.0
    assert select_budget_row(table, 5.0, 0.001)["fraction"] == 1.0  # above the table: its largest row
    big = [dict(row, gflops=row["fraction"] * 10) for row in table]
    assert select_budget_row(big, 8.0, 10.0)["fraction"] == 0.7  # > 1 means GFLOPs
    with pytest.raises(ValueError, match=r"tome_budget=0.3 \(0.0003 GFLOPs\) is below the budget table, which "
                                         r"covers 0.0005 to 0.001 GFLOPs \(0.500 to 1.000 of the full model"):
        select_budget_row(table, 0.3, 0.001)


def test_budget_table_round_trip_and_set_tome_budget(tmp_path, pixels):
    model = make_model("vit-cls")
    full = hf_tome.compute_report(model).gmacs
    table = [dict(row, gflops=row["fraction"] * full) for row in _table()]
    hf_tome.apply(model, budget_table=table, extra={FULL_GFLOPS_KEY: full})
    model.save_pretrained(tmp_path)
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path, tome_budget=0.75).eval()
    assert loaded.tome_config.budget_table == table
    assert loaded.tome_config.merge_kept == [65, 45, 30, 20]
    assert _record_counts(loaded, pixels)[1] == [65, 45, 30, 20]
    assert loaded.tome_compute().gmacs <= 0.75 * full
    loaded.set_tome_budget(0.5)
    assert loaded.tome_config.merge_kept == [65, 25, 15, 10]
    loaded.set_tome_budget(0.6)
    assert loaded.tome_config.merge_kept == [65, 25, 15, 10]
    with pytest.raises(ValueError, match=r"covers .* GFLOPs \(0.500 to 1.000 of the full model"):
        loaded.set_tome_budget(0.2)
    assert loaded.tome_config.budget == 0.6  # a failed call changes nothing
    loaded.set_tome_budget(None)
    assert loaded.tome_config.prune_kept is None and loaded.tome_config.budget_table == table
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, make_model("vit-cls")(pixels).logits, atol=1e-5, rtol=0)
    # The saved budget is re-applied on load; explicit kept counts replace it.
    loaded.set_tome_budget(0.7)
    loaded.save_pretrained(tmp_path / "again")
    again = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path / "again")
    assert again.tome_config.budget == 0.7 and again.tome_config.merge_kept == [65, 45, 30, 20]
    explicit = hf_tome.AutoModelForImageClassification.from_pretrained(
        tmp_path / "again", tome_prune_kept=[65, 60, 60, 60], tome_merge_kept=[65, 60, 60, 60])
    assert explicit.tome_config.budget is None and explicit.tome_config.merge_kept == [65, 60, 60, 60]


def test_budget_without_table_raises():
    with pytest.raises(ValueError, match=r"ToMeConfig.budget=0.5 is invalid: expected a model whose config has a "
                                         r"budget_table"):
        hf_tome.apply(make_model("vit"), budget=0.5)


def test_search_space_candidates_sit_in_their_buckets():
    from hf_tome.budgets.search_space import SearchSpace, sample_candidates
    from hf_tome.integration.registry import find_adapter

    model = make_model("deit-cls")
    space = SearchSpace.for_shape(find_adapter(model).encoder_shape(model, None))
    targets = [0.8 * space.full_gmacs, 0.6 * space.full_gmacs]
    candidates = sample_candidates(space, targets, 40, seed=1)
    assert len(candidates) == 40 and {c.target for c in candidates} == {0, 1}
    for candidate in candidates:
        config = hf_tome.ToMeConfig(prune_kept=list(candidate.prune_kept), merge_kept=list(candidate.merge_kept))
        assert config.prune_kept[0] <= 66 and min(config.merge_kept) >= space.min_kept  # block 0 may be compressed
        target = targets[candidate.target]
        assert 0.95 * target <= candidate.gmacs <= target
        assert candidate.gmacs == pytest.approx(hf_tome.compute_report(hf_tome.apply(model, config)).gmacs)
    assert sample_candidates(space, targets, 40, seed=1) == candidates  # same draw in every process


@pytest.fixture
def tiny_classifier_and_data(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    model = make_model("vit-cls")
    model.save_pretrained(tmp_path / "model")
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(40)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    data = datasets.Dataset.from_dict({"image": images, "label": [i % 5 for i in range(40)]}, features=features)
    data.save_to_disk(str(tmp_path / "data"))
    return tmp_path / "model", tmp_path / "data"


@pytest.mark.parametrize("method", ["random", "diffrate"])
def test_search_end_to_end_writes_the_table(method, tiny_classifier_and_data, tmp_path, pixels):
    import json

    from hf_tome.budgets.search import main

    model_dir, data_dir = tiny_classifier_and_data
    out = tmp_path / f"out-{method}"
    main(["--model", str(model_dir), "--dataset", str(data_dir), "--targets", "0.8", "0.6", "--method", method,
          "--candidates", "6", "--search-images", "16", "--val-images", "8", "--stage-images", "8", "16",
          "--keep", "0.5", "--batch-size", "8", "--dtype", "float32", "--out", str(out), "--diffrate-steps", "2",
          "--diffrate-batch", "4"])
    payload = json.loads((out / "search.json").read_text())
    assert (out / "search.png").stat().st_size > 0
    fractions = [row["fraction"] for row in payload["rows"]]
    assert len(fractions) == 3 and fractions[-1] == 1.0 and fractions[0] <= 0.6 and fractions[1] <= 0.8
    if method == "random":
        seeds = payload["log"]["schedule"]["tome_seeds"]  # ToMe's schedules join the last stage
        assert seeds and [stage["evaluated"] for stage in payload["log"]["stages"]] == [6, 4 + len(seeds)]
    assert {row["r"] for row in payload["tome_baseline"]}
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(out / "model", tome_budget=0.8)
    assert loaded.tome_config.budget_table == payload["rows"]
    assert loaded.tome_config.merge_kept == payload["rows"][1]["merge_kept"]
    assert loaded.tome_config.merge_match == payload["rows"][1]["merge_match"]
    assert loaded.tome_compute().gmacs == pytest.approx(payload["rows"][1]["gflops"], rel=1e-5)
    with pytest.raises(ValueError, match="is below the budget table, which covers"):
        loaded.set_tome_budget(0.3)


def test_cached_evaluator_replays_block0_exactly(tiny_classifier_and_data):
    import datasets
    from accelerate import Accelerator

    from hf_tome.budgets.search_eval import CachedEvaluator

    model_dir, data_dir = tiny_classifier_and_data
    model = hf_tome.AutoModelForImageClassification.from_pretrained(model_dir)
    processor = T.AutoImageProcessor.from_pretrained(model_dir)
    evaluator = CachedEvaluator(model, datasets.load_from_disk(str(data_dir)), processor, Accelerator(),
                                torch.float32, batch_size=8, keep_pixels=True)
    full, reduced = ([65] * 4, [65] * 4), ([65, 50, 40, 30], [65, 45, 30, 20])
    replayed = evaluator.evaluate([full, reduced], 16, fidelity=True)
    from_pixels = evaluator.evaluate_from_pixels([{"prune_kept": full[0], "merge_kept": full[1]},
                                                  {"prune_kept": reduced[0], "merge_kept": reduced[1]}], 16)
    torch.testing.assert_close(replayed[:, :3], from_pixels)  # skipping block 0 changes nothing
    assert replayed[0, 3] == 0 and replayed[1, 3] > 0  # KL from the uncompressed model

"""Block-0 compression, ToMe's schedules as seeds and successive halving in the budget search (issue 18)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from conftest import make_model, mlp_norms, tokens_seen_by
from test_prune_merge import tiny_classifier_and_data  # noqa: F401 (a fixture)

import hf_tome
from hf_tome.budgets import search
from hf_tome.budgets.options import SearchOptions, halving_stages, resolve_schedule
from hf_tome.budgets.search_estimate import estimate_search
from hf_tome.budgets.search_space import Candidate, SearchSpace, sample_candidates, tome_seeds
from hf_tome.integration.budget_table import table_full_gflops
from hf_tome.integration.flops import constant_r_for_macs, decaying_r_for_macs
from hf_tome.integration.registry import find_adapter


def _space(model, **kwargs) -> SearchSpace:
    return SearchSpace.for_shape(find_adapter(model).encoder_shape(model, None), **kwargs)


# --- block 0 compressed by kept counts -------------------------------------------------------------------------


@pytest.mark.parametrize("merge_match", ["class_attention", "bipartite"])
def test_block0_compression_keeps_the_stated_tokens_and_macs(merge_match, pixels):
    model = make_model("vit-cls")  # 64 patches + the class token, 4 layers, C=32, MLP 64
    prune_kept, merge_kept = [60, 50, 40, 30], [50, 40, 30, 25]
    hf_tome.apply(model, prune_kept=prune_kept, merge_kept=merge_kept, merge_match=merge_match)
    # The norm before each MLP sees the tokens left after that block's reduction: block 0 already reduced.
    assert tokens_seen_by(mlp_norms(model), lambda: model(pixels)) == merge_kept
    report = hf_tome.compute_report(model)
    assert (report.tokens_in, report.tokens_out) == ([65, 50, 40, 30], merge_kept)
    channels, hidden = 32, 64
    expected = 64 * channels * 3 * 4 * 4 + channels * 5
    for tokens_in, tokens_out in zip(report.tokens_in, merge_kept, strict=True):
        expected += 4 * tokens_in * channels**2 + 2 * tokens_in**2 * channels + 2 * tokens_out * channels * hidden
    assert report.total_macs == expected
    assert _space(model).gmacs(prune_kept, merge_kept) == pytest.approx(report.gmacs)


def test_block0_left_alone_is_unchanged(pixels):
    model = make_model("vit-cls")
    hf_tome.apply(model, prune_kept=[65, 60, 50, 40], merge_kept=[65, 50, 45, 30])
    assert tokens_seen_by(mlp_norms(model), lambda: model(pixels)) == [65, 50, 45, 30]


def test_bipartite_reach_is_checked_in_block0_too():
    with pytest.raises(ValueError, match=r"layer 0 would merge 65 tokens down to 20, .* merge_kept\[0\] >= 33"):
        hf_tome.apply(make_model("vit-cls"), prune_kept=[65, 20, 20, 20], merge_kept=[20, 20, 20, 20],
                      merge_match="bipartite")


# --- ToMe's schedules as seeds ---------------------------------------------------------------------------------


@pytest.mark.parametrize("inflect", [0.0, -0.5, 0.5])
def test_a_tome_seed_is_tome_itself(inflect, pixels):
    model = make_model("dinov2-cls")
    space = _space(model)
    prune_kept, merge_kept = space.tome_kept_lists(6, inflect)
    with torch.no_grad():
        tome = hf_tome.apply(model, r=6, inflect=inflect)(pixels).logits
        report = hf_tome.compute_report(model)
        seeded = hf_tome.apply(model, r=0, prune_kept=prune_kept, merge_kept=merge_kept,
                               merge_match="bipartite")(pixels).logits
    torch.testing.assert_close(seeded, tome)
    assert hf_tome.compute_report(model).total_macs == report.total_macs
    assert space.tome_gmacs(6, inflect) == pytest.approx(report.gmacs)


def test_tome_seeds_sit_at_the_targets_macs_with_constant_r_for_macs():
    model = make_model("vit-cls")
    space = _space(model)
    targets = [0.8 * space.full_gmacs, 0.6 * space.full_gmacs, space.tome_gmacs(5)]  # the last: r=5's MACs exactly
    candidates = sample_candidates(space, targets, 30, seed=0, tome_inflects=[0.0, -0.5, 0.5])
    seeds = [c for c in candidates if c.is_tome_seed]
    assert seeds == tome_seeds(space, targets, [0.0, -0.5, 0.5])
    assert len([c for c in candidates if not c.is_tome_seed]) == 30  # on top of the random ones
    for index, target in enumerate(targets):
        mine = {c.origin: c for c in seeds if c.target == index}
        for inflect in (0.0, -0.5, 0.5):
            r = constant_r_for_macs(model, target * 1e9 * (1 + 1e-9), inflect=inflect)
            origin = f"tome r={r}" if inflect == 0 else f"tome r={r} inflect={inflect:g}"
            if origin not in mine:  # a repeat of another inflect's schedule at this target
                assert any(c.setting == Candidate(*space.tome_kept_lists(r, inflect), 0, 0, "bipartite").setting
                           for c in mine.values())
                continue
            seed = mine[origin]
            assert seed.merge_match == "bipartite" and seed.gmacs <= target * (1 + 1e-9)
            report = hf_tome.compute_report(model, config=hf_tome.ToMeConfig(r=r, inflect=inflect))
            assert seed.gmacs == pytest.approx(report.gmacs)
    assert any(c.origin == "tome r=5" and c.target == 2 for c in seeds)
    assert len({c.setting for c in candidates}) == len(candidates)


def test_decaying_seeds_are_the_library_schedules_at_each_target():
    model = make_model("vit-cls")
    space = _space(model)
    targets = [0.8 * space.full_gmacs, 0.5 * space.full_gmacs]
    seeds = [c for c in tome_seeds(space, targets, [], [0.7, 0.85]) if c.origin.startswith("tome decay")]
    assert {(c.origin, c.target) for c in seeds} == {(f"tome decay={d:g}", t) for d in (0.7, 0.85) for t in (0, 1)}
    for seed in seeds:
        decay = float(seed.origin.split("=")[1])
        schedule = decaying_r_for_macs(model, targets[seed.target] * 1e9 * (1 + 1e-9), decay)
        counts = hf_tome.compute_report(model, config=hf_tome.ToMeConfig(r=schedule))
        assert seed.is_tome_seed and seed.merge_match == "bipartite"
        assert list(seed.merge_kept) == counts.tokens_out and list(seed.prune_kept) == counts.tokens_in
        assert seed.gmacs == pytest.approx(counts.gmacs) and seed.gmacs <= targets[seed.target] * (1 + 1e-9)
        assert seed.merge_kept[0] < 65 and (65 - seed.merge_kept[0]) > (seed.prune_kept[-1] - seed.merge_kept[-1])
    candidates = sample_candidates(space, targets, 10, seed=0, tome_inflects=[0.0], tome_decays=[0.85])
    assert [c.origin for c in candidates if c.is_tome_seed] == [c.origin for c in tome_seeds(space, targets, [0.0],
                                                                                                [0.85])]
    protected = tome_seeds(_space(model, protect_block_0=True), [0.6 * space.full_gmacs], [], [0.85])
    assert protected[0].merge_kept[0] == 65 and protected[0].merge_kept[1] < 65


def test_first_step_seeds_fix_the_first_compressible_layer():
    model = make_model("vit-cls", num_hidden_layers=4)
    space = _space(model)
    target = 0.5 * space.full_gmacs
    seeds = tome_seeds(space, [target], [], [0.85], [20])
    assert [c.origin for c in seeds] == ["tome decay=0.85", "tome decay=0.85 first=20"]
    front = seeds[1]
    schedule = decaying_r_for_macs(model, target * 1e9 * (1 + 1e-9), 0.85, first=20)
    counts = hf_tome.compute_report(model, config=hf_tome.ToMeConfig(r=schedule))
    assert schedule[0] == 20 and list(front.merge_kept) == counts.tokens_out and front.merge_kept[0] == 65 - 20
    assert front.gmacs <= target * (1 + 1e-9)
    candidates = sample_candidates(space, [target], 4, seed=0, tome_decays=[0.85], tome_first_steps=[20])
    assert "tome decay=0.85 first=20" in [c.origin for c in candidates if c.is_tome_seed]
    protected = tome_seeds(_space(model, protect_block_0=True), [0.8 * space.full_gmacs], [], [0.85], [10])
    assert protected[1].merge_kept[0] == 65 and protected[1].merge_kept[1] == 65 - 10  # block 1 takes the step


@pytest.mark.parametrize(("steps", "decays"), [([-1], [0.8]), ([2.5], [0.8]), ([4], [])])
def test_bad_tome_first_steps_are_refused(steps, decays):
    with pytest.raises(ValueError, match=r"^tome_first_steps=\[.*\] is invalid: expected token counts >= 0, with at "
                                         r"least one of tome_decays$"):
        resolve_schedule(SearchOptions(tome_decays=decays, tome_first_steps=steps), 2)


@pytest.mark.parametrize("decays", [[0.0], [1.2, 0.8]])
def test_bad_tome_decays_are_refused(decays):
    with pytest.raises(ValueError, match=r"^tome_decays=\[.*\] are invalid: expected factors in \(0, 1\]$"):
        resolve_schedule(SearchOptions(tome_decays=decays), 2)


def test_protected_seeds_leave_block0_alone():
    space = _space(make_model("vit-cls"), protect_block_0=True)
    for seed in tome_seeds(space, [0.7 * space.full_gmacs]):
        assert seed.prune_kept[0] == seed.merge_kept[0] == 65 and seed.gmacs <= 0.7 * space.full_gmacs


# --- successive halving ------------------------------------------------------------------------------------------


class _FakeEvaluator:
    """Scores a setting by a fixed table: accuracy and KL per candidate, whatever the images."""

    def __init__(self, accuracy: dict, kl: dict) -> None:
        self.accuracy, self.kl, self.calls = accuracy, kl, []

    def evaluate(self, configs, count, description="", fidelity=False):
        self.calls.append((len(configs), count, fidelity))
        rows = [[self.accuracy[c] * count, (1 - self.accuracy[c]) * count, count, self.kl[c] * count] for c in configs]
        return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def _candidates(count: int, target: int, origin: str = "random") -> list[Candidate]:
    return [Candidate((100 + i,), (100 + i,), 1.0, target, "bipartite", origin) for i in range(count)]


def test_halving_keeps_the_best_fraction_of_every_bucket_and_returns_the_best():
    candidates = _candidates(27, 0) + _candidates(27, 1)
    kl = {c.setting: (c.prune_kept[0] * 7919 % 27) / 27 for c in candidates}  # a fixed shuffle of the ranks
    accuracy = {c.setting: 1 - kl[c.setting] + (0.01 if c.prune_kept[0] % 2 else 0) for c in candidates}
    evaluator = _FakeEvaluator(accuracy, kl)
    best, scores, stages = search.staged_random_search(evaluator, candidates, [4, 12, 36, 108], 1 / 3,
                                                       SimpleNamespace(is_main_process=False))
    # per bucket 27 -> 9 -> 3 -> 2 (a stage keeps at least 2) -> 1
    assert [(s["evaluated"], s["kept"]) for s in stages] == [(54, 18), (18, 6), (6, 4), (4, 2)]
    assert evaluator.calls == [(54, 4, True), (18, 12, True), (6, 36, True), (4, 108, False)]
    for target in (0, 1):
        bucket = sorted((c for c in candidates if c.target == target), key=lambda c: kl[c.setting])
        # every stage keeps the lowest-KL third; the last picks the most accurate of the 2 left
        finalists = bucket[:2]
        winner = max(finalists, key=lambda c: accuracy[c.setting])
        assert best[target] == winner and scores[target] == pytest.approx(accuracy[winner.setting])
    again = search.staged_random_search(_FakeEvaluator(accuracy, kl), candidates, [4, 12, 36, 108], 1 / 3,
                                        SimpleNamespace(is_main_process=False))
    assert again[0] == best  # deterministic


@pytest.mark.parametrize("seed_accuracy", [0.95, 0.5])
def test_the_chosen_row_is_never_worse_than_the_best_seed(seed_accuracy):
    randoms = _candidates(9, 0)
    seeds = [Candidate((50,), (50,), 1.0, 0, "bipartite", "tome r=4"),
             Candidate((51,), (51,), 1.0, 0, "bipartite", "tome r=4 inflect=-0.5")]
    # The seeds would lose every early stage on KL: they must still reach the last one.
    kl = {**{c.setting: 0.1 * i for i, c in enumerate(randoms)}, **{s.setting: 10.0 for s in seeds}}
    accuracy = {**{c.setting: 0.6 + 0.01 * i for i, c in enumerate(randoms)},
                seeds[0].setting: seed_accuracy, seeds[1].setting: seed_accuracy - 0.1}
    evaluator = _FakeEvaluator(accuracy, kl)
    best, scores, stages = search.staged_random_search(evaluator, [*seeds, *randoms], [4, 12, 36], 1 / 3,
                                                       SimpleNamespace(is_main_process=False))
    assert [s["evaluated"] for s in stages] == [9, 3, 2 + 2]  # the seeds join the last stage only
    finalists = stages[-1]["finalists"]
    assert {f["origin"] for f in finalists} >= {"tome r=4", "tome r=4 inflect=-0.5"}
    assert scores[0] >= max(f["accuracy"] for f in finalists if f["origin"].startswith("tome"))
    assert best[0].origin == ("tome r=4" if seed_accuracy > 0.61 else "random")


def test_halving_schedule_defaults():
    assert halving_stages(1024, 12, 3) == [13, 38, 114, 341, 1024]
    assert halving_stages(1024, 16, 2) == [16, 32, 64, 128, 256, 512, 1024]
    assert halving_stages(16, 20, 2) == [16]
    stages, keep, count = resolve_schedule(SearchOptions(), 2)
    assert (stages, keep, count) == ([13, 38, 114, 341, 1024], pytest.approx(1 / 3), 2 * 162)
    # the earlier search, and explicit values, still work
    assert resolve_schedule(SearchOptions(strategy="staged"), 2) == ([64, 256, 1024], 0.1, 10_000)
    explicit = SearchOptions(candidates=6, stage_images=[16, 8, 64], keep=0.5, search_images=16)
    assert resolve_schedule(explicit, 2) == ([8, 16], 0.5, 6)
    with pytest.raises(ValueError, match="strategy='flat' is invalid"):
        resolve_schedule(SearchOptions(strategy="flat"), 2)


def test_default_search_fits_in_about_20_minutes_on_2_cores():
    # DINOv2-S on 2 CPU threads: about 35 ms per image and candidate (README, blocks 1-11 replayed); running
    # block 0 too (it is compressed now) costs about 1/12 more at the same MACs: 38 ms.
    stages, keep, count = resolve_schedule(SearchOptions(), 2)
    estimate = estimate_search([count // 2] * 2, stages, keep, 64, 0.038, late_sizes=[3, 3])
    assert estimate.stages[0] == (324, 13, 1) and estimate.stages[-1] == (4 + 6, 1024, 16)
    assert estimate.seconds < 21 * 60


def test_estimate_counts_late_seeds_in_the_last_stage_only():
    estimate = estimate_search([9], [4, 12, 36], 1 / 3, 4, 1.0, late_sizes=[2])
    assert estimate.stages == ((9, 4, 1), (3, 12, 3), (2 + 2, 36, 9))  # a stage keeps at least 2
    assert estimate.seconds == pytest.approx(9 * 4 + 3 * 12 + 4 * 36 + 12)  # + the references of images 0-11


# --- the evaluator's block-0 cache ----------------------------------------------------------------------------


def test_cached_evaluator_runs_block0_from_its_cached_input(tiny_classifier_and_data):  # noqa: F811
    import datasets
    from accelerate import Accelerator

    from hf_tome.budgets.search_eval import CachedEvaluator

    model_dir, data_dir = tiny_classifier_and_data
    model = hf_tome.AutoModelForImageClassification.from_pretrained(model_dir)
    processor = T.AutoImageProcessor.from_pretrained(model_dir)
    evaluator = CachedEvaluator(model, datasets.load_from_disk(str(data_dir)), processor, Accelerator(),
                                torch.float32, batch_size=8, keep_pixels=True)
    block0 = ([60, 50, 40, 30], [50, 45, 30, 20], "class_attention")
    seed = (*SearchSpace.for_tokens(find_adapter(model).encoder_shape(model, None), 65).tome_kept_lists(8),
            "bipartite")
    replayed = evaluator.evaluate([block0, seed], 16)
    assert evaluator.compresses_block0(block0) and evaluator.compresses_block0(seed)
    assert not evaluator.compresses_block0(([65] * 4, [65, 50, 40, 30]))
    from_pixels = evaluator.evaluate_from_pixels([{"prune_kept": block0[0], "merge_kept": block0[1]},
                                                  {"r": 8}], 16)
    torch.testing.assert_close(replayed[:, :3], from_pixels)  # the cache changes nothing, ToMe is the seed


# --- end to end: the estimate is printed, the table holds the new rows and round-trips ----------------------


def test_default_search_prints_its_estimate_and_saves_block0_and_seed_rows(tiny_classifier_and_data, tmp_path,  # noqa: F811
                                                                            capsys):
    model_dir, data_dir = tiny_classifier_and_data
    out = tmp_path / "out"
    search.main(["--model", str(model_dir), "--dataset", str(data_dir), "--targets", "0.8", "0.6",
                 "--search-images", "16", "--val-images", "8", "--min-images", "4", "--eta", "2", "--finalists", "1",
                 "--batch-size", "8", "--dtype", "float32", "--out", str(out), "--no-baseline"])
    err = capsys.readouterr().err
    match = re.search(r"estimated search time: (<1 s|~\d+ s) \((\d+) forward passes of up to 8 images on cpu: "
                      r"8 candidates x 1 pass \(4 images\), 4 x 1 \(8 images\), (\d+) x 2 \(16 images\)", err)
    assert match and match.start() < err.index("stage 1: 8 candidates"), err[-2000:]
    payload = json.loads((out / "search.json").read_text())
    schedule = payload["log"]["schedule"]
    # 1 finalist x 2**2 per target; a stage keeps at least 2 of a bucket, so 4 reach the last stage, plus the seeds
    assert schedule["stage_images"] == [4, 8, 16] and schedule["candidates"] == 8 and schedule["tome_seeds"]
    assert int(match.group(3)) == 4 + len(schedule["tome_seeds"])
    assert [s["evaluated"] for s in payload["log"]["stages"]] == [8, 4, 4 + len(schedule["tome_seeds"])]
    rows = payload["rows"]
    assert all("origin" in row for row in rows)
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(out / "model", tome_budget=0.6)
    assert loaded.tome_config.budget_table == rows
    assert loaded.tome_compute().gmacs == pytest.approx(rows[0]["gflops"], rel=1e-5)


def test_a_table_of_block0_and_seed_rows_round_trips_through_save_and_load(tmp_path, pixels):
    model = make_model("vit-cls")
    space = _space(model)
    seed = tome_seeds(space, [0.6 * space.full_gmacs], [0.0])[0]
    rows = [{"gflops": space.full_gmacs, "fraction": 1.0, "prune_kept": [65] * 4, "merge_kept": [65] * 4,
             "origin": "full", "accuracy": 0.5},
            {"gflops": seed.gmacs, "fraction": seed.gmacs / space.full_gmacs, "prune_kept": list(seed.prune_kept),
             "merge_kept": list(seed.merge_kept), "merge_match": "bipartite", "origin": seed.origin, "accuracy": 0.4},
            {"gflops": space.gmacs([60, 50, 40, 30], [50, 45, 30, 20]), "prune_kept": [60, 50, 40, 30],
             "merge_kept": [50, 45, 30, 20], "origin": "random", "accuracy": 0.3}]
    rows[2]["fraction"] = rows[2]["gflops"] / space.full_gmacs
    config = hf_tome.ToMeConfig(budget_table=rows, budget=0.61)
    assert hf_tome.ToMeConfig.from_json_string(config.to_json_string()) == config
    hf_tome.apply(model, config)
    model.save_pretrained(tmp_path / "m")
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(tmp_path / "m")
    assert loaded.tome_config.budget_table == rows
    # no stored full GMACs: a row that leaves block 0 alone names the input's tokens
    assert table_full_gflops(loaded, loaded.tome_config) == pytest.approx(space.full_gmacs)
    assert table_full_gflops(loaded, loaded.tome_config.replace(budget_table=rows[2:])) == pytest.approx(
        space.full_gmacs)
    assert loaded.tome_config.merge_kept == list(seed.merge_kept) and loaded.tome_config.merge_match == "bipartite"
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, hf_tome.apply(make_model("vit-cls"), r=seed_r(seed))(
            pixels).logits)
    loaded.set_tome_budget(rows[2]["fraction"] + 1e-9)  # above the seed row's 0.594
    assert loaded.tome_compute().tokens_out == [50, 45, 30, 20]


def seed_r(seed: Candidate) -> int:
    """The r of a constant-r seed's origin, ``"tome r=12"``."""
    return int(seed.origin.split("=")[1])


# --- the merge rule and mode reach the candidates and the saved table (issue 19's options in the search) --------


def _search_with(merging: list[str], classifier_and_data, tmp_path):
    """Run a small search at target 0.6 with the ``merging`` flags on ``classifier_and_data`` (the fixture's
    folders); return its options (``search.json``), the saved model loaded at that budget, and an evaluator of
    that model on the search images."""
    import datasets
    from accelerate import Accelerator

    from hf_tome.budgets.search_eval import CachedEvaluator

    model_dir, data_dir = classifier_and_data
    out = tmp_path / "out"
    search.main(["--model", str(model_dir), "--dataset", str(data_dir), "--targets", "0.6", *merging,
                 "--search-images", "16", "--val-images", "8", "--min-images", "8", "--eta", "2", "--finalists", "1",
                 "--batch-size", "8", "--dtype", "float32", "--out", str(out), "--no-baseline"])
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(out / "model", tome_budget=0.6)
    evaluator = CachedEvaluator(loaded, datasets.load_from_disk(str(data_dir)), T.AutoImageProcessor.from_pretrained(
        model_dir), Accelerator(), torch.float32, batch_size=8, keep_pixels=True)
    return json.loads((out / "search.json").read_text())["options"], loaded, evaluator


def test_search_with_mlerp_scores_and_saves_mlerp(tiny_classifier_and_data, tmp_path):  # noqa: F811
    options, loaded, evaluator = _search_with(["--merge-mode", "mlerp"], tiny_classifier_and_data, tmp_path)
    assert (loaded.tome_config.merge_mode, loaded.tome_config.merge_rule) == ("mlerp", "bipartite")
    assert options["merge_mode"] == "mlerp"
    # per setting, the evaluator runs the saved mode unless the setting names another
    settings = [{"r": 12}, {"r": 12, "merge_mode": "mlerp"}, {"r": 12, "merge_mode": "mean"}]
    nll = evaluator.evaluate_from_pixels(settings, 16)[:, 1]
    assert nll[0] == nll[1] and abs(nll[0] - nll[2]) > 1e-4, nll
    evaluator.set_kept(None, None, r=12, merge_mode="mean", merge_rule="pitome")
    assert (evaluator.plan.merge_rule, evaluator.plan.merge_mode) == ("pitome", "mean")


def test_search_with_atc_scores_and_saves_the_rule(tiny_classifier_and_data, tmp_path):  # noqa: F811
    options, loaded, evaluator = _search_with(["--merge-rule", "agglomerative", "--merge-mode", "mlerp"],
                                              tiny_classifier_and_data, tmp_path)
    assert (loaded.tome_config.merge_rule, loaded.tome_config.merge_mode) == ("agglomerative", "mlerp")
    assert options["merge_rule"] == "agglomerative"
    settings = [{"r": 12}, {"r": 12, "merge_rule": "bipartite"}]
    nll = evaluator.evaluate_from_pixels(settings, 16)[:, 1]
    assert abs(nll[0] - nll[1]) > 1e-4, nll  # the saved rule is the one scored


def test_the_search_keeps_freed_memory_unless_told_not_to(monkeypatch) -> None:
    import argparse

    import hf_tome.core.allocator as allocator
    import hf_tome.evaluation.accel as accel
    from hf_tome.budgets.options import add_search_arguments
    from hf_tome.budgets.search import options_from_args, run_search

    class Reached(Exception):
        pass

    calls = []

    def stop(**_):  # the accelerator comes right after the allocator setting: stop there
        raise Reached

    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(accel, "make_accelerator", stop)
    parser = argparse.ArgumentParser()
    add_search_arguments(parser)
    for argv, expected in [([], ["kept"]), (["--no-keep-freed-memory"], [])]:
        calls.clear()
        options = options_from_args(parser.parse_args(argv))
        assert options.keep_freed_memory is (argv == [])
        with pytest.raises(Reached):
            run_search(options)
        assert calls == expected


def test_search_with_pruning_layers_scores_and_saves_them(tiny_classifier_and_data, tmp_path):  # noqa: F811
    import datasets
    from accelerate import Accelerator

    from hf_tome.budgets.search_eval import CachedEvaluator

    model_dir, data_dir = tiny_classifier_and_data
    out = tmp_path / "out"
    search.main(["--model", str(model_dir), "--dataset", str(data_dir), "--targets", "0.6", "--merge-mode", "mlerp",
                 "--prune-matched-layers", "2", "--search-images", "16", "--val-images", "8", "--min-images", "8",
                 "--eta", "2", "--finalists", "1", "--batch-size", "8", "--dtype", "float32", "--out", str(out),
                 "--no-baseline"])
    loaded = hf_tome.AutoModelForImageClassification.from_pretrained(out / "model", tome_budget=0.6)
    assert (loaded.tome_config.prune_matched_layers, loaded.tome_config.merge_mode) == (2, "mlerp")
    assert json.loads((out / "search.json").read_text())["options"]["prune_matched_layers"] == 2
    # per setting, the evaluator keeps the saved pruning layers unless the setting names others
    evaluator = CachedEvaluator(loaded, datasets.load_from_disk(str(data_dir)), T.AutoImageProcessor.from_pretrained(
        model_dir), Accelerator(), torch.float32, batch_size=8, keep_pixels=True)
    settings = [{"r": 12}, {"r": 12, "prune_matched_layers": 2}, {"r": 12, "prune_matched_layers": 0}]
    nll = evaluator.evaluate_from_pixels(settings, 16)[:, 1]
    assert nll[0] == nll[1] and abs(nll[0] - nll[2]) > 1e-4, nll
    evaluator.set_kept(None, None, r=12, prune_matched_layers=0)
    assert (evaluator.plan.prune_matched_layers, evaluator.plan.merge_mode) == (0, "mlerp")

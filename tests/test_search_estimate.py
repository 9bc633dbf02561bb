"""``hf-tome search`` says how long the random search will take before it starts, counting its passes exactly."""

from __future__ import annotations

import json
import re

import pytest
from test_prune_merge import tiny_classifier_and_data  # noqa: F401 (a fixture)

from hf_tome.budgets import search
from hf_tome.budgets.search_estimate import estimate_search, format_duration, stage_quota


@pytest.mark.parametrize("members, keep, last, quota", [
    (5000, 0.1, False, 500), (500, 0.1, False, 50), (11, 0.1, False, 2), (3, 0.5, False, 2), (1, 0.5, False, 1),
    (0, 0.5, False, 0), (50, 0.1, True, 1), (0, 0.1, True, 0),
])
def test_stage_quota(members, keep, last, quota):
    assert stage_quota(members, keep, last) == quota


def test_estimate_of_the_default_search():
    # 10,000 candidates on 2 targets, stages of 64 / 256 / 1,024 images, keep 0.1, batches of 64.
    estimate = estimate_search([5000, 5000], [64, 256, 1024], keep=0.1, batch_size=64, seconds_per_image=0.01)
    assert estimate.stages == ((10_000, 64, 1), (1000, 256, 4), (100, 1024, 16))
    assert estimate.reference_passes == 1 + 3  # the uncompressed model on images 0-63, then on 64-255
    assert estimate.passes == 10_000 + 4000 + 1600 + 4 == 15_604
    # images through the model: 10,000 x 64 + 1,000 x 256 + 100 x 1,024 + 256 references
    assert estimate.seconds == pytest.approx(998_656 * 0.01)
    assert estimate.message("cpu") == (
        "estimated search time: ~2.8 h (15,604 forward passes of up to 64 images on cpu: 10,000 candidates x 1 pass "
        "(64 images), 1,000 x 4 (256 images), 100 x 16 (1,024 images), and 4 uncompressed reference passes; "
        "0.64 s per pass of 64 images, measured); use --candidates N to shorten")


def test_estimate_with_uneven_buckets_partial_batches_and_processes():
    estimate = estimate_search([7, 2, 0], [10, 10, 25], keep=0.3, batch_size=4, seconds_per_image=0.5)
    # 9 candidates; survivors: 7 -> 3 -> 2 (at least 2 per bucket), 2 -> 2 -> 2; 10 images = 3 passes of <= 4
    assert estimate.stages == ((9, 10, 3), (5, 10, 3), (4, 25, 7))
    assert estimate.reference_passes == 3  # images 0-9 once; the second stage adds none
    assert estimate.passes == 27 + 15 + 28 + 3 == 73
    assert estimate.seconds == pytest.approx((9 * 10 + 5 * 10 + 4 * 25 + 10) * 0.5)
    assert "on cuda x 2 processes:" in estimate.message("cuda", processes=2)


@pytest.mark.parametrize("seconds, text", [(0.4, "<1 s"), (45.2, "~45 s"), (720, "~12 min"), (5399, "~90 min"),
                                           (8280, "~2.3 h"), (36_000, "~10.0 h")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_the_search_prints_its_estimate_first_and_runs_the_passes_it_counted(tiny_classifier_and_data, tmp_path,  # noqa: F811
                                                                              monkeypatch, capsys):
    from hf_tome.budgets.search_eval import CachedEvaluator

    batches: list[int] = []
    counting = {"on": False}
    logits_from_block0 = CachedEvaluator.logits_from_block0

    def counted(self, replay, hidden):
        if counting["on"]:
            batches.append(hidden.shape[0])
        return logits_from_block0(self, replay, hidden)

    staged_random_search = search.staged_random_search

    def staged(*args, **kwargs):
        counting["on"] = True
        try:
            return staged_random_search(*args, **kwargs)
        finally:
            counting["on"] = False

    monkeypatch.setattr(CachedEvaluator, "logits_from_block0", counted)
    monkeypatch.setattr(search, "staged_random_search", staged)
    model_dir, data_dir = tiny_classifier_and_data
    search.main(["--model", str(model_dir), "--dataset", str(data_dir), "--targets", "0.8", "0.6", "--candidates", "6",
                 "--search-images", "16", "--val-images", "8", "--stage-images", "8", "16", "--keep", "0.5",
                 "--batch-size", "4", "--dtype", "float32", "--out", str(tmp_path / "out"), "--no-baseline",
                 "--protect-block-0", "--tome-seeds", "--tome-decays"])  # the earlier search: no seeds, and every
    # candidate replays block 0
    err = capsys.readouterr().err
    pattern = (r"estimated search time: (<1 s|~\d+ s) \(30 forward passes of up to 4 images on cpu: 6 candidates x 2 "
               r"passes \(8 images\), 4 x 4 \(16 images\), and 2 uncompressed reference passes; [0-9.e-]+ s per pass "
               r"of 4 images, measured\); use --candidates N to shorten")
    match = re.search(pattern, err)
    assert match, err[-2000:]
    assert match.start() < err.index("stage 1: 6 candidates")  # said before the evaluation starts
    # 6 candidates x 2 passes + 4 x 4 + 2 reference passes, all of 4 images
    assert len(batches) == 30 and set(batches) == {4}
    payload = json.loads((tmp_path / "out" / "search.json").read_text())
    assert payload["log"]["estimate"]["passes"] == 30
    assert payload["log"]["estimate"]["seconds"] == pytest.approx(
        (6 * 8 + 4 * 16 + 8) * payload["log"]["estimate"]["seconds_per_image"])

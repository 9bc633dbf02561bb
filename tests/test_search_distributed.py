"""``hf-tome search`` under ``accelerate launch`` with two processes: the evaluation is sharded, the table is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_prune_merge import tiny_classifier_and_data  # noqa: F401 (a fixture)

from hf_tome.budgets.search import main

ARGS = ["--targets", "0.8", "0.6", "--candidates", "8", "--search-images", "16", "--val-images", "8",
        "--stage-images", "8", "16", "--keep", "0.5", "--batch-size", "4", "--dtype", "float32"]


@pytest.mark.slow
def test_two_processes_find_the_same_table_as_one(tiny_classifier_and_data, tmp_path):  # noqa: F811
    model_dir, data_dir = tiny_classifier_and_data
    common = ["--model", str(model_dir), "--dataset", str(data_dir), *ARGS]
    main([*common, "--out", str(tmp_path / "one")])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "hf_tome.budgets.search",
               *common, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "search.json").read_text())
    two = json.loads((tmp_path / "two" / "search.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    # Each process scored half of the images; the gathered sums pick the same rows with the same accuracies.
    assert [stage["images"] for stage in two["log"]["stages"]] == [8, 16]
    for single, sharded in zip(one["rows"], two["rows"], strict=True):
        assert sharded["prune_kept"] == single["prune_kept"] and sharded["merge_kept"] == single["merge_kept"]
        assert sharded["merge_match"] == single["merge_match"]
        assert sharded["accuracy"] == pytest.approx(single["accuracy"])

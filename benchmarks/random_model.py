"""Copy a model folder's architecture with random weights, for speed runs on machines that cannot hold the weights.

Speed does not depend on the weights' values, so a throughput or load test on a machine without the converted
checkpoint (a lent GPU machine gets only a small upload) can run the same architecture, the same config and the
same preprocessor. Accuracy numbers never come from such a copy.

    python benchmarks/random_model.py SOURCE_FOLDER OUT_FOLDER     # config.json (+ preprocessor) from SOURCE
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def random_copy(source: Path, out: Path, seed: int = 0) -> Path:
    """``out`` holding ``source``'s config and preprocessor files and freshly initialised weights."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(source)
    model = AutoModelForImageClassification.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("preprocessor_config.json",):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a folder with config.json (weights not needed)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {random_copy(args.source, args.out, args.seed)}")


if __name__ == "__main__":
    main()

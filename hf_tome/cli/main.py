"""The ``hf-tome`` command line. Each subcommand parses its arguments here and calls library code.

    hf-tome bench                     # the main job on the embedded default model (no Hub access)
    hf-tome bench --model google/vit-base-patch16-224 --dataset <saved datasets folder>
    hf-tome serve --budget full=r:0 --budget half=macs:0.5   # LitServe on 127.0.0.1:8000
    hf-tome search --targets 0.7 0.55 # prune + merge rates under FLOPs targets -> budget table in the config
    hf-tome compress --target 0.75   # few-shot DC-ViT block compression on 500 unlabeled images
    hf-tome build-default             # only build (or locate) the embedded default model
    hf-tome export onnx --model PATH --tome-r 16 OUT/   # ONNX in Optimum's layout, dynamic batch axis
    hf-tome --version

Building the parser imports no torch or transformers (the subcommands' options come from
:mod:`hf_tome.cli.args`), so ``--help`` and ``--version`` answer at once; a subcommand imports what it runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hf_tome_server.options import add_serve_arguments

from hf_tome.budgets.options import add_search_arguments
from hf_tome.core.cli_help import DefaultsHelpFormatter
from hf_tome.dcvit.options import add_compress_arguments
from hf_tome.export.options import add_export_arguments


def _add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)


def _add_bench(subparsers) -> None:
    parser = _add_parser(subparsers, "bench", "sweep r: accuracy, images/s and MACs against the unpatched model")
    parser.add_argument("--model", default=None,
                        help="local folder or Hub id of an image classifier (default: the embedded DINOv2-S "
                             "Fashion-MNIST model, built on first use)")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="'fashion-mnist' (Debian package files), a folder written by Dataset.save_to_disk, "
                             "or a Hub dataset id; needs 'image' and 'label' columns")
    parser.add_argument("--split", default="test", help="split of --dataset to evaluate")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (default: all)")
    parser.add_argument("--r", type=int, nargs="+", default=None,
                        help="constant r values to sweep (default: the r reaching each --macs-reductions factor)")
    parser.add_argument("--macs-reductions", type=float, nargs="+", default=None,
                        help="MACs reduction factors whose smallest constant r is swept (default: 1.5 2.0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 where the CPU/GPU runs it natively, else float32")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for JSON and plots")
    parser.add_argument("--no-saliency", action="store_true", help="skip the merge/unmerge saliency check")
    parser.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                        help="leave glibc malloc's thresholds alone (by default this process keeps freed memory for "
                             "the next forward pass: fewer page faults, more images/s on CPUs)")
    parser.set_defaults(run=_run_bench, extra="eval")


def _run_bench(args: argparse.Namespace) -> int:
    from hf_tome.cli.bench import BenchOptions, run_bench_job

    options = BenchOptions(model=args.model, dataset=args.dataset, split=args.split, limit=args.limit, r_values=args.r,
                           macs_reductions=args.macs_reductions, batch_size=args.batch_size, dtype=args.dtype,
                           out_dir=args.out, saliency=not args.no_saliency,
                           keep_freed_memory=args.keep_freed_memory)
    run_bench_job(options)
    return 0


def _add_build_default(subparsers) -> None:
    parser = _add_parser(subparsers, "build-default", "build (or locate) the embedded default model and print its "
                         "folder")
    parser.set_defaults(run=_run_build_default, extra="eval")


def _run_build_default(args: argparse.Namespace) -> int:
    from hf_tome.evaluation.assets.default_model import default_model_path

    print(default_model_path())
    return 0


def _add_serve(subparsers) -> None:
    parser = _add_parser(subparsers, "serve", "serve a model over HTTP with LitServe (fixed token budgets)")
    add_serve_arguments(parser)
    parser.set_defaults(run=_run_serve, extra="server")


def _run_serve(args: argparse.Namespace) -> int:
    from hf_tome_server.app import options_from_args, run_server

    run_server(options_from_args(args))
    return 0


def _add_search(subparsers) -> None:
    parser = _add_parser(subparsers, "search", "search per-layer prune + merge rates under FLOPs targets and write "
                         "the budget table into the model's config")
    add_search_arguments(parser)
    parser.set_defaults(run=_run_search, extra="methods")


def _run_search(args: argparse.Namespace) -> int:
    from hf_tome.budgets.search import options_from_args, run_search

    run_search(options_from_args(args))
    return 0


def _add_compress(subparsers) -> None:
    parser = _add_parser(subparsers, "compress", "few-shot DC-ViT block compression to a MACs target (runs under "
                         "`accelerate launch -m hf_tome.dcvit.compress` too)")
    add_compress_arguments(parser)
    parser.set_defaults(run=_run_compress, extra="methods")


def _run_compress(args: argparse.Namespace) -> int:
    from hf_tome.dcvit.compress import options_from_args, run_compress

    run_compress(options_from_args(args))
    return 0


def _add_export(subparsers) -> None:
    parser = _add_parser(subparsers, "export", "export a merged model (ToMe, prune + merge, DC-ViT) to ONNX in "
                         "Optimum's layout, with a dynamic batch axis (also `optimum-cli export hf-tome`)")
    add_export_arguments(parser)
    parser.set_defaults(run=_run_export, extra="export")


def _run_export(args: argparse.Namespace) -> int:
    from hf_tome.export.onnx import run_export
    from hf_tome.export.options import options_from_args

    return run_export(options_from_args(args))


def version() -> str:
    """The installed distribution's version, or ``hf_tome.__version__`` when running from a source tree."""
    try:
        return importlib.metadata.version("hf-tome")
    except importlib.metadata.PackageNotFoundError:
        from hf_tome import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-tome`` parser with every subcommand (imports no torch or transformers)."""
    parser = argparse.ArgumentParser(prog="hf-tome", description="Token merging for Hugging Face transformers.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hf-tome {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_bench, _add_serve, _add_search, _add_compress, _add_build_default, _add_export):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-tome`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        status = args.run(args)
    except ModuleNotFoundError as error:
        # `pip install hf-tome` alone is the ToMe library; every subcommand needs one of the extras.
        if (error.name or "").split(".")[0] in ("hf_tome", "hf_tome_server"):
            raise
        parser.exit(2, f"hf-tome {args.command}: needs the {args.extra!r} extra (module {error.name!r} is missing); "
                       f"expected it installed: pip install 'hf-tome[{args.extra}]'\n")
    print(f"hf-tome {args.command}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

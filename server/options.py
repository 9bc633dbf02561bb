"""The command-line options of ``hf-tome serve`` / ``python -m hf_tome_server``, without importing litserve or torch
(``hf-tome --help`` builds every subcommand's parser)."""

from __future__ import annotations

import argparse

# ``hf_tome_server.app.ServerOptions`` holds these defaults too; it lives in a module that imports litserve and torch,
# so
# they are written out here and tests/test_cli.py checks that both agree.
SERVE_BUDGETS = ("full=r:0", "half=macs:0.5")  # hf_tome_server.budgets.DEFAULT_BUDGET_SPECS
SERVE_MAX_BODY_BYTES = 10 * 1024 * 1024  # hf_tome_server.guard.Limits.max_body_bytes
SERVE_MAX_PIXELS = 16_000_000  # hf_tome_server.guard.Limits.max_pixels


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-tome serve`` (shared with ``python -m hf_tome_server``)."""
    parser.add_argument("--model", default=None, help="local folder or Hub id (default: the embedded default model)")
    # append to None, not to a list default: argparse would add the given budgets to the default ones
    parser.add_argument("--budget", dest="budgets", action="append", default=None,
                        help="name=spec, repeatable; spec is r:<int>[,<inflect>] or macs:<fraction>; the first is "
                             f"the default budget (default: {' '.join(SERVE_BUDGETS)})")
    parser.add_argument("--max-batch-size", type=int, default=16, help="largest dynamic batch; 1 turns batching off")
    parser.add_argument("--batch-timeout", type=float, default=0.05, help="seconds to wait to fill a batch")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                        help="dtype of the model; auto: bfloat16 where the CPU/GPU runs it natively")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the inference worker; also keeps "
                        "the server on the CPU (default: torch's choice, and a GPU where there is one)")
    parser.add_argument("--max-body-bytes", type=int, default=SERVE_MAX_BODY_BYTES,
                        help="larger request bodies are answered 413")
    parser.add_argument("--max-pixels", type=int, default=SERVE_MAX_PIXELS,
                        help="larger images (width x height) are answered 413")

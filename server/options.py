"""The command-line options of ``hf-tome serve`` / ``python -m hf_tome_server``, without importing litserve or torch
(``hf-tome --help`` builds every subcommand's parser)."""

from __future__ import annotations

import argparse

# ``hf_tome_server.app.ServerOptions`` holds these defaults too; it lives in a module that imports litserve and torch,
# so they are written out here and tests/test_cli.py checks that both agree.
SERVE_BUDGETS = ("full=r:0", "half=macs:0.5")  # hf_tome_server.budgets.DEFAULT_BUDGET_SPECS
SERVE_MAX_BODY_BYTES = 10 * 1024 * 1024  # hf_tome_server.parse.Limits.max_body_bytes
SERVE_MAX_PIXELS = 16_000_000  # hf_tome_server.parse.Limits.max_pixels
# ServerOptions, the guard, its decode pool and the HTTP protocol take these from here
SERVE_DEVICES = ("auto", "cpu", "cuda")
SERVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
SERVE_DECODE_WORKERS = 4
SERVE_DECODE_QUEUE = 64  # a burst of 64 clients (the load test) is queued, not refused
SERVE_DECODE_POOLS = ("thread", "process")
SERVE_QUEUES = ("pipe", "litserve")
# Images up to this many pixels (from their header) are prepared on the event loop: for them the hand-off to a decode
# thread costs more CPU than the work (~0.35 against ~0.2 ms for 28 x 28 -> 224 x 224), and the work stays bounded
# (at most ~1.5 ms measured, for a 128 x 128 RGB WebP, the slowest decoder here)
SERVE_INLINE_PIXELS = 128 * 128
SERVE_READ_TIMEOUT = 30.0
SERVE_MAX_HEADER_BYTES = 16 * 1024


def _at_least(minimum: float, kind: type = int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"{text} is invalid: expected at least {minimum}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-tome serve`` (shared with ``python -m hf_tome_server``)."""
    parser.add_argument("--model", default=None, help="local folder or Hub id (default: the embedded default model)")
    # append to None, not to a list default: argparse would add the given budgets to the default ones
    parser.add_argument("--budget", dest="budgets", action="append", default=None,
                        help="name=spec, repeatable; spec is r:<int>[,<inflect>] or macs:<fraction>, then optionally "
                             ",mode=mlerp, ,rule=pitome|agglomerative, ,prune=<layers> or (macs: only) "
                             ",decay=<factor> and ,first=<tokens>, e.g. half=macs:0.5,decay=0.85,mode=mlerp,prune=4; "
                             "the first is the default budget "
                             f"(default: {' '.join(SERVE_BUDGETS)})")
    parser.add_argument("--max-batch-size", type=int, default=16, help="largest dynamic batch; 1 turns batching off")
    parser.add_argument("--batch-timeout", type=float, default=0.05, help="seconds to wait to fill a batch")
    parser.add_argument("--device", default="auto", choices=SERVE_DEVICES,
                        help="where the model runs; auto: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--dtype", default="float32", choices=SERVE_DTYPES,
                        help="dtype of the model; auto: bfloat16 where the CPU/GPU runs it natively")
    parser.add_argument("--compile", action="store_true",
                        help="run the model through torch.compile (compiles each budget at start-up: slow)")
    parser.add_argument("--queues", default=SERVE_QUEUES[0], choices=SERVE_QUEUES,
                        help="how requests reach the inference workers and answers come back: pipe (multiprocessing "
                             "queues; nothing waits for another process) or litserve (LitServe's own manager queues, "
                             "a round trip to the manager process per message)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each inference worker "
                        "(default: torch's choice)")
    parser.add_argument("--workers", type=_at_least(1), default=1,
                        help="inference worker processes (LitServe's workers_per_device), each with its own copy of "
                             "the model; on a CPU, one worker per core with --threads 1 keeps every core busy while "
                             "the HTTP process takes its share (two threads of one forward wait for each other "
                             "whenever another process runs)")
    parser.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                        help="leave glibc malloc's thresholds alone in the inference worker (by default it keeps freed "
                             "memory for the next forward instead of faulting fresh pages in again; its peak memory "
                             "stays held)")
    parser.add_argument("--max-body-bytes", type=int, default=SERVE_MAX_BODY_BYTES,
                        help="larger request bodies are answered 413")
    parser.add_argument("--max-pixels", type=int, default=SERVE_MAX_PIXELS,
                        help="larger images (width x height) are answered 413")
    parser.add_argument("--decode-workers", type=_at_least(1), default=SERVE_DECODE_WORKERS,
                        help="workers that parse, decode and preprocess requests off the event loop")
    parser.add_argument("--inline-pixels", type=_at_least(0), default=SERVE_INLINE_PIXELS,
                        help="images up to this many pixels (width x height from the header) in bodies up to 64 KiB "
                             "are prepared on the event loop, where that costs less than handing them to a decode "
                             "thread; 0: every image goes to the decode pool (a process pool never runs any inline)")
    parser.add_argument("--decode-queue", type=_at_least(0), default=SERVE_DECODE_QUEUE,
                        help="requests that may wait for a decode worker; more are answered 503 with Retry-After")
    parser.add_argument("--decode-pool", default=SERVE_DECODE_POOLS[0], choices=SERVE_DECODE_POOLS,
                        help="decode workers as threads, or as processes (isolated; slower to start)")
    parser.add_argument("--read-timeout", type=_at_least(0.001, float), default=SERVE_READ_TIMEOUT,
                        help="seconds a client has to send a request's headers, and again its body; later is 408")
    parser.add_argument("--max-header-bytes", type=_at_least(1024), default=SERVE_MAX_HEADER_BYTES,
                        help="larger request lines + headers are answered 431")

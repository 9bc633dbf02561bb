"""Build and run the hf-tome LitServe server (``hf-tome serve`` or ``python -m hf_tome_server``).

Endpoints: ``POST /predict`` (JSON ``{"image": "<base64>", "budget": "half", "top_k": 5}`` or a multipart
upload with an ``image`` file field and optional ``budget``/``top_k`` fields), ``GET /health``, ``GET /info``,
``GET /budgets`` and ``GET /metrics``. Every answer of ``/predict`` other than 200 is JSON
``{"error": "<code>", "detail": "<what is wrong>"}`` (see :mod:`hf_tome_server.guard`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import litserve as ls

from hf_tome.core.cli_help import DefaultsHelpFormatter

from .api import ImageClassificationAPI
from .budgets import DEFAULT_BUDGET_SPECS
from .guard import RequestGuard
from .metrics import ServerMetrics
from .options import (
    SERVE_DECODE_POOLS,
    SERVE_DECODE_QUEUE,
    SERVE_DECODE_WORKERS,
    SERVE_INLINE_PIXELS,
    SERVE_MAX_HEADER_BYTES,
    SERVE_QUEUES,
    SERVE_READ_TIMEOUT,
    add_serve_arguments,
)
from .parse import Limits
from .pool import Preparer
from .protocol import uvicorn_settings
from .queues import PipeQueueServer


class OptionError(ValueError):
    """Settings the server cannot start with (a CUDA device where there is none, say)."""


@dataclass
class ServerOptions:
    """Everything ``hf-tome serve`` can set."""

    model: str | None = None
    budgets: list[str] = field(default_factory=lambda: list(DEFAULT_BUDGET_SPECS))
    max_batch_size: int = 16
    batch_timeout: float = 0.05
    dtype: str = "float32"
    device: str = "auto"
    compile: bool = False
    queues: str = SERVE_QUEUES[0]
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None
    workers: int = 1
    keep_freed_memory: bool = True
    limits: Limits = field(default_factory=Limits)
    timeout: float = 120.0
    decode_workers: int = SERVE_DECODE_WORKERS
    decode_queue: int = SERVE_DECODE_QUEUE
    decode_pool: str = SERVE_DECODE_POOLS[0]
    inline_pixels: int = SERVE_INLINE_PIXELS
    read_timeout: float = SERVE_READ_TIMEOUT
    max_header_bytes: int = SERVE_MAX_HEADER_BYTES


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an :class:`OptionError`."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False; a "
                          "CPU-only torch build, or no driver); expected --device cpu or --device auto")
    if name not in ("cpu", "cuda"):
        raise OptionError(f"--device {name!r} is invalid: expected auto, cpu or cuda")
    return name


def model_display_name(model: str | None) -> str:
    """What ``/info`` calls the model: its Hub id, its folder's name, never an absolute path."""
    if model is None:
        from hf_tome.evaluation.assets.default_model import default_model_folder

        return f"embedded default model ({default_model_folder().name})"
    path = Path(model)
    return path.resolve().name if path.exists() or path.is_absolute() else model


def _budget_names(specs: list[str]) -> list[str]:
    names = [spec.partition("=")[0] for spec in specs]
    if not names or any(not name for name in names):
        raise ValueError(f"budgets {specs!r} are invalid: expected one or more 'name=spec' strings")
    return names


def build_server(options: ServerOptions) -> ls.LitServer:
    """A ready-to-run ``LitServer`` with the request guard, budgets and a ``/metrics`` endpoint."""
    from transformers import AutoImageProcessor

    if options.queues not in SERVE_QUEUES:
        raise OptionError(f"--queues {options.queues!r} is invalid: expected one of {', '.join(SERVE_QUEUES)}")
    device = resolve_device(options.device)
    model = options.model
    if model is None:
        from hf_tome.evaluation.assets.default_model import default_model_path

        model = str(default_model_path())
    metrics = ServerMetrics()
    api = ImageClassificationAPI(model, options.budgets, options.dtype, options.max_batch_size,
                                 options.batch_timeout, threads=options.threads, compile=options.compile,
                                 keep_freed_memory=options.keep_freed_memory)
    names = _budget_names(options.budgets)
    # The HTTP process preprocesses (in its decode pool) with the same image processor the library uses.
    preparer = Preparer(AutoImageProcessor.from_pretrained(model), names, options.limits)
    guard = (RequestGuard, {"paths": (api.api_path,), "preparer": preparer, "metrics": metrics,
                            "decode_workers": options.decode_workers, "decode_queue": options.decode_queue,
                            "decode_pool": options.decode_pool, "read_timeout": options.read_timeout,
                            "inline_pixels": options.inline_pixels})
    metadata = {"model": model_display_name(options.model), "budgets": options.budgets, "device": device,
                "dtype": options.dtype, "compile": options.compile, "keep_freed_memory": options.keep_freed_memory,
                "workers": options.workers, "threads_per_worker": options.threads,
                "queues": "litserve"}  # PipeQueueServer says "pipe" once it has swapped them in
    server_class = PipeQueueServer if options.queues == "pipe" else ls.LitServer
    server = server_class(api, accelerator=device, timeout=options.timeout, middlewares=[guard],
                          model_metadata=metadata, workers_per_device=options.workers)

    async def metrics_endpoint() -> dict:
        return metrics.snapshot() | {"max_batch_size": options.max_batch_size,
                                     "batch_timeout": options.batch_timeout}

    async def budgets_endpoint() -> dict:
        return {"default": names[0], "budgets": options.budgets}

    server.app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    server.app.add_api_route("/budgets", budgets_endpoint, methods=["GET"])
    server.hf_tome_metrics = metrics
    return server


def run_server(options: ServerOptions) -> None:
    """Start serving (blocks until interrupted); settings it cannot start with end it with a message, not a trace."""
    try:
        server = build_server(options)
    except OptionError as error:
        raise SystemExit(f"hf-tome serve: {error}") from None
    settings = uvicorn_settings(options.read_timeout, options.max_header_bytes, server.hf_tome_metrics)
    server.run(host=options.host, port=options.port, generate_client_file=False, num_api_servers=1, **settings)


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size={args.max_batch_size} is invalid: expected an integer >= 1")
    return ServerOptions(model=args.model, budgets=args.budgets or list(DEFAULT_BUDGET_SPECS),
                         max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, dtype=args.dtype,
                         device=args.device, compile=args.compile, queues=args.queues, host=args.host,
                         port=args.port, threads=args.threads, workers=args.workers,
                         keep_freed_memory=args.keep_freed_memory,
                         limits=Limits(max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels),
                         decode_workers=args.decode_workers, decode_queue=args.decode_queue,
                         decode_pool=args.decode_pool, inline_pixels=args.inline_pixels, read_timeout=args.read_timeout,
                         max_header_bytes=args.max_header_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-tome serve", description=__doc__, formatter_class=DefaultsHelpFormatter)
    add_serve_arguments(parser)
    run_server(options_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()

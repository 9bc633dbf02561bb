"""Build and run the hf-tome LitServe server (``hf-tome serve`` or ``python -m hf_tome_server``).

Endpoints: ``POST /predict`` (JSON ``{"image": "<base64>", "budget": "half", "top_k": 5}`` or a multipart
upload with an ``image`` file field and optional ``budget``/``top_k`` fields), ``GET /health``, ``GET /info``,
``GET /budgets`` and ``GET /metrics``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import litserve as ls

from hf_tome.core.cli_help import DefaultsHelpFormatter

from .api import ImageClassificationAPI
from .budgets import DEFAULT_BUDGET_SPECS
from .guard import Limits, RequestGuard
from .metrics import ServerMetrics
from .options import add_serve_arguments


@dataclass
class ServerOptions:
    """Everything ``hf-tome serve`` can set."""

    model: str | None = None
    budgets: list[str] = field(default_factory=lambda: list(DEFAULT_BUDGET_SPECS))
    max_batch_size: int = 16
    batch_timeout: float = 0.05
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None
    limits: Limits = field(default_factory=Limits)
    timeout: float = 120.0


def _budget_names(specs: list[str]) -> list[str]:
    names = [spec.partition("=")[0] for spec in specs]
    if not names or any(not name for name in names):
        raise ValueError(f"budgets {specs!r} are invalid: expected one or more 'name=spec' strings")
    return names


def build_server(options: ServerOptions) -> ls.LitServer:
    """A ready-to-run ``LitServer`` with request validation, budgets and a ``/metrics`` endpoint."""
    model = options.model
    if model is None:
        from hf_tome.evaluation.assets.default_model import default_model_path

        model = str(default_model_path())
    metrics = ServerMetrics()
    api = ImageClassificationAPI(model, options.budgets, options.dtype, options.max_batch_size,
                                 options.batch_timeout, threads=options.threads)
    names = _budget_names(options.budgets)
    guard = (RequestGuard, {"paths": (api.api_path,), "budgets": names, "limits": options.limits,
                            "metrics": metrics})
    server = ls.LitServer(api, accelerator="cpu" if options.threads else "auto", timeout=options.timeout,
                          middlewares=[guard], model_metadata={"model": model, "budgets": options.budgets})

    async def metrics_endpoint() -> dict:
        return metrics.snapshot() | {"max_batch_size": options.max_batch_size,
                                     "batch_timeout": options.batch_timeout}

    async def budgets_endpoint() -> dict:
        return {"default": names[0], "budgets": options.budgets}

    server.app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    server.app.add_api_route("/budgets", budgets_endpoint, methods=["GET"])
    return server


def run_server(options: ServerOptions) -> None:
    """Start serving (blocks until interrupted)."""
    server = build_server(options)
    server.run(host=options.host, port=options.port, generate_client_file=False, num_api_servers=1)


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size={args.max_batch_size} is invalid: expected an integer >= 1")
    return ServerOptions(model=args.model, budgets=args.budgets or list(DEFAULT_BUDGET_SPECS),
                         max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, dtype=args.dtype,
                         host=args.host, port=args.port, threads=args.threads,
                         limits=Limits(max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hf-tome serve", description=__doc__, formatter_class=DefaultsHelpFormatter)
    add_serve_arguments(parser)
    run_server(options_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()

"""hf-tome's LitServe inference server: fixed token budgets keep dynamically batched requests rectangular."""

from .app import ServerOptions, build_server, run_server

__all__ = ["ServerOptions", "build_server", "run_server"]

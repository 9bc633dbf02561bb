"""The benchmarks' shared ``--no-keep-freed-memory`` option (see :mod:`hf_tome.core.allocator`).

Imported by the scripts next to it (``python benchmarks/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse

from hf_tome.core.allocator import keep_freed_memory


def add_allocator_option(parser: argparse.ArgumentParser, consequence: str = "") -> None:
    """``--no-keep-freed-memory``; ``consequence`` says what leaving malloc alone does to this script's rows."""
    parser.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                        help="leave glibc malloc's thresholds alone (hf_tome.core.allocator)"
                             + (f": {consequence}" if consequence else ""))


def apply_allocator_option(args: argparse.Namespace) -> bool:
    """Keep freed memory for the next forward unless the option said not to; whether the setting is in effect."""
    return keep_freed_memory() if args.keep_freed_memory else False

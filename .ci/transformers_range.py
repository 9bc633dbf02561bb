"""The transformers range that pyproject.toml declares, ``transformers>=X,<Y``: the one place it is written.

``python .ci/transformers_range.py`` prints X, the oldest supported release (.ci/run installs exactly it for the
``compat`` tests); ``--upper`` prints Y (exclusive); ``--spec`` prints ``>=X,<Y``.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def declared_range(pyproject: Path = PYPROJECT) -> tuple[str, str]:
    """(X, Y) of the ``transformers>=X,<Y`` requirement in ``pyproject``'s [project] dependencies."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    specs = [d for d in dependencies if re.match(r"transformers\s*[<>=!~]", d)]
    if len(specs) != 1:
        raise SystemExit(f"{pyproject}: expected one transformers requirement, found {specs}")
    match = re.fullmatch(r"transformers\s*>=\s*([0-9][0-9.]*)\s*,\s*<\s*([0-9][0-9.]*)", specs[0].strip())
    if match is None:
        raise SystemExit(f"{pyproject}: expected transformers>=X,<Y (both ends tested), found {specs[0]!r}")
    return match.group(1), match.group(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--upper", action="store_true", help="print the exclusive upper bound Y")
    group.add_argument("--spec", action="store_true", help="print the whole specifier >=X,<Y")
    args = parser.parse_args()
    lower, upper = declared_range()
    print(upper if args.upper else f">={lower},<{upper}" if args.spec else lower)


if __name__ == "__main__":
    main()

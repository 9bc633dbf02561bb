"""Every module imports on its own, first: no hidden import cycle that only works in one import order."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import hf_tome

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import importlib, sys
# The heavy dependencies stay loaded; only the project's modules are imported afresh each time (hf_tome's import
# hook for transformers' Auto classes must survive that too: one hook, however often hf_tome is imported).
import torch, transformers
failures = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("hf_tome", "hf_tome_server")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as error:  # report every module, not only the first failure
        failures.append(f"{name}: {type(error).__name__}: {error}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def project_modules() -> list[str]:
    names = [info.name for info in pkgutil.walk_packages(hf_tome.__path__, "hf_tome.")]
    names += [f"hf_tome_server.{path.stem}" for path in (ROOT / "server").glob("*.py") if path.stem != "__main__"]
    return sorted(names)


def test_every_module_imports_first():
    modules = project_modules()
    assert {"hf_tome.adapters.swin", "hf_tome.integration.flops", "hf_tome_server.app"} <= set(modules)
    done = subprocess.run([sys.executable, "-c", SCRIPT, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]

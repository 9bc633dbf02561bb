"""Does the newest transformers release still work with hf_tome? Evidence for widening pyproject's range.

    python .ci/newest_transformers.py                   # newest release on the index; tested only if out of range
    python .ci/newest_transformers.py --version 5.24.0  # test this release whatever the range says

Finds the newest transformers release with ``pip index versions transformers``. If it lies inside the range that
pyproject.toml declares, says so and stops (exit 0). Otherwise (or with ``--version``) it builds a throwaway virtual
environment (torch through .ci/install_torch, so HF_TOME_TORCH applies; the package's dependencies with
``transformers==V`` in place of the declared range; the package itself, editable, without dependencies), runs the
``compat`` tests there and prints, per adapter family, how many tests still match stock transformers, then the
failing test ids with their first error line. Exit status 0 when every compat test passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers_range import declared_range

ROOT = Path(__file__).resolve().parent.parent

# Adapter family of a compat test: by its file, or by the model name in its parameters (the tests name models
# "vit-cls", "dinov2-reg", "videomae-cls-token0", "swin:SwinLayer" and so on).
FAMILY_BY_FILE = {"test_swin_model": "Swin", "test_whisper_model": "Whisper"}
FAMILY_BY_MODEL = {"vit": "ViT", "deit": "DeiT", "dinov2": "DINOv2", "ast": "AST", "videomae": "VideoMAE",
                   "vivit": "ViViT", "swin": "Swin", "whisper": "Whisper"}


def newest_release() -> Version:
    """The newest final transformers release the configured index lists."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], check=True,
                         capture_output=True, text=True).stdout
    match = re.search(r"Available versions:\s*(.+)", out)
    if match is None:
        raise SystemExit(f"could not read the versions from `pip index versions transformers`:\n{out}")
    return max(Version(v.strip()) for v in match.group(1).split(","))


def family_of(file_stem: str, test_name: str) -> str:
    if file_stem in FAMILY_BY_FILE:
        return FAMILY_BY_FILE[file_stem]
    words = [word.lower() for word in re.split(r"[-:\[\]]", test_name)]
    for word in words:
        if word in FAMILY_BY_MODEL:
            label = FAMILY_BY_MODEL[word]
            if word == "dinov2" and ("reg" in words or any("withregisters" in w for w in words)):
                label += " with registers"
            if file_stem == "test_blocks":
                label += " (DC-ViT blocks)"
            return label
    return file_stem.removeprefix("test_")


def package_requirements(transformers_version: str) -> list[str]:
    """pyproject's dependencies and dev extras, with ``transformers==V`` in place of the declared range."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [f"transformers=={transformers_version}" if re.match(r"transformers\s*[<>=!~]", r) else r
            for r in requirements]


def build_venv(venv: Path, transformers_version: str) -> Path:
    python = venv / "bin" / "python"
    print(f"== virtual environment {venv}: torch, then hf-tome with transformers=={transformers_version}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(["bash", str(ROOT / ".ci" / "install_torch")], check=True, env={**os.environ, "PYTHON": str(python)})
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *package_requirements(transformers_version)], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    return python


def run_compat(python: Path, junit: Path) -> int:
    installed = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                               check=True, capture_output=True, text=True).stdout.strip()
    print(f"== compat tests: python -m pytest -q -m compat with transformers {installed}", flush=True)
    command = [str(python), "-m", "pytest", "-q", "-m", "compat", "-p", "no:cacheprovider", "--tb=short",
               f"--junitxml={junit}"]
    return subprocess.run(command, cwd=ROOT).returncode


def summarize(junit: Path, transformers_version: str) -> bool:
    """Prints the family table and the failures; True when every test passed."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    failures: list[tuple[str, str]] = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        file_stem = case.get("classname", "").rpartition(".")[2]
        name = case.get("name", "")
        family = family_of(file_stem, name)
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            counts[family]["failed"] += 1
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failures.append((f"tests/{file_stem}.py::{name}", message[0][:160] if message else ""))
        elif case.find("skipped") is not None:
            counts[family]["skipped"] += 1
        else:
            counts[family]["passed"] += 1
    print(f"\nAdapter families on transformers {transformers_version} (compat tests: equal to stock transformers)")
    width = max([len("family"), *map(len, counts)])
    print(f"{'family':<{width}}  passed  failed  skipped  result")
    for family in sorted(counts):
        c = counts[family]
        result = "matches stock" if c["failed"] == 0 and c["passed"] else "FAILS"
        print(f"{family:<{width}}  {c['passed']:>6}  {c['failed']:>6}  {c['skipped']:>7}  {result}")
    for test_id, message in failures:
        print(f"FAILED {test_id}: {message}")
    return bool(counts) and not failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", help="test this transformers release even if it lies inside the range")
    parser.add_argument("--keep", action="store_true", help="keep the virtual environment (its path is printed)")
    args = parser.parse_args()

    lower, upper = declared_range()
    spec = f">={lower},<{upper}"
    declared = SpecifierSet(spec)
    if args.version:
        version = Version(args.version)
        where = "inside" if version in declared else "outside"
        print(f"transformers {version} (given) lies {where} the declared range {spec}")
    else:
        version = newest_release()
        if version in declared:
            print(f"newest transformers release {version} lies inside the declared range {spec}: nothing to do "
                  f"(--version V tests a release anyway)")
            return
        print(f"newest transformers release {version} lies outside the declared range {spec}: testing it")

    venv = Path(tempfile.mkdtemp(prefix=f"hf-tome-transformers-{version}."))
    try:
        python = build_venv(venv, str(version))
        junit = venv / "compat.xml"
        returncode = run_compat(python, junit)
        if returncode == 5 or not junit.exists():
            raise SystemExit(f"pytest collected no compat tests (exit status {returncode})")
        ok = summarize(junit, str(version))
    finally:
        if args.keep:
            print(f"kept {venv}")
        else:
            subprocess.run(["rm", "-rf", str(venv)], check=False)
    if ok and version not in declared:
        print(f"every family matches stock on {version}: the range in pyproject.toml can be widened to include it")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""glibc malloc kept from returning freed memory: the mallopt calls, and forward passes that stop faulting."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

from hf_tome.core.allocator import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MMAP_THRESHOLD_MAX,
    TRIM_THRESHOLD_MAX,
    keep_freed_memory,
)

# Minor page faults per forward of a small Dinov2 with merging, in a fresh process (the setting is process-wide, so
# it is measured where nothing else has run).
FAULTS_PER_FORWARD = """
import resource, sys, torch
torch.set_num_threads(2)
from hf_tome.core.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import hf_tome
from transformers import Dinov2Config, Dinov2ForImageClassification
config = Dinov2Config(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                      image_size=224, patch_size=14)
model = Dinov2ForImageClassification(config).eval()
hf_tome.apply(model, hf_tome.ToMeConfig(r=16))
pixels = torch.randn(8, 3, 224, 224)
with torch.inference_mode():
    for _ in range(3):
        model(pixel_values=pixels)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        model(pixel_values=pixels)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or "libc.so.6" != ctypes.util.find_library("c"),
                           reason="glibc's mallopt only")


def _faults(mode: str) -> tuple[str, float]:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_FORWARD, mode], capture_output=True, text=True,
                            check=True)
    applied, faults = result.stdout.split()
    return applied, float(faults)


@glibc
def test_a_forward_reuses_freed_memory_instead_of_faulting_in_fresh_pages() -> None:
    applied, kept = _faults("keep")
    default_applied, default = _faults("default")
    assert (applied, default_applied) == ("True", "False")
    # Measured: 80 to 110 faults per forward with the thresholds raised; by default about 870, or none when
    # glibc's adaptive threshold had already risen in that process (its history decides: CI saw 0 by default and 82
    # kept), so only the kept side has a fixed bound; the default side is only reported.
    assert kept < 400, (kept, default)


class _FakeLibc:
    """Records mallopt calls; answers 1 (done) or 0 (refused) as glibc does."""

    def __init__(self, answers: dict[int, int]) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answers = answers

        def mallopt(parameter: int, value: int) -> int:
            self.calls.append((parameter, value))
            return self.answers.get(parameter, 1)

        self.mallopt = mallopt


@pytest.mark.parametrize("answers, expected", [({}, True), ({M_MMAP_THRESHOLD: 0}, False),
                                               ({M_TRIM_THRESHOLD: 0}, False)])
def test_the_mmap_threshold_is_raised_before_the_trim_threshold(monkeypatch, answers, expected) -> None:
    import hf_tome.core.allocator as allocator

    libc = _FakeLibc(answers)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    assert keep_freed_memory() is expected
    # the trim threshold alone would turn glibc's adaptive mmap threshold off: it is never set without the other
    wanted = [(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX)]
    assert libc.calls == (wanted[:1] if answers.get(M_MMAP_THRESHOLD) == 0 else wanted)


def test_without_a_c_library_nothing_changes(monkeypatch) -> None:
    import hf_tome.core.allocator as allocator

    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert keep_freed_memory() is False


def test_thresholds_outside_what_glibc_takes_are_refused() -> None:
    with pytest.raises(ValueError, match=rf"mmap_threshold=0 and trim_threshold={TRIM_THRESHOLD_MAX} are invalid: "
                                         rf"expected 1..{MMAP_THRESHOLD_MAX} and 1..{TRIM_THRESHOLD_MAX} bytes"):
        keep_freed_memory(mmap_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold=2147483648 are invalid"):
        keep_freed_memory(trim_threshold=2**31)

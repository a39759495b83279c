"""Peak memory is measured per run (a reset forgets an earlier, larger peak of the same process), and
``cpu_malloc_mmap_threshold_kb`` makes freed activations leave the resident set."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mtpeft.utils.memory import PROC_CLEAR_REFS, peak_memory_mb, reset_peak_memory, set_malloc_mmap_threshold


@pytest.mark.skipif(not PROC_CLEAR_REFS.exists(), reason="needs Linux procfs (/proc/self/clear_refs)")
def test_reset_forgets_an_earlier_peak() -> None:
    assert reset_peak_memory()
    before = peak_memory_mb()["cpu_peak_rss_mb"]
    big = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
    during = peak_memory_mb()["cpu_peak_rss_mb"]
    del big
    assert during - before > 250
    assert reset_peak_memory()
    after = peak_memory_mb()
    assert after["cpu_peak_rss_scope"] == "run" and after["cpu_peak_rss_mb"] < during - 250


PROBE = """
import sys, torch
from mtpeft.utils.memory import current_rss_mb, set_malloc_mmap_threshold
kb = None if sys.argv[1] == "none" else int(sys.argv[1])
fixed = set_malloc_mmap_threshold(kb)
torch.ones(4 * 2**20 // 4)  # a 4 MB block, freed: glibc's dynamic threshold rises to 4 MB
blocks = [torch.ones(2**20 // 4) for _ in range(300)]  # 300 x 1 MB, touched
peak = current_rss_mb()
del blocks[:-1]  # the last block stays, pinning the top of the heap
print(fixed, peak - current_rss_mb())
"""


def _released_mb(threshold: str) -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, threshold], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not PROC_CLEAR_REFS.exists(), reason="needs Linux procfs")
def test_fixed_mmap_threshold_returns_freed_blocks_to_the_os() -> None:
    """With glibc's dynamic threshold, freed 1 MB tensors stay resident; with a fixed 128 KiB one they
    are unmapped on free (one process per setting: mallopt is process-wide)."""
    fixed, released = _released_mb("128")
    if not fixed:
        pytest.skip("not glibc: mallopt is unavailable")
    _, kept = _released_mb("none")
    assert released > 250 and kept < 50, (released, kept)


@pytest.mark.parametrize("value", [0, -1, 10**9, 1.5, True, "128"])
def test_bad_mmap_threshold_names_the_key(value) -> None:
    with pytest.raises(ValueError, match=r"cpu_malloc_mmap_threshold_kb=.*1\.\.32768"):
        set_malloc_mmap_threshold(value)

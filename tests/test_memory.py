"""Peak memory is measured per run: a reset forgets an earlier, larger peak of the same process."""

from __future__ import annotations

import pytest
import torch

from mtpeft.utils.memory import PROC_CLEAR_REFS, peak_memory_mb, reset_peak_memory


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

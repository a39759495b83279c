"""Peak memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""

from __future__ import annotations

import resource
import sys


def peak_memory_mb() -> dict[str, float]:
    import torch

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss_kb / 1024 / (1024 if sys.platform == "darwin" else 1)
    result = {"cpu_peak_rss_mb": round(rss_mb, 1)}
    if torch.cuda.is_available():
        result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result

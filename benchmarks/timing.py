"""The benchmarks' timer: the median of a function's calls, in milliseconds."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, device_type: str, *, reps: int = 3, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """On CUDA ``triton.testing.do_bench`` (``warmup_ms`` and ``rep_ms`` of calls: a step longer
    than ``rep_ms`` is timed once, so pass more for long steps); elsewhere one warm-up call (it
    compiles) and ``reps`` timed calls with ``time.perf_counter``."""
    if device_type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

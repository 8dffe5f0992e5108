"""Variants timed in interleaved rounds, so that a drift of the GPU's clock hits all of them alike;
and the kernels of one call by time (``print_profile``).

One ``do_bench`` of a 50 ms call at its default 100 ms is the median of two calls, and the same
variant timed twice in one process was seen 8% apart on an H200 (results/h200-2026-12-01b/
epilogue_variants.log). Here each round times every variant once (``rep_ms`` of calls, median),
and a variant's figure is the median over the rounds, with the rounds' spread beside it. (The logs of
results/h200-2026-12-01c and -e were taken with every round in the same order.)
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from triton.testing import do_bench


def interleaved_ms(variants: dict[str, Callable[[], object]], rounds: int = 3,
                   rep_ms: float = 500.0) -> dict[str, list[float]]:
    """{label: [median ms of each round]}; every variant runs once per round, in the given order in
    even rounds and the reverse order in odd ones (so that no variant always follows the same one)."""
    times = {label: [] for label in variants}
    for r in range(rounds):
        for label, fn in (variants.items() if r % 2 == 0 else reversed(variants.items())):
            times[label].append(do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))
    return times


def summary(samples: list[float], unit_ms: float) -> str:
    """'median ms, in units of unit_ms, (min-max over the rounds)'."""
    mid = statistics.median(samples)
    return f"{mid:7.2f} ms  {mid / unit_ms:5.3f} T  (rounds {min(samples):.2f}-{max(samples):.2f})"


def print_profile(run: Callable[[], object], label: str, rows: int = 6) -> None:
    """The CUDA kernels of one call of ``run`` (after one untimed call) by total time."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(f"  profile, {label}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows), flush=True)

"""Study (issue 30): where the kept-logits path's fw+bw time goes at the Qwen-like head.

    python -m benchmarks.study_rl_profile [--regime lm]

Per method (auto, exact, torch.compile): two warm calls, then 5 profiled fw+bw calls; prints the
wall time per call, the GPU kernel time per call and the kernels by total time.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cce_inductor.testing import make_inputs

from .rl_bench import cce_loss, plain_loss

CALLS = 5


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--regime", default="uniform")
    p.add_argument("--methods", nargs="+", default=["auto", "exact", "torch.compile"])
    args = p.parse_args()
    n, d, v = 16384, 3584, 151936
    inp = make_inputs(args.regime, n, d, v, dtype=torch.bfloat16, device="cuda", seed=0)
    e = inp.e.detach().requires_grad_()
    c = inp.c.detach().requires_grad_()
    adv = torch.randn(n, device="cuda")
    methods = {"auto": cce_loss, "exact": functools.partial(cce_loss, max_workspace_bytes=0),
               "torch.compile": torch.compile(plain_loss, fullgraph=True)}
    for name, fn in methods.items():
        if name not in args.methods:
            continue
        def step():
            e.grad = c.grad = None
            fn(e, c, inp.targets, adv).backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(CALLS):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / CALLS * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(CALLS):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernel_ms = sum(ev.device_time_total for ev in events) / CALLS / 1e3
        print(f"\n=== {name} ({args.regime}): wall {wall:.2f} ms per fw+bw call, GPU kernels {kernel_ms:.2f} ms")
        print(events.table(sort_by="device_time_total", row_limit=14, max_name_column_width=70))
        e.grad = c.grad = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Where the exact backward's time goes: the buffered path (dz buffer + cuBLAS) against the atomic path.

    python -m benchmarks.backward_profile [--shapes N,D,V ...]

bf16, LM-like inputs, grad_loss = 1/N. For each shape: median time of each path (``do_bench``), and
the buffered path's CUDA kernels by total time (torch.profiler), so that a slow piece -- the
recompute kernel, the mixed-precision addmm into the dE accumulator, the dC GEMMs, launch gaps --
shows by name. Prints only; numbers worth keeping go to docs/PERF_NOTES.md with the device.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from cce_inductor.kernels import lce_backward, lce_forward
from cce_inductor.testing import make_inputs

DEFAULT_SHAPES = ["8192,512,32768", "8192,2304,256000"]


def profile_shape(n: int, d: int, v: int) -> None:
    inp = make_inputs("lm", n, d, v, device="cuda", seed=0)
    e, c, y = inp.e, inp.c, inp.targets
    _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    g = torch.full((n,), 1.0 / n, device="cuda")
    zero = torch.zeros_like(g)

    def backward(buffered: bool):
        return lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, False, True, True, False, buffered=buffered)

    gemm_ms = do_bench(lambda: e @ c.T)
    times = {name: do_bench(lambda b=b: backward(b)) for name, b in (("buffered", True), ("atomic", False))}
    print(f"N={n} D={d} V={v}: T (e @ c.T) {gemm_ms:.2f} ms; backward " +
          ", ".join(f"{k} {t:.2f} ms ({t / gemm_ms:.2f} T)" for k, t in times.items()), flush=True)
    backward(True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        backward(True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="N,D,V triples")
    args = parser.parse_args(argv)
    for shape in args.shapes:
        profile_shape(*map(int, shape.split(",")))


if __name__ == "__main__":
    main()

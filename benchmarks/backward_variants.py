"""The buffered backward's variants side by side: chunk widths that fill whole waves, and the filter.

    python -m benchmarks.backward_variants [--shapes N,D,V ...] [--regimes lm uniform]

bf16. Per shape and data regime, median times (``do_bench``) of the backward in units of T = the
cuBLAS logits GEMM measured first in the same process:
  * exact, chunks of CHUNK_V and chunks narrowed to fill whole waves (backward.WAVE_ALIGNED_CHUNKS);
  * filtered (dE's GEMM over the kept tiles only, ``_filtered_de_kernel``) at filter_eps = 0 (every
    tile kept: the Triton GEMM against cuBLAS's), the default FILTER_EPS, 2^-2, and 1e9 (every tile
    skipped: the filtered path's floor), each with the fraction s of tiles skipped.
Prints only; numbers worth keeping go to docs/PERF_NOTES.md with the device.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from triton.testing import do_bench

from cce_inductor.kernels import FILTER_EPS, backward, lce_backward, lce_forward
from cce_inductor.testing import make_inputs

SHAPES = ("8192,2304,256000", "8192,4096,128256")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="N,D,V each")
    parser.add_argument("--regimes", nargs="+", default=["lm", "uniform"], choices=("lm", "uniform"))
    args = parser.parse_args(argv)
    for shape in args.shapes:
        n, d, v = map(int, shape.split(","))
        for regime in args.regimes:
            inp = make_inputs(regime, n, d, v, device="cuda", seed=0)
            e, c, y = inp.e, inp.c, inp.targets
            g = torch.full((n,), 1.0 / n, device="cuda")
            zero = torch.zeros_like(g)
            _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
            gemm_ms = do_bench(lambda: e @ c.T, return_mode="median")
            print(f"N={n} D={d} V={v} {regime}: T (e @ c.T) {gemm_ms:.2f} ms", flush=True)

            def backward_ms(filter_grad, **options):
                run = lambda: lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0,  # noqa: E731
                                           filter_grad, True, True, False, **options)
                return do_bench(run, return_mode="median")

            def show(label, ms, extra=""):
                print(f"  {label:<34} {ms:7.2f} ms  {ms / gemm_ms:5.2f} T{extra}", flush=True)

            with mock.patch.object(backward, "WAVE_ALIGNED_CHUNKS", False):
                show("exact, chunks of CHUNK_V", backward_ms(False))
            exact_ms = backward_ms(False)
            show("exact, wave-aligned chunks", exact_ms)
            for eps in (0.0, FILTER_EPS, 2.0**-2, 1e9):
                counts = torch.zeros(2, dtype=torch.int32, device="cuda")
                lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, True, True, True, False,
                             filter_eps=eps, tile_counts=counts)
                kept, skipped = counts.tolist()
                ms = backward_ms(True, filter_eps=eps)
                show(f"filtered, eps {eps:g}", ms, f"  s {skipped / max(1, kept + skipped):.3f}  "
                     f"({ms / exact_ms:.3f} x exact)")


if __name__ == "__main__":
    main()

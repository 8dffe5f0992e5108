"""The forward's program grouping side by side: how many token tiles the resident programs share.

    python -m benchmarks.forward_variants [--shapes N,D,V ...] [--regimes lm uniform] [--groups 4 8 ...]

bf16. The forward's programs walk groups of G token tiles x every vocabulary split (the token tile
fastest), so a wave of programs reads about G tiles of E and (programs / G) runs of C. G = the number
of token tiles is the earlier order (all token tiles of a split, then the next split): a wave then
reads all of E (67 MB at D = 4096, more than the 50 MB L2). Per shape and regime: T = the cuBLAS
logits GEMM, then the package forward (``lce_forward``) at each G in units of T (medians over
interleaved rounds, ``benchmarks/rounds.py``), after a check that loss and lse are the same bits at
every G. Prints only.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import triton
from triton.testing import do_bench

from cce_inductor.kernels import lce_forward
from cce_inductor.kernels.common import forward_config

from .points import add_point_arguments, points
from .rounds import interleaved_ms, summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_point_arguments(parser)
    parser.add_argument("--groups", nargs="+", type=int, default=[4, 8, 16, 32, 0],
                        help="token tiles per group; 0 = all of them (the earlier order)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (benchmarks/rounds.py)")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for n, d, v, regime, inp in points(args):
        e, c, y = inp.e, inp.c, inp.targets
        gemm_ms = do_bench(lambda: e @ c.T, return_mode="median")
        base = forward_config(e)
        n_tiles = triton.cdiv(n, base.block_n)
        print(f"N={n} D={d} V={v} {regime}: T (e @ c.T) {gemm_ms:.2f} ms; default group {base.group_n}", flush=True)
        runs = {}
        for group in args.groups:
            cfg = dataclasses.replace(base, group_n=group or n_tiles)
            label = f"group {group}" if group else f"group {n_tiles} (all token tiles)"
            runs[label] = lambda cfg=cfg: lce_forward(e, c, None, y, -100, 0.0, 0.0, config=cfg)
        first = None
        for label, run in runs.items():  # the same bits at every grouping
            out = run()
            if first is not None and not all(torch.equal(a, b) for a, b in zip(out, first)):
                print(f"  {label}: DIFFERENT BITS", flush=True)
            first = first or out
        for label, samples in interleaved_ms(runs, args.rounds).items():
            print(f"  {label:<30} {summary(samples, gemm_ms)}", flush=True)


if __name__ == "__main__":
    main()

"""Where the gradient filter pays: forward + backward against the skipped fraction s.

    python -m benchmarks.filter_threshold [--shapes N,D,V ...] [--scales 0.6 0.8 ...] [--rounds 3]

LM-like inputs (``testing.make_inputs``, bf16, seed 0) with E scaled by each ``--scales`` factor (a
larger factor, a more peaked softmax, a larger s; the targets stay the unscaled data's). Per scale:
s (``kernels.skipped_fraction``), then in interleaved rounds (benchmarks/rounds.py) the op's forward
+ backward, mean loss, in units of T = the cuBLAS logits GEMM of the same process: exact mode;
``exact=False`` and ``exact=False, filter_dc=True`` with their filter on in every call
(``filter_choice.MIN_SKIPPED`` = 0). ``filter_choice`` runs the filter where the latest s is at least
MIN_SKIPPED: the s at which the filtered rows cross exact mode's is where that threshold belongs.
Scales whose s is outside ``--s-range`` are reported and not timed. Prints only; numbers worth
keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import triton
from triton.testing import do_bench

import cce_inductor
from cce_inductor import filter_choice
from cce_inductor.kernels import skipped_fraction
from cce_inductor.testing import make_inputs

from .points import GOAL_SHAPES
from .rounds import interleaved_ms, summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(GOAL_SHAPES), help="N,D,V each")
    parser.add_argument("--scales", nargs="+", type=float, default=[0.7, 0.8, 0.9, 1.0, 1.15, 1.3, 1.5])
    parser.add_argument("--s-range", nargs=2, type=float, default=[0.01, 0.35])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for shape in args.shapes:
        n, d, v = map(int, shape.split(","))
        base = make_inputs("lm", n, d, v, device="cuda", seed=0)
        c = base.c.detach().requires_grad_()
        gemm_ms = do_bench(lambda: base.e @ c.detach().T, return_mode="median")
        print(f"\n=== N={n} D={d} V={v} LM-like: T (e @ c.T) {gemm_ms:.2f} ms", flush=True)
        for scale in args.scales:
            e = (base.e.float() * scale).to(base.e.dtype).requires_grad_()
            s = skipped_fraction(e.detach(), c.detach(), base.targets)
            if not args.s_range[0] <= s <= args.s_range[1]:
                print(f"  scale {scale}: s = {s:.3f}, outside {args.s_range}: not timed", flush=True)
                continue

            def step(**options):
                def call():
                    e.grad = c.grad = None
                    with mock.patch.object(filter_choice, "MIN_SKIPPED", 0.0):
                        cce_inductor.linear_cross_entropy(e, c, base.targets, impl="triton", **options).backward()
                return call

            variants = {"exact": step(), "exact=False": step(exact=False),
                        "exact=False, filter_dc": step(exact=False, filter_dc=True)}
            for fn in variants.values():  # compile
                fn()
            times = interleaved_ms(variants, rounds=args.rounds)
            print(f"  scale {scale}: s = {s:.3f}", flush=True)
            for label, samples in times.items():
                print(f"    {label:<24} {summary(samples, gemm_ms)}", flush=True)
            del e


if __name__ == "__main__":
    main()

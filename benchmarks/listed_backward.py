"""The filtered backward that skips the recompute of skipped tiles, against the filtered paths that recompute all.

    python -m benchmarks.listed_backward [--shapes N,D,V ...] [--regimes lm uniform] [--rounds 3]
                                         [--no-errors] [--profile]

bf16, mean loss (grad_loss = 1/N, grad_lse = 0). Per point, in interleaved rounds
(benchmarks/rounds.py), in units of T = the cuBLAS logits GEMM of the same process:

* forward: ``lce_forward`` against ``lce_forward_with_keep`` (the per-token tile log-sum-exps and the
  keep flags formed from them);
* backward: exact; filtered with dC by cuBLAS (the default filter) and with the corrected dC (both
  recompute every tile and flag them in the dz kernel); listed (``lce_backward(keep=...)``: the
  forward's flags, only the kept tiles recomputed, dC dropped where skipped);
* forward + backward of exact, filtered (default), corrected and listed.

Then s (the fraction of tiles skipped) by the dz kernel's flags and by the forward's, how many
flags differ, and (unless --no-errors) each gradient's error against float64 math on the same bf16
inputs (reference.chunked_backward). ``--profile``: the listed backward's kernels by time.
Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse

import torch
import triton
from triton.testing import do_bench

from cce_inductor import reference
from cce_inductor.kernels import FILTER_EPS, lce_backward, lce_forward
from cce_inductor.kernels.forward import lce_forward_with_keep

from .points import add_point_arguments, points
from .rounds import interleaved_ms, print_profile, summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_point_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--errors", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for n, d, v, regime, inp in points(args):
        e, c, y = inp.e, inp.c, inp.targets
        g = torch.full((n,), 1.0 / n, device="cuda")
        zero = torch.zeros_like(g)
        _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
        _, lse_k, keep = lce_forward_with_keep(e, c, None, y, -100, FILTER_EPS)
        gemm_ms = do_bench(lambda: e @ c.T, return_mode="median")
        print(f"N={n} D={d} V={v} {regime}: T (e @ c.T) {gemm_ms:.2f} ms; lse of the two forwards differ by "
              f"{float((lse - lse_k).abs().max()):.1e}", flush=True)

        def backward(mode, lse=lse, keep=keep):
            filter_grad = mode != "exact"
            options = {"filtered": {}, "corrected": {"dc_filter": "corrected"}, "listed": {"keep": keep}}.get(mode, {})
            return lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, filter_grad, True, True, False, **options)

        def step(mode):
            def run():
                if mode == "listed":
                    _, lse_s, keep_s = lce_forward_with_keep(e, c, None, y, -100, FILTER_EPS)
                    return backward(mode, lse_s, keep_s)
                _, lse_s = lce_forward(e, c, None, y, -100, 0.0, 0.0)
                return backward(mode, lse_s)
            return run

        groups = {
            "forward": {"forward": lambda: lce_forward(e, c, None, y, -100, 0.0, 0.0),
                        "forward with keep flags": lambda: lce_forward_with_keep(e, c, None, y, -100, FILTER_EPS)},
            "backward": {mode: (lambda mode=mode: backward(mode)) for mode in ("exact", "filtered", "corrected", "listed")},
            "fw+bw": {mode: step(mode) for mode in ("exact", "filtered", "corrected", "listed")},
        }
        for group, variants in groups.items():
            for label, samples in interleaved_ms(variants, rounds=args.rounds).items():
                print(f"  {group:<8} {label:<26} {summary(samples, gemm_ms)}", flush=True)

        counts = {}
        for mode, options in (("dz kernel", {}), ("forward", {"keep": keep})):
            counts[mode] = torch.zeros(2, dtype=torch.int32, device="cuda")
            lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, True, True, True, False,
                         tile_counts=counts[mode], **options)
        s = {mode: t[1].item() / max(1, t.sum().item()) for mode, t in counts.items()}
        print(f"  s: by the dz kernel's flags {s['dz kernel']:.4f}, by the forward's {s['forward']:.4f} "
              f"({float(keep.float().mean()):.4f} kept)", flush=True)
        if args.errors:
            gold = reference.chunked_backward(e.float(), c.float(), None, y, lse, g, zero, -100, 0.0, 0.0,
                                              True, True, False)
            for mode in ("exact", "filtered", "corrected", "listed"):
                grads = backward(mode)
                errs = [float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(grads[:2], gold[:2])]
                print(f"  {mode}: against float64 dE {errs[0]:.2e} dC {errs[1]:.2e}", flush=True)
            del gold
        if args.profile:
            print_profile(lambda: backward("listed"), "listed backward")


if __name__ == "__main__":
    main()

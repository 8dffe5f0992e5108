"""The filtered dE GEMM with its last partial wave of tiles cut into pieces along K, against whole tiles.

    python -m benchmarks.de_last_wave [--shapes N,D,V ...] [--regimes lm uniform] [--rounds 3] [--profile]

bf16, mean loss (grad_loss = 1/N, grad_lse = 0). Per point, in interleaved rounds
(benchmarks/rounds.py), in units of T = the cuBLAS logits GEMM of the same process, the backward:
exact; filtered with dC by cuBLAS (the default filter) and listed (the forward's keep flags,
``filter_dc``), each with the dE GEMM's last wave in pieces (``SPLIT_LAST_DE_WAVE``, the default;
the filtered path then takes the exact path's windows) and with whole tiles only (the schedule kept
for torch's deterministic mode, with windows sized to its waves). Each variant's window and chunk,
s (the fraction of tiles skipped), and dE's difference between the two schedules and against
float64 math (reference.chunked_backward). ``--profile``: the filtered backward's kernels by time
under each schedule. (Its first logs, results/h200-2026-12-01l/stream_k_de*.log, were taken when
it compared a stream-K version of the dE GEMM, since removed.) Prints only; numbers worth keeping
go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import triton
from triton.testing import do_bench

from cce_inductor import reference
from cce_inductor.kernels import FILTER_EPS, backward, lce_backward, lce_forward
from cce_inductor.kernels.forward import lce_forward_with_keep

from .points import add_point_arguments, points
from .rounds import interleaved_ms, print_profile, summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_point_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for n, d, v, regime, inp in points(args):
        e, c, y = inp.e, inp.c, inp.targets
        g = torch.full((n,), 1.0 / n, device="cuda")
        zero = torch.zeros_like(g)
        _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
        _, _, keep = lce_forward_with_keep(e, c, None, y, -100, FILTER_EPS)
        gemm_ms = do_bench(lambda: e @ c.T, return_mode="median")
        print(f"N={n} D={d} V={v} {regime}: T (e @ c.T) {gemm_ms:.2f} ms", flush=True)

        def backward_call(mode, split=True, **extra):
            options = {"listed": {"keep": keep}}.get(mode, {})

            def run():
                with mock.patch.object(backward, "SPLIT_LAST_DE_WAVE", split):
                    return lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, mode != "exact", True, True,
                                        False, **options, **extra)
            return run

        variants = {"exact": backward_call("exact")}
        for mode in ("filtered", "listed"):
            for split in (True, False):
                with mock.patch.object(backward, "SPLIT_LAST_DE_WAVE", split):
                    shape = backward.buffered_window(e, v, filtered=True, filtered_dc=mode == "listed")
                kind = "last wave in pieces" if split else "whole tiles"
                variants[f"{mode}, {kind} {shape[0]} x {shape[1]}"] = backward_call(mode, split)
        for label, samples in interleaved_ms(variants, rounds=args.rounds).items():
            print(f"  backward {label:<34} {summary(samples, gemm_ms)}", flush=True)

        counts = torch.zeros(2, dtype=torch.int32, device="cuda")
        backward_call("filtered", tile_counts=counts)()
        print(f"  s = {counts[1].item() / max(1, counts.sum().item()):.4f}", flush=True)
        gold = reference.chunked_backward(e.float(), c.float(), None, y, lse, g, zero, -100, 0.0, 0.0, True, True,
                                          False)[0].double()
        for mode in ("filtered", "listed"):
            de = {split: backward_call(mode, split)()[0].double() for split in (True, False)}
            rel = {name: float((x - ref).norm() / ref.norm())
                   for name, x, ref in (("whole", de[True], de[False]), ("pieces", de[True], gold),
                                        ("tiles", de[False], gold))}
            print(f"  {mode}: dE in pieces against whole {rel['whole']:.2e}; against float64 "
                  f"{rel['pieces']:.2e} / {rel['tiles']:.2e}", flush=True)
        del gold
        if args.profile:
            for split in (True, False):
                print_profile(backward_call("filtered", split), f"filtered backward, last wave in pieces {split}")


if __name__ == "__main__":
    main()

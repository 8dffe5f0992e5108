"""The filtered path's two Triton GEMMs alone, against cuBLAS on the same operands, with their epilogue variants.

    python -m benchmarks.filtered_gemm_variants [--shapes N,D,V ...] [--kept 1.0 0.57] [--rounds 3]
                                                [--backward]

For each shape, one (window, chunk) of the filtered buffered backward (the window and chunk
``buffered_window`` picks with dE and dC filtered), bf16 operands of that size (dz ~ N(0, 1e-3)
in the padded buffer, E's window, C's chunk) and keep flags with a fraction ``--kept`` of the token
tiles kept at random (1.0: every tile, where the Triton GEMMs replace cuBLAS's one for one):

* dE += dz @ C[chunk] (float32 accumulator of the window): cuBLAS's mixed-precision addmm (all the
  work, whatever is kept) against ``_filtered_de_kernel`` as the defaults have it (its epilogue a TMA
  reduce-add in two column blocks, tiles in order of work), with a load and store instead of the
  reduce (``FILTERED_DE_EPILOGUE_REDUCE``), in index order (``BALANCED_FILTERED_DE``), and with
  neither (the defaults before both);
* dC (+)= dz^T @ E[window] (the 16-bit dC rows of the chunk): cuBLAS's addmm_ and mm against
  ``_filtered_dc_kernel`` as the defaults have it (one TMA block, tiles in order of work) and in
  index order (``BALANCED_FILTERED_DC``).
(results/h200-2026-12-01i/filtered_gemm_variants*.log time the earlier epilogue variants: pointers,
one and two TMA blocks, 2 and 4 stages, the old dC tile loaded before the K loop, dz^T read K-major.)
The random keep flags here give every token tile about the same count; the order of work matters
where the counts differ, as on the LM-like data of ``--backward``.

Times in interleaved rounds (benchmarks/rounds.py), as ms per call, TFLOP/s of the GEMM's full work
(2 x rows x chunk x D, whatever is kept) and the ratio to cuBLAS's accumulating call; each variant's
result against the default's (bit-equal expected but for cuBLAS's and the non-accumulating ones).
A variant that does not compile (e.g. out of shared memory) is reported and left out.
``--backward``: then the filtered backward with dC by cuBLAS and with the corrected dC
(dc_filter="corrected"), under those module constants, against the exact backward, in rounds, at
both data regimes.
Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
import contextlib
import statistics
from unittest import mock

import torch

from cce_inductor.kernels import backward, lce_backward, lce_forward
from cce_inductor.kernels.common import buffered_config, filtered_dc_config, filtered_de_config, sm_count, tma_descriptor
from cce_inductor.testing import make_inputs

from .points import GOAL_SHAPES
from .rounds import interleaved_ms

def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def gemm_variants(n: int, d: int, v: int, kept: float, rounds: int) -> None:
    e_full = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    rows, cols = backward.buffered_window(e_full, v, filtered=True, filtered_dc=True)
    cfg, de_cfg, dc_cfg = buffered_config(e_full), filtered_de_config(e_full), filtered_dc_config(e_full)
    sms = sm_count(e_full.device)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ld = backward.buffer_row_stride(cols)
    dz = (torch.randn(rows, ld, device="cuda", generator=gen) * 1e-3).to(torch.bfloat16)[:, :cols]
    e = e_full[:rows]
    c = torch.randn(cols, d, device="cuda", dtype=torch.bfloat16, generator=gen) / d**0.5
    tiles_n, tiles_v = -(-rows // cfg.block_n), -(-cols // cfg.block_v)
    keep = (torch.rand(tiles_n * tiles_v, device="cuda", generator=gen) < kept).to(torch.int8)
    skipped = (keep.view(tiles_n, tiles_v) == 0).repeat_interleave(cfg.block_v, 1)[:, :cols]
    col_sums = torch.randn(tiles_n, cols, device="cuda", generator=gen) * 1e-3 * skipped
    means = backward._tile_means(e, cfg.block_n)
    acc = torch.zeros(rows, d, device="cuda", dtype=torch.float32)
    dc_old = (torch.randn(cols, d, device="cuda", generator=gen) * 1e-2).to(torch.bfloat16)
    dc = dc_old.clone()
    descs = dict(
        dz_de=tma_descriptor(dz, [de_cfg.block_n, de_cfg.block_v], de_cfg),
        c_de=tma_descriptor(c, [de_cfg.block_v, de_cfg.block_d], de_cfg),
        dz_dc=tma_descriptor(dz, [dc_cfg.block_n, dc_cfg.block_v], dc_cfg),
        e_dc=tma_descriptor(e, [dc_cfg.block_n, dc_cfg.block_d], dc_cfg),
    )
    de_parts, dc_parts = backward.FILTERED_DE_EPILOGUE_PARTS, backward.FILTERED_DC_EPILOGUE_PARTS  # the defaults'
    descs["acc"] = backward.epilogue_descriptor(acc, de_cfg, de_cfg.block_n, de_parts)
    descs["dc"] = backward.epilogue_descriptor(dc, dc_cfg, dc_cfg.block_v, dc_parts)
    missing = [k for k, desc in descs.items() if desc is None]
    if missing:
        raise SystemExit(f"no TMA descriptors for {missing}: this benchmark times the Hopper path")
    flops = 2 * rows * cols * d
    print(f"\n=== N={n} D={d} V={v}: window {rows} x chunk {cols}, kept {float(keep.float().mean()):.3f} of "
          f"{tiles_n} x {tiles_v} tiles; GEMMs of {flops / 1e9:.1f} GFLOP each (all of it, whatever is kept)",
          flush=True)

    def de(reduce=None, balanced=None):
        return lambda: backward.filtered_de_gemm(acc, dz, c, keep, 0, de_cfg, cfg.block_v, sms, dz_desc=descs["dz_de"],
                                                 c_desc=descs["c_de"], acc_desc=descs["acc"], epilogue_parts=de_parts,
                                                 epilogue_reduce=reduce, balanced=balanced)

    def dc_call(balanced=None):
        return lambda: backward.filtered_dc_gemm(
            dc, dz, e, keep, col_sums, means, True, dc_cfg, cfg.block_n, cfg.block_v, sms,
            dz_desc=descs["dz_dc"], e_desc=descs["e_dc"], dc_desc=descs["dc"], epilogue_parts=dc_parts,
            balanced=balanced)

    de_variants = {
        "dE cuBLAS addmm (float32 out)": lambda: backward._add_product(acc, dz, c),
        "dE Triton (default)": de(),
        "dE Triton, load + store, not a reduce": de(reduce=False),
        "dE Triton, index order": de(balanced=False),
        "dE Triton, neither (the -i default)": de(reduce=False, balanced=False),
    }
    dc_variants = {
        "dC cuBLAS addmm_ (bf16)": lambda: dc.addmm_(dz.T, e),
        "dC cuBLAS mm (bf16, no accumulate)": lambda: torch.mm(dz.T, e, out=dc),
        "dC Triton (default)": dc_call(),
        "dC Triton, index order (the -i default)": dc_call(balanced=False),
    }
    for variants, out, init in ((de_variants, acc, None), (dc_variants, dc, dc_old)):
        results, usable = {}, {}
        for label, fn in variants.items():  # one call each from the same start: compile, check
            try:
                out.zero_() if init is None else out.copy_(init)
                fn()
                results[label] = out.clone()
                usable[label] = fn
            except Exception as exc:  # a variant that does not compile is reported, not fatal
                print(f"  {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
        default = next(label for label in results if "(default)" in label)
        cublas = next(iter(usable))
        times = interleaved_ms(usable, rounds=rounds, rep_ms=300.0)
        base = statistics.median(times[cublas])
        for label, samples in times.items():
            mid = statistics.median(samples)
            diff = _rel(results[label], results[default])
            print(f"  {label:<42} {mid:7.3f} ms  {flops / mid / 1e9:6.1f} TFLOP/s  {mid / base:5.3f}x cuBLAS  "
                  f"(rounds {min(samples):.3f}-{max(samples):.3f})  vs default {diff:.1e}", flush=True)


def backward_variants(n: int, d: int, v: int, regime: str, rounds: int) -> None:
    inputs = make_inputs(regime, n, d, v, device="cuda", seed=0)
    e, c, y = inputs.e, inputs.c, inputs.targets
    _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    g = torch.full((n,), 1.0 / n, device="cuda")
    zero = torch.zeros(n, device="cuda")

    def run(filter_grad, dc_filter=None, **constants):
        def call():
            with mock.patch.multiple(backward, **constants) if constants else contextlib.nullcontext():
                return lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, filter_grad, True, True, False,
                                    dc_filter=dc_filter)
        return call

    off = dict(FILTERED_DE_EPILOGUE_REDUCE=False, BALANCED_FILTERED_DE=False, BALANCED_FILTERED_DC=False)  # -i
    variants = {
        "exact": run(False),
        "filtered, dC by cuBLAS (default)": run(True, "exact"),
        "filtered, dE load + store": run(True, "exact", FILTERED_DE_EPILOGUE_REDUCE=False),
        "filtered, dE in index order": run(True, "exact", BALANCED_FILTERED_DE=False),
        "filtered, as in -i": run(True, "exact", **off),
        "corrected": run(True, "corrected"),
        "corrected, dC in index order": run(True, "corrected", BALANCED_FILTERED_DC=False),
        "corrected, both in index order": run(True, "corrected", BALANCED_FILTERED_DE=False,
                                              BALANCED_FILTERED_DC=False),
        "corrected, as in -i": run(True, "corrected", **off),
    }
    for label, fn in list(variants.items()):  # compile each; one that fails is reported and left out
        try:
            fn()
        except Exception as exc:
            print(f"  {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
            del variants[label]
    print(f"\n=== backward N={n} D={d} V={v} {regime}", flush=True)
    for label, samples in interleaved_ms(variants, rounds=rounds).items():
        mid = statistics.median(samples)
        print(f"  {label:<44} {mid:7.2f} ms  (rounds {min(samples):.2f}-{max(samples):.2f})", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(GOAL_SHAPES), help="N,D,V each")
    parser.add_argument("--kept", nargs="+", type=float, default=[1.0, 0.57], help="fractions of tiles kept")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--no-gemms", action="store_true", help="the backward only (with --backward)")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for shape in [] if args.no_gemms else args.shapes:
        n, d, v = map(int, shape.split(","))
        for kept in args.kept:
            gemm_variants(n, d, v, kept, args.rounds)
    if args.backward:
        for shape in args.shapes:
            n, d, v = map(int, shape.split(","))
            for regime in ("lm", "uniform"):
                backward_variants(n, d, v, regime, args.rounds)


if __name__ == "__main__":
    main()

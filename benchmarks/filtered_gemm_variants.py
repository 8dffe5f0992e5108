"""The filtered path's two Triton GEMMs alone, against cuBLAS on the same operands, under tile and epilogue variants.

    python -m benchmarks.filtered_gemm_variants [--shapes N,D,V ...] [--kept 1.0 0.57] [--rounds 3]
                                                [--backward] [--no-gemms]

For each shape, bf16 operands of the size of one (window, chunk) of the filtered buffered backward
(dz ~ N(0, 1e-3) in the padded buffer, E's window, C's chunk) and keep flags with a fraction
``--kept`` of the tiles kept at random (1.0: every tile, where the Triton GEMMs replace cuBLAS's one
for one):

* dE += dz @ C[chunk] (float32 accumulator of the window), at the window and chunk the default filter
  (dC by cuBLAS) takes: cuBLAS's mixed-precision addmm (all the work, whatever is kept) against
  ``_filtered_de_kernel`` under its tile configs (K step, pipeline stages) and epilogue blocks
  (``DE_VARIANTS``);
* dC (+)= dz^T @ E[window] (the 16-bit dC rows of the chunk), at the window and chunk of
  ``filter_dc``: cuBLAS's addmm_ against ``_filtered_dc_kernel`` under its configs, epilogue blocks and
  the bf16 TMA reduce-add (``DC_VARIANTS``).
(results/h200-2026-12-01i/ and -j/filtered_gemm_variants*.log time earlier variants: pointer
epilogues, the old dC tile loaded before the K loop, dz^T read K-major, index order against order of
work; results/h200-2026-12-01m/filtered_gemm_configs.log these, when dC's default was the load and
store.)

Times in interleaved rounds (benchmarks/rounds.py), as ms per call, TFLOP/s of the GEMM's full work
(2 x rows x chunk x D, whatever is kept) and the ratio to cuBLAS's accumulating call; each variant's
result against the default's (bit-equal expected for dE; the reduce-add's extra rounding for dC).
A variant that does not compile (e.g. out of shared memory) is reported and left out.
``--backward``: then the backward in rounds at both data regimes: exact; the default filter (dC by
cuBLAS) under the defaults and under the dE variants; ``filter_dc`` (the forward's keep flags, both
GEMMs filtered) under the defaults and under the dC variants and the best of both (``BACKWARD_VARIANTS``).
Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
from unittest import mock

import torch
from triton.testing import do_bench

from cce_inductor import reference
from cce_inductor.kernels import FILTER_EPS, backward, common, lce_backward, lce_forward
from cce_inductor.kernels.common import buffered_config, sm_count, tma_descriptor
from cce_inductor.kernels.forward import lce_forward_with_keep
from cce_inductor.testing import make_inputs

from .points import GOAL_SHAPES
from .rounds import interleaved_ms, summary

# (label, K step, stages, epilogue blocks): the dE GEMM's 128 x 256 output tile; the first is the default.
DE_VARIANTS = [
    ("K 64, 3 stages, 2 blocks (default)", 64, 3, 2),
    ("K 64, 3 stages, 4 blocks", 64, 3, 4),
    ("K 64, 4 stages, 4 blocks", 64, 4, 4),
    ("K 128, 2 stages, 4 blocks", 128, 2, 4),
    ("K 32, 6 stages, 2 blocks", 32, 6, 2),
]
# (label, K step in tokens, stages, epilogue blocks, reduce-add): the dC GEMM's 128 x 256 output tile.
DC_VARIANTS = [
    ("K 64, 3 stages, 1 block, bf16 reduce (default)", 64, 3, 1, True),
    ("K 64, 3 stages, 1 block, load and store", 64, 3, 1, False),
    ("K 64, 3 stages, 2 blocks, bf16 reduce", 64, 3, 2, True),
    ("K 64, 4 stages, 2 blocks, bf16 reduce", 64, 4, 2, True),
    ("K 64, 4 stages, 4 blocks", 64, 4, 4, False),
    ("K 128, 2 stages, 2 blocks, bf16 reduce", 128, 2, 2, True),
]


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def de_config(k: int, stages: int):
    return dataclasses.replace(common._GPU_FILTERED_DE_16, block_v=k, num_stages=stages)


def dc_config(k: int, stages: int):
    return dataclasses.replace(common._GPU_FILTERED_DC_16, block_n=k, num_stages=stages)


def _timed(variants: dict, out: torch.Tensor, init, flops: int, rounds: int) -> None:
    """Each variant once from the same start (compile, keep its result), then all in rounds."""
    results, usable = {}, {}
    for label, fn in variants.items():
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
        print(f"  {label:<46} {mid:7.3f} ms  {flops / mid / 1e9:6.1f} TFLOP/s  {mid / base:5.3f}x cuBLAS  "
              f"(rounds {min(samples):.3f}-{max(samples):.3f})  vs default {_rel(results[label], results[default]):.1e}",
              flush=True)


def gemm_variants(n: int, d: int, v: int, kept: float, rounds: int) -> None:
    e_full = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    cfg = buffered_config(e_full)
    sms = sm_count(e_full.device)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for gemm, (rows, cols) in (("dE", backward.buffered_window(e_full, v, filtered=True)),
                               ("dC", backward.buffered_window(e_full, v, filtered=True, filtered_dc=True))):
        ld = backward.buffer_row_stride(cols)
        dz = (torch.randn(rows, ld, device="cuda", generator=gen) * 1e-3).to(torch.bfloat16)[:, :cols]
        e = e_full[:rows]
        c = torch.randn(cols, d, device="cuda", dtype=torch.bfloat16, generator=gen) / d**0.5
        tiles_n, tiles_v = -(-rows // cfg.block_n), -(-cols // cfg.block_v)
        keep = (torch.rand(tiles_n * tiles_v, device="cuda", generator=gen) < kept).to(torch.int8)
        flops = 2 * rows * cols * d
        print(f"\n=== {gemm}, N={n} D={d} V={v}: window {rows} x chunk {cols}, kept {float(keep.float().mean()):.3f} "
              f"of {tiles_n} x {tiles_v} tiles; {flops / 1e9:.1f} GFLOP (all of it, whatever is kept)", flush=True)
        if gemm == "dE":
            acc = torch.zeros(rows, d, device="cuda", dtype=torch.float32)

            def de(k, stages, parts):
                de_cfg = de_config(k, stages)
                dz_desc = tma_descriptor(dz, [de_cfg.block_n, de_cfg.block_v], de_cfg)
                c_desc = tma_descriptor(c, [de_cfg.block_v, de_cfg.block_d], de_cfg)
                acc_desc = backward.epilogue_descriptor(acc, de_cfg, de_cfg.block_n, parts)
                if None in (dz_desc, c_desc, acc_desc):
                    raise SystemExit("no TMA descriptors: this benchmark times the Hopper path")
                return lambda: backward.filtered_de_gemm(acc, dz, c, keep, 0, de_cfg, cfg.block_v, sms, dz_desc=dz_desc,
                                                         c_desc=c_desc, acc_desc=acc_desc, epilogue_parts=parts)

            variants = {"dE cuBLAS addmm (float32 out)": lambda: backward._add_product(acc, dz, c)}
            variants.update({f"dE Triton, {label}": de(k, stages, parts) for label, k, stages, parts in DE_VARIANTS})
            _timed(variants, acc, None, flops, rounds)
        else:
            dc_old = (torch.randn(cols, d, device="cuda", generator=gen) * 1e-2).to(torch.bfloat16)
            dc = dc_old.clone()

            def dc_call(k, stages, parts, reduce):
                dc_cfg = dc_config(k, stages)
                dz_desc = tma_descriptor(dz, [dc_cfg.block_n, dc_cfg.block_v], dc_cfg)
                e_desc = tma_descriptor(e, [dc_cfg.block_n, dc_cfg.block_d], dc_cfg)
                dc_desc = backward.epilogue_descriptor(dc, dc_cfg, dc_cfg.block_v, parts)
                if None in (dz_desc, e_desc, dc_desc):
                    raise SystemExit("no TMA descriptors: this benchmark times the Hopper path")
                return lambda: backward.filtered_dc_gemm(dc, dz, e, keep, None, None, True, dc_cfg, cfg.block_n,
                                                         cfg.block_v, sms, dz_desc=dz_desc, e_desc=e_desc,
                                                         dc_desc=dc_desc, epilogue_parts=parts, epilogue_reduce=reduce)

            variants = {"dC cuBLAS addmm_ (bf16)": lambda: dc.addmm_(dz.T, e)}
            variants.update({f"dC Triton, {label}": dc_call(*rest) for label, *rest in DC_VARIANTS})
            _timed(variants, dc, dc_old, flops, rounds)


def _patched(de=None, dc=None):
    """The module constants of one backward variant: de = (K, stages, blocks) of the dE GEMM, dc = (K,
    stages, blocks, reduce) of the dC GEMM (None: the defaults)."""
    patches = contextlib.ExitStack()
    if de is not None:
        patches.enter_context(mock.patch.object(common, "_GPU_FILTERED_DE_16", de_config(*de[:2])))
        patches.enter_context(mock.patch.object(backward, "FILTERED_DE_EPILOGUE_PARTS", de[2]))
    if dc is not None:
        patches.enter_context(mock.patch.object(common, "_GPU_FILTERED_DC_16", dc_config(*dc[:2])))
        patches.enter_context(mock.patch.object(backward, "FILTERED_DC_EPILOGUE_PARTS", dc[2]))
        patches.enter_context(mock.patch.object(backward, "FILTERED_DC_EPILOGUE_REDUCE", dc[3]))
    return patches


# (label, mode, dE variant, dC variant): mode "exact", "filtered" (dC by cuBLAS) or "listed" (filter_dc).
BACKWARD_VARIANTS = [
    ("exact", "exact", None, None),
    ("filtered (default)", "filtered", None, None),
    ("filtered, dE K 64, 4 stages, 4 blocks", "filtered", (64, 4, 4), None),
    ("filtered, dE K 128, 2 stages, 4 blocks", "filtered", (128, 2, 4), None),
    ("filter_dc (default: dC's bf16 reduce)", "listed", None, None),
    ("filter_dc, dC load and store", "listed", None, (64, 3, 1, False)),
    ("filter_dc, dC 4 stages, 2 blocks, bf16 reduce", "listed", None, (64, 4, 2, True)),
    ("filter_dc, both: dE 4 stages 4 blocks, dC reduce", "listed", (64, 4, 4), (64, 3, 1, True)),
]


def backward_variants(n: int, d: int, v: int, regime: str, rounds: int) -> None:
    inputs = make_inputs(regime, n, d, v, device="cuda", seed=0)
    e, c, y = inputs.e, inputs.c, inputs.targets
    _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    _, _, keep = lce_forward_with_keep(e, c, None, y, -100, FILTER_EPS)
    g = torch.full((n,), 1.0 / n, device="cuda")
    zero = torch.zeros(n, device="cuda")
    gemm_ms = do_bench(lambda: e @ c.T, return_mode="median")

    def run(mode, de, dc):
        def call():
            with _patched(de, dc):
                return lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, mode != "exact", True, True, False,
                                    **({"keep": keep} if mode == "listed" else {}))
        return call

    gold = reference.chunked_backward(e.float(), c.float(), None, y, lse, g, zero, -100, 0.0, 0.0, True, True,
                                      False)[:2]
    variants, errors = {}, {}
    for label, *spec in BACKWARD_VARIANTS:  # compile each; one that fails is reported and left out
        try:
            errors[label] = [_rel(x, ref) for x, ref in zip(run(*spec)()[:2], gold)]
            variants[label] = run(*spec)
        except Exception as exc:
            print(f"  {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
    del gold
    print(f"\n=== backward N={n} D={d} V={v} {regime}: T (e @ c.T) {gemm_ms:.2f} ms", flush=True)
    for label, samples in interleaved_ms(variants, rounds=rounds).items():
        de, dc = errors[label]
        print(f"  {label:<50} {summary(samples, gemm_ms)}  dE {de:.2e} dC {dc:.2e} vs float64", flush=True)


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

"""The filtered path's two Triton GEMMs alone, against cuBLAS on the same operands, with their epilogue variants.

    python -m benchmarks.filtered_gemm_variants [--shapes N,D,V ...] [--kept 1.0 0.57] [--rounds 3]
                                                [--backward]

For each shape, one (window, chunk) of the filtered buffered backward (the window and chunk
``buffered_window`` picks with dE and dC filtered), bf16 operands of that size (dz ~ N(0, 1e-3)
in the padded buffer, E's window, C's chunk) and keep flags with a fraction ``--kept`` of the token
tiles kept at random (1.0: every tile, where the Triton GEMMs replace cuBLAS's one for one):

* dE += dz @ C[chunk] (float32 accumulator of the window): cuBLAS's mixed-precision addmm (all the
  work, whatever is kept) against ``_filtered_de_kernel`` with its pointer and TMA epilogues;
* dC (+)= dz^T @ E[window] (the 16-bit dC rows of the chunk): cuBLAS's addmm_ and mm against
  ``_filtered_dc_kernel`` accumulating (the default), not accumulating (no read of the old dC), with
  the TMA epilogue, with the old tile loaded before the K loop, both, and reading dz^T from a
  transposed copy (K-major A: what a second, transposed store of dz by the dz kernel would buy).

Times in interleaved rounds (benchmarks/rounds.py), as ms per call, TFLOP/s of the GEMM's full work
(2 x rows x chunk x D, whatever is kept) and the ratio to cuBLAS's accumulating call; each variant's
result against the default's (bit-equal expected but for cuBLAS and the transposed read's).
``--backward``: then the filtered backward (dc_filter="corrected") with each epilogue variant's module
constants against the defaults and the exact backward, in rounds, at both data regimes.
Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch

from cce_inductor.kernels import backward, lce_backward, lce_forward
from cce_inductor.kernels.common import buffered_config, filtered_dc_config, filtered_de_config, sm_count, tma_descriptor
from cce_inductor.testing import make_inputs

from .points import GOAL_SHAPES
from .rounds import interleaved_ms

EPILOGUE_CONSTANTS = ("FILTERED_DE_EPILOGUE_TMA", "FILTERED_DC_EPILOGUE_TMA", "FILTERED_DC_PREFETCH_OLD")


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
    dz_t = dz.T.contiguous()
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
        acc=tma_descriptor(acc, [de_cfg.block_n, de_cfg.block_d], de_cfg, accumulator=True),
        dz_dc=tma_descriptor(dz, [dc_cfg.block_n, dc_cfg.block_v], dc_cfg),
        dz_t_dc=tma_descriptor(dz_t, [dc_cfg.block_v, dc_cfg.block_n], dc_cfg),
        e_dc=tma_descriptor(e, [dc_cfg.block_n, dc_cfg.block_d], dc_cfg),
        dc=tma_descriptor(dc, [dc_cfg.block_v, dc_cfg.block_d], dc_cfg),
    )
    missing = [k for k, desc in descs.items() if desc is None]
    if missing:
        raise SystemExit(f"no TMA descriptors for {missing}: this benchmark times the Hopper path")
    flops = 2 * rows * cols * d
    print(f"\n=== N={n} D={d} V={v}: window {rows} x chunk {cols}, kept {float(keep.float().mean()):.3f} of "
          f"{tiles_n} x {tiles_v} tiles; GEMMs of {flops / 1e9:.1f} GFLOP each (all of it, whatever is kept)",
          flush=True)

    def de(epilogue_tma):
        return lambda: backward.filtered_de_gemm(acc, dz, c, keep, 0, de_cfg, cfg.block_v, sms, dz_desc=descs["dz_de"],
                                                 c_desc=descs["c_de"], acc_desc=descs["acc"],
                                                 epilogue_tma=epilogue_tma)

    def dc_call(accumulate=True, epilogue_tma=False, prefetch_old=False, transposed=False):
        return lambda: backward.filtered_dc_gemm(
            dc, dz_t if transposed else dz, e, keep, col_sums, means, accumulate, dc_cfg, cfg.block_n, cfg.block_v,
            sms, dz_desc=descs["dz_t_dc" if transposed else "dz_dc"], e_desc=descs["e_dc"], dc_desc=descs["dc"],
            epilogue_tma=epilogue_tma, prefetch_old=prefetch_old, dz_transposed=transposed)

    de_variants = {
        "dE cuBLAS addmm (float32 out)": lambda: backward._add_product(acc, dz, c),
        "dE Triton, pointer epilogue (default)": de(False),
        "dE Triton, TMA epilogue": de(True),
    }
    dc_variants = {
        "dC cuBLAS addmm_ (bf16)": lambda: dc.addmm_(dz.T, e),
        "dC cuBLAS mm (bf16, no accumulate)": lambda: torch.mm(dz.T, e, out=dc),
        "dC Triton, accumulate (default)": dc_call(),
        "dC Triton, no accumulate": dc_call(accumulate=False),
        "dC Triton, TMA epilogue": dc_call(epilogue_tma=True),
        "dC Triton, old tile prefetched": dc_call(prefetch_old=True),
        "dC Triton, TMA epilogue + prefetched": dc_call(epilogue_tma=True, prefetch_old=True),
        "dC Triton, dz^T K-major": dc_call(transposed=True),
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
        base = sorted(times[cublas])[len(times[cublas]) // 2]
        for label, samples in times.items():
            mid = sorted(samples)[len(samples) // 2]
            diff = _rel(results[label], results[default])
            print(f"  {label:<42} {mid:7.3f} ms  {flops / mid / 1e9:6.1f} TFLOP/s  {mid / base:5.3f}x cuBLAS  "
                  f"(rounds {min(samples):.3f}-{max(samples):.3f})  vs default {diff:.1e}", flush=True)


def backward_variants(n: int, d: int, v: int, regime: str, rounds: int) -> None:
    inputs = make_inputs(regime, n, d, v, device="cuda", seed=0)
    e, c, y = inputs.e, inputs.c, inputs.targets
    _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    g = torch.full((n,), 1.0 / n, device="cuda")
    zero = torch.zeros(n, device="cuda")

    def run(filter_grad, **constants):
        def call():
            with mock.patch.multiple(backward, **constants) if constants else contextlib.nullcontext():
                return lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, filter_grad, True, True, False,
                                    dc_filter="corrected" if filter_grad else None)
        return call

    off = {name: False for name in EPILOGUE_CONSTANTS}
    variants = {
        "exact": run(False),
        "filtered corrected, default epilogues": run(True, **off),
        "filtered corrected, TMA epilogues": run(True, **{**off, "FILTERED_DE_EPILOGUE_TMA": True,
                                                         "FILTERED_DC_EPILOGUE_TMA": True}),
        "filtered corrected, TMA + prefetched dC": run(True, **{name: True for name in EPILOGUE_CONSTANTS}),
        "filtered corrected, dE TMA epilogue only": run(True, **{**off, "FILTERED_DE_EPILOGUE_TMA": True}),
    }
    print(f"\n=== backward N={n} D={d} V={v} {regime}", flush=True)
    for label, samples in interleaved_ms(variants, rounds=rounds).items():
        mid = sorted(samples)[len(samples) // 2]
        print(f"  {label:<44} {mid:7.2f} ms  (rounds {min(samples):.2f}-{max(samples):.2f})", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(GOAL_SHAPES), help="N,D,V each")
    parser.add_argument("--kept", nargs="+", type=float, default=[1.0, 0.57], help="fractions of tiles kept")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for shape in args.shapes:
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

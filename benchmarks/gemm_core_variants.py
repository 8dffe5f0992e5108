"""Candidate cores for the logit-tile GEMM that the forward and the backward's recompute share.

    python -m benchmarks.gemm_core_variants

Minimal kernels around the package's logit tile (``kernels/common.logit_tile``; no bias / softcap /
smoothing: those are a few epilogue instructions per element) with the two epilogues the package needs -- the forward's online log-sum-exp over a run of vocab
tiles, and the buffered backward's dz tile stored to a buffer -- built four ways:
  ptr      pointer loads, the package's fallback (cp.async pipelining over D);
  ptr+flat the loop over tiles flattened into the loop over D (``tl.range(flatten=True)``), so the
           next tile's loads are in flight during this tile's epilogue;
  tma      loads through host-side tensor descriptors (TMA), zero-filled out of bounds;
  tma+flat both.
The dz kernel is also run persistent (one program per SM looping over tiles) and with the tile
stored through a descriptor. Prints ms and the ratio to the cuBLAS GEMM of the same size, registers
and spills, and checks each result against the package's kernels. Prints only.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from cce_inductor.kernels.common import TensorDescriptor, logit_tile


@triton.jit
def _tile(E, C, E_desc, C_desc, n0, v0, N, V, D, stride_en, stride_cv,
          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """The package's logit tile (kernels/common.py) for bf16 inputs whose D is a multiple of BLOCK_D."""
    offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    return logit_tile(E, C, E_desc, C_desc, n0, v0, offs_n, offs_v, offs_n < N, offs_v < V, D, stride_en, stride_cv,
                      BLOCK_N, BLOCK_V, BLOCK_D, True, TMA, "tf32", False)


@triton.jit
def _lse_kernel(E, C, E_desc, C_desc, LsePart, N, V, D, tiles_per_split, stride_en, stride_cv,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                TMA: tl.constexpr, FLATTEN: tl.constexpr):
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n_tiles
    pid_split = pid // num_n_tiles
    n0 = pid_n * BLOCK_N
    offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    v_tile_begin = pid_split * tiles_per_split
    v_tile_end = tl.minimum(v_tile_begin + tiles_per_split, tl.cdiv(V, BLOCK_V))
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v_tile in tl.range(v_tile_begin, v_tile_end, flatten=FLATTEN):
        v0 = v_tile * BLOCK_V
        z = _tile(E, C, E_desc, C_desc, n0, v0, N, V, D, stride_en, stride_cv, BLOCK_N, BLOCK_V, BLOCK_D, TMA)
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = tl.where((offs_v < V)[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(LsePart + pid_split.to(tl.int64) * N + offs_n, run_max + tl.log(run_sum), mask=offs_n < N)


@triton.jit
def _dz_kernel(E, C, E_desc, C_desc, Dz, Dz_desc, Lse, N, V, D, stride_en, stride_cv, num_programs,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
               TMA: tl.constexpr, FLATTEN: tl.constexpr, TMA_STORE: tl.constexpr):
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_v_tiles = tl.cdiv(V, BLOCK_V)
    group_width = GROUP_N * num_v_tiles
    for tile in tl.range(tl.program_id(0), num_n_tiles * num_v_tiles, num_programs, flatten=FLATTEN):
        first_n = (tile // group_width) * GROUP_N
        group_size = tl.minimum(num_n_tiles - first_n, GROUP_N)
        pid_n = first_n + (tile % group_width) % group_size
        pid_v = (tile % group_width) // group_size
        n0 = pid_n * BLOCK_N
        v0 = pid_v * BLOCK_V
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        lse = tl.load(Lse + offs_n, mask=offs_n < N, other=0.0)
        z = _tile(E, C, E_desc, C_desc, n0, v0, N, V, D, stride_en, stride_cv, BLOCK_N, BLOCK_V, BLOCK_D, TMA)
        dz = tl.exp(z - lse[:, None]).to(Dz.dtype.element_ty)
        if TMA_STORE:
            Dz_desc.store([n0, v0], dz)
        else:
            tl.store(Dz + offs_n[:, None] * V + offs_v[None, :], dz, mask=(offs_n < N)[:, None] & (offs_v < V)[None, :])


def _descs(e, c, dz, bn, bv, bd):
    if TensorDescriptor is None:
        return None, None, None
    return (TensorDescriptor.from_tensor(e, [bn, bd]), TensorDescriptor.from_tensor(c, [bv, bd]),
            TensorDescriptor.from_tensor(dz, [bn, bv]) if dz is not None else None)


def _report(name, fn, gemm_ms, compiled):
    try:
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - a variant that does not build is a result too
        print(f"  {name:34s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}", flush=True)
        return None
    k = compiled()
    regs = f"regs {k.n_regs} spills {k.n_spills}" if k is not None else ""
    print(f"  {name:34s} {ms:7.3f} ms  {ms / gemm_ms:5.2f} T  {regs}", flush=True)
    return ms


def _last_compiled(kernel):
    try:
        cache = kernel.device_caches[torch.cuda.current_device()][0]
        return list(cache.values())[-1]
    except Exception:  # noqa: BLE001 - introspection differs across triton versions
        return None


def forward_variants(n, d, v, configs):
    from cce_inductor.kernels.forward import lce_forward, vocab_splits
    from cce_inductor.kernels.common import sm_count

    torch.manual_seed(0)
    e = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = (torch.randn(v, d, device="cuda", dtype=torch.bfloat16) / d**0.5)
    y = torch.randint(0, v, (n,), device="cuda")
    gemm_ms = do_bench(lambda: e @ c.T, warmup=25, rep=200, return_mode="median")
    _, lse_ref = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    print(f"forward N={n} D={d} V={v}: T = {gemm_ms:.3f} ms", flush=True)
    from cce_inductor.kernels import forward as package_forward

    default = package_forward.FLATTEN_FORWARD
    for flat in (False, True):  # the package's kernel, its loop over vocab tiles flattened or not
        package_forward.FLATTEN_FORWARD = flat
        _report(f"package lce_forward flatten={flat}", lambda: lce_forward(e, c, None, y, -100, 0.0, 0.0),
                gemm_ms, lambda: None)
    package_forward.FLATTEN_FORWARD = default
    for bn, bv, bd, warps, stages in configs:
        per_split, splits = vocab_splits(triton.cdiv(n, bn), triton.cdiv(v, bv), sm_count(e.device), 1024)
        part = torch.empty(splits, n, device="cuda")
        e_desc, c_desc, _ = _descs(e, c, None, bn, bv, bd)
        for tma in (False, True):
            if tma and e_desc is None:
                continue
            for flat in (False, True):
                def run(tma=tma, flat=flat):
                    _lse_kernel[(triton.cdiv(n, bn) * splits,)](
                        e, c, e_desc if tma else e, c_desc if tma else c, part, n, v, d, per_split, e.stride(0), c.stride(0),
                        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, TMA=tma, FLATTEN=flat, num_warps=warps, num_stages=stages)
                name = f"{bn}x{bv}x{bd} w{warps} s{stages} {'tma' if tma else 'ptr'}{'+flat' if flat else ''}"
                if _report(name, run, gemm_ms, lambda: _last_compiled(_lse_kernel)) is not None:
                    lse = torch.logsumexp(part, 0)
                    err = (lse - lse_ref).abs().max().item()
                    if err > 1e-3:
                        print(f"    WRONG: max |lse - package| = {err:.3g}", flush=True)


def dz_variants(n, d, v, configs):
    torch.manual_seed(0)
    e = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = (torch.randn(v, d, device="cuda", dtype=torch.bfloat16) / d**0.5)
    lse = torch.logsumexp((e @ c.T).float(), 1)
    dz = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
    ref = torch.exp((e @ c.T).float() - lse[:, None]).to(torch.bfloat16)
    gemm_ms = do_bench(lambda: e @ c.T, warmup=25, rep=200, return_mode="median")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"dz chunk N={n} D={d} V={v}: T = {gemm_ms:.3f} ms", flush=True)
    for bn, bv, bd, warps, stages in configs:
        tiles = triton.cdiv(n, bn) * triton.cdiv(v, bv)
        e_desc, c_desc, dz_desc = _descs(e, c, dz, bn, bv, bd)
        variants = [("ptr one-tile", False, False, False, tiles), ("ptr persistent", False, False, False, sms),
                    ("ptr persistent+flat", False, True, False, sms)]
        if e_desc is not None:
            variants += [("tma one-tile", True, False, False, tiles), ("tma persistent", True, False, False, sms),
                         ("tma persistent+flat", True, True, False, sms),
                         ("tma persistent+flat+tma store", True, True, True, sms),
                         ("tma one-tile+tma store", True, False, True, tiles)]
        for label, tma, flat, tma_store, progs in variants:
            def run(tma=tma, flat=flat, tma_store=tma_store, progs=progs):
                _dz_kernel[(min(progs, tiles),)](
                    e, c, e_desc if tma else e, c_desc if tma else c, dz, dz_desc if tma_store else dz, lse,
                    n, v, d, e.stride(0), c.stride(0), min(progs, tiles),
                    BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, GROUP_N=8, TMA=tma, FLATTEN=flat, TMA_STORE=tma_store,
                    num_warps=warps, num_stages=stages)
            name = f"{bn}x{bv}x{bd} w{warps} s{stages} {label}"
            dz.zero_()
            if _report(name, run, gemm_ms, lambda: _last_compiled(_dz_kernel)) is not None:
                err = (dz.float() - ref.float()).abs().max().item()
                if err > 2e-2:
                    print(f"    WRONG: max |dz - ref| = {err:.3g}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one config each")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    fwd_configs = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4)]
    dz_configs = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4)]
    if args.quick:
        fwd_configs, dz_configs = fwd_configs[:1], dz_configs[:1]
    for n, d, v in ((8192, 2304, 256000), (8192, 4096, 128256)):
        forward_variants(n, d, v, fwd_configs)
    for n, d, v in ((2816, 2304, 4096), (2048, 4096, 4096), (2816, 2304, 16384)):
        dz_variants(n, d, v, dz_configs)


if __name__ == "__main__":
    main()

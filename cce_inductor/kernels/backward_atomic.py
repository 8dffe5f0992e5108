"""The atomic path: one kernel recomputes each logit tile and forms dE and dC from it with float32 atomics.

It serves what the buffered path (backward_buffered.py) does not: float32 inputs (the kernel's IEEE
float32 dots, where cuBLAS would follow torch's TF32 setting), a vocabulary order, a dropped dC
(``dc_filter="dropped"``) and torch builds without a mixed-precision addmm.

Algorithm (``_backward_kernel``): one program per (token tile, vocab tile), BLOCK_N x BLOCK_V, in
groups of GROUP_N token tiles that sweep the vocabulary together (their E rows, dE rows stay in L2).
  1. recompute z = E[n] @ C[v]^T (+ bias, softcap) in float32, accumulating over D;  # [BLOCK_N, BLOCK_V]
  2. p = exp(z - lse) with the forward's lse, dz (backward_shared._logit_grad), float32; # [BLOCK_N, BLOCK_V]
  3. dbias[v] += sum_n dz (float32 atomics, never filtered);
  4. cast dz to the input dtype and, for each BLOCK_D slice of D (``_gradient_gemms``),
     dE[n, d] += dz @ C[v, d] (unless filtered) and dC[v, d] += dz^T @ E[n, d]   # [BLOCK_N | BLOCK_V, BLOCK_D]
     as float32 atomic adds (relaxed); with ``dc_filter="dropped"`` a skipped tile adds to neither.
Tiles: ``common.backward_config`` (pointer loads: the vocabulary may be walked through an index).

Accumulators (float32): at most ``window_bytes`` (WINDOW_BYTES) of scratch at any time, whatever
N, D and V are. dC for 16-bit inputs goes through a float32 window of the vocabulary: the kernel is
launched once per window of vocabulary rows and each finished window is rounded into the 16-bit dC.
dE for 16-bit inputs accumulates in an (N, D) float32 buffer in the same launches when that buffer
fits in half of ``window_bytes`` (the dC window gets the rest); otherwise it is formed in a second
pass over windows of tokens (each launch covers the whole vocabulary for its tokens, dC off), which
recomputes the logits once more; the first pass's window is freed before the second's is made.
float32 inputs accumulate straight into their outputs.

Limits: the kernel is bound by the L2 traffic of its atomics, (BLOCK_N + BLOCK_V) * D * 4 bytes per
tile against 6 * BLOCK_N * BLOCK_V * D flops, and runs well behind the buffered path (staggering the
D order between programs and 128 x 256 / 256 x 128 tiles measured slower still); fewer partial sums
per flop (issue 6) would need larger reductions on chip before a flush, or a logits workspace. The
float32 sums depend on the order of the atomics: two runs agree to float32 rounding of the
accumulators, not bit for bit.

Vocabulary order (``vocab_order`` in ``lce_backward``; off by default, backward.DEFAULT_ORDER): the
vocabulary walked in the order of descending c_j . mean(e) through an index array (C is not copied),
so that rarely likely entries share tiles the filter can skip.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backward_shared import BackwardCall, _filter_keep, _logit_grad, _tile_position, _token_coefficients
from .common import TileConfig, capped_logits, dot, dot_precision, dot_upcast, logit_tile

# The float32 scratch of one call (dC's window of vocabulary rows, dE's accumulator) for 16-bit inputs.
WINDOW_BYTES = 32 * 2**20


@triton.jit
def _backward_kernel(
    # data
    E, C, Bias, Targets, Lse, GradLoss, GradLse, VocabOrder,
    # outputs (float32 accumulators), the optional tile counter
    dE, dC, dBias, TileCounts,
    # shapes: the launch covers vocabulary positions [v_begin, v_begin + v_count)
    N, V, D, v_begin, v_count,
    # strides (the D stride of every matrix is 1)
    stride_en, stride_cv, stride_den, stride_dcv,
    # constants
    ignore_index, softcap, target_weight, uniform_weight, filter_tau,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ORDER: tl.constexpr, DC_ROW_BY_ID: tl.constexpr, FILTER: tl.constexpr,
    COUNT_TILES: tl.constexpr, NEEDS_E: tl.constexpr, NEEDS_C: tl.constexpr,
    NEEDS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FILTER_DC: tl.constexpr,
):
    """The atomic path: one program per (token tile, vocab tile); see the module docstring."""
    pid_n, pid_v = _tile_position(tl.program_id(0), N, v_count, BLOCK_N, BLOCK_V, GROUP_N)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    mask_n = offs_n < N
    pos_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # [BLOCK_V] position in the launch
    mask_v = pos_v < v_count
    if HAS_ORDER:
        ids_v = tl.load(VocabOrder + v_begin + pos_v, mask=mask_v, other=0)  # [BLOCK_V] vocab ids
    else:
        ids_v = v_begin + pos_v
    targets, g_loss, g_p, lse = _token_coefficients(Targets, Lse, GradLoss, GradLse, offs_n, mask_n, V, ignore_index,
                                                    False)  # the masked epilogue: see _logit_grad

    # ---- 1-2. recompute the logit tile (pointer loads: the ids may be a permutation), dz
    z = logit_tile(E, C, E, C, 0, 0, offs_n, ids_v, mask_n, mask_v, D, stride_en, stride_cv,
                   BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, False, DOT_PRECISION, UPCAST)
    z, t = capped_logits(z, Bias, ids_v, mask_v, softcap, HAS_BIAS, HAS_SOFTCAP)
    dz = _logit_grad(z, t, lse, g_p, g_loss, targets, ids_v, mask_n, mask_v, target_weight, uniform_weight,
                     HAS_SMOOTHING, HAS_SOFTCAP, False)  # [BLOCK_N, BLOCK_V] float32

    # ---- 3. dbias, exact
    if NEEDS_BIAS:
        tl.atomic_add(dBias + ids_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")

    # ---- filter: skip the dE GEMM (FILTER_DC: dC's too) iff every token's mass here is < tau * |tile| * w_i
    if FILTER:
        keep = _filter_keep(dz, mask_v, g_p, g_loss, tl.minimum(v_count - pid_v * BLOCK_V, BLOCK_V), filter_tau)
        if COUNT_TILES:
            tl.atomic_add(TileCounts + tl.where(keep, 0, 1), 1, sem="relaxed")
    else:
        keep = True
        if COUNT_TILES:
            tl.atomic_add(TileCounts, 1, sem="relaxed")

    # ---- 4. dE[n] += dz @ C[v], dC[v] += dz^T @ E[n], slice by slice of D
    dz_in = dz.to(E.dtype.element_ty)
    if DC_ROW_BY_ID:
        dc_rows = ids_v
    else:
        dc_rows = pos_v
    if keep:
        _gradient_gemms(dz_in, E, C, dE, dC, offs_n, mask_n, ids_v, dc_rows, mask_v, D,
                        stride_en, stride_cv, stride_den, stride_dcv,
                        BLOCK_D, NEEDS_E, NEEDS_C, EVEN_D, DOT_PRECISION, UPCAST)
    elif NEEDS_C and not FILTER_DC:
        _gradient_gemms(dz_in, E, C, dE, dC, offs_n, mask_n, ids_v, dc_rows, mask_v, D,
                        stride_en, stride_cv, stride_den, stride_dcv,
                        BLOCK_D, False, True, EVEN_D, DOT_PRECISION, UPCAST)


@triton.jit
def _gradient_gemms(
    dz_in, E, C, dE, dC, offs_n, mask_n, ids_v, dc_rows, mask_v, D,
    stride_en, stride_cv, stride_den, stride_dcv,
    BLOCK_D: tl.constexpr, DO_E: tl.constexpr, DO_C: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dE[n] += dz @ C[v] and/or dC[v] += dz^T @ E[n] for one tile, BLOCK_D columns at a time,
    as float32 atomic adds; dz_in is [BLOCK_N, BLOCK_V] in the input dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    de_ptrs = dE + offs_n[:, None] * stride_den + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    dc_ptrs = dC + dc_rows[:, None] * stride_dcv + offs_d[None, :]  # [BLOCK_V, BLOCK_D]
    cg_ptrs = C + ids_v[:, None] * stride_cv + offs_d[None, :]  # [BLOCK_V, BLOCK_D]
    eg_ptrs = E + offs_n[:, None] * stride_en + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            mask_ed = mask_n[:, None]
            mask_cd = mask_v[:, None]
        else:
            mask_d = (d0 + offs_d) < D
            mask_ed = mask_n[:, None] & mask_d[None, :]
            mask_cd = mask_v[:, None] & mask_d[None, :]
        if DO_E:
            c_blk = tl.load(cg_ptrs + d0, mask=mask_cd, other=0.0)
            de = dot(dz_in, c_blk, None, DOT_PRECISION, UPCAST)  # [BLOCK_N, BLOCK_D]
            tl.atomic_add(de_ptrs + d0, de, mask=mask_ed, sem="relaxed")
        if DO_C:
            e_blk = tl.load(eg_ptrs + d0, mask=mask_ed, other=0.0)
            dc = dot(tl.trans(dz_in), e_blk, None, DOT_PRECISION, UPCAST)  # [BLOCK_V, BLOCK_D]
            tl.atomic_add(dc_ptrs + d0, dc, mask=mask_cd, sem="relaxed")


def default_vocab_order(e: Tensor, c: Tensor) -> Tensor:
    """Vocabulary ids by descending c_j . mean(e): entries likely for many tokens come first, so the
    unlikely ones share tiles that the filter can skip. One GEMV over C and a sort of V ids."""
    mean_e = e.float().mean(0).to(c.dtype)
    return torch.argsort(c @ mean_e, descending=True)


def atomic_backward(call: BackwardCall, order: Tensor | None, tile: TileConfig, dropped_dc: bool,
                    window_bytes: int) -> tuple[Tensor | None, Tensor | None]:
    """The atomic path over ``call`` (dbias into ``call.dbias``): vocabulary ``order`` (a permutation
    of the ids, or None), ``tile`` the kernel's config, ``dropped_dc``: a skipped tile's dC terms
    dropped. Returns (dE or None, dC or None) in the inputs' (common) dtype."""
    e, c, needs_e, needs_c, needs_bias = call.e, call.c, call.needs_e, call.needs_c, call.needs_bias
    num_tokens, dim, vocab = call.num_tokens, call.dim, call.vocab
    launch = functools.partial(_launch, call, order, tile, dropped_dc)
    f32 = torch.float32
    device = e.device
    # dE accumulates in float32: straight into the output for float32 inputs; for 16-bit inputs in
    # an (N, D) float32 buffer when that fits in half of window_bytes (the dC window takes the
    # rest), else (split) in a second pass over windows of tokens, each covering the whole
    # vocabulary, so that the float32 scratch held at any time stays within window_bytes whatever
    # N, D and V are (at the price of recomputing the logits once more).
    de_acc_bytes = 4 * num_tokens * dim if needs_e and e.dtype != f32 else 0
    split_e = de_acc_bytes > window_bytes // 2
    if needs_e and e.dtype == f32:
        de = torch.zeros_like(e)
    elif needs_e:
        de = torch.empty(num_tokens, dim, dtype=e.dtype, device=device)
    else:
        de = None
    if de is None or split_e:
        de_acc = None
    else:
        de_acc = de if e.dtype == f32 else torch.zeros(num_tokens, dim, dtype=f32, device=device)
    fused_e = needs_e and not split_e

    # Pass 1, over windows of the vocabulary: dC, dbias, and dE unless split.
    dc = None
    if needs_c or needs_bias or fused_e:
        dc_window_bytes = window_bytes - (0 if split_e else de_acc_bytes)
        dc = _vocab_pass(launch, c, de, de_acc, num_tokens, dim, vocab, order, tile, dc_window_bytes, fused_e,
                         needs_c, needs_bias)
    del de_acc  # the pass-1 buffers are gone before pass 2 allocates its window
    # Pass 2 (split only), over windows of tokens: dE through a float32 window rounded into dE.
    if split_e:
        _token_pass(launch, de, num_tokens, dim, vocab, tile, window_bytes)
    return de, dc


def _launch(call: BackwardCall, order: Tensor | None, tile: TileConfig, dropped_dc: bool, n_begin: int,
            n_count: int, v_begin: int, v_count: int, de_buf, dc_buf, dc_by_id: bool, do_e: bool, do_c: bool,
            do_bias: bool) -> None:
    """One launch of the atomic kernel over tokens [n_begin, +n_count) x vocabulary positions
    [v_begin, +v_count): dE into de_buf, dC into dc_buf (rows by id where dc_by_id, else by
    position), dbias into call.dbias, each where asked."""
    e, c, dummy, counts = call.e, call.c, call.dummy, call.tile_counts
    rows = slice(n_begin, n_begin + n_count)
    grid = (triton.cdiv(n_count, tile.block_n) * triton.cdiv(v_count, tile.block_v),)
    _backward_kernel[grid](
        e[rows], c, call.bias, call.targets[rows], call.lse[rows], call.grad_loss[rows], call.grad_lse[rows],
        order if order is not None else dummy,
        de_buf if do_e else dummy, dc_buf if do_c else dummy, call.dbias if do_bias else dummy,
        counts if counts is not None and do_e else dummy,
        n_count, call.vocab, call.dim, v_begin, v_count,
        e.stride(0), c.stride(0), call.dim, call.dim,
        *call.kernel_scalars(),
        BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_D=tile.block_d, GROUP_N=tile.group_n,
        **call.loss_flags(), HAS_ORDER=order is not None, DC_ROW_BY_ID=dc_by_id, FILTER=call.filter_grad,
        COUNT_TILES=counts is not None and do_e, NEEDS_E=do_e, NEEDS_C=do_c,
        NEEDS_BIAS=do_bias, EVEN_D=call.dim % tile.block_d == 0, DOT_PRECISION=dot_precision(e.dtype),
        UPCAST=dot_upcast(e), FILTER_DC=dropped_dc,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )


def _vocab_pass(launch, c, de, de_acc, num_tokens, dim, vocab, order, cfg, window_bytes, fused_e, needs_c,
                needs_bias):
    """Launches over windows of vocabulary rows. dC goes straight into a float32 output (rows by
    id) for float32 inputs, else through a float32 window that is rounded into the 16-bit dC after
    each launch; dE (when fused) accumulates into de_acc, copied into de at the end. Returns dC.
    The window lives in this function only, so it is freed before the token pass."""
    f32 = torch.float32
    if needs_c and c.dtype == f32:
        dc = torch.zeros_like(c)
        window, dc_direct, scratch = vocab, True, None
    elif needs_c:
        dc = torch.empty(vocab, dim, dtype=c.dtype, device=c.device)
        window = min(vocab, max(cfg.block_v, window_bytes // max(1, 4 * dim) // cfg.block_v * cfg.block_v))
        dc_direct, scratch = False, torch.empty(window, dim, dtype=f32, device=c.device)
    else:
        dc, window, dc_direct, scratch = None, vocab, False, None
    for v_begin in range(0, vocab, window):
        v_count = min(window, vocab - v_begin)
        dc_buf = dc if dc_direct else (scratch[:v_count].zero_() if needs_c else None)
        launch(0, num_tokens, v_begin, v_count, de_acc, dc_buf, dc_direct, fused_e, needs_c, needs_bias)
        if needs_c and not dc_direct:
            if order is None:
                dc[v_begin : v_begin + v_count].copy_(dc_buf)
            else:
                dc.index_copy_(0, order[v_begin : v_begin + v_count], dc_buf.to(c.dtype))
    if fused_e and de_acc is not de:
        de.copy_(de_acc)
    return dc


def _token_pass(launch, de, num_tokens, dim, vocab, cfg, window_bytes):
    """Launches over windows of tokens, each covering the whole vocabulary, dE only: a float32
    window of rows rounded into the 16-bit dE after each launch."""
    rows = min(num_tokens, max(cfg.block_n, window_bytes // (4 * dim) // cfg.block_n * cfg.block_n))
    de_window = torch.empty(rows, dim, dtype=torch.float32, device=de.device)
    for n_begin in range(0, num_tokens, rows):
        n_count = min(rows, num_tokens - n_begin)
        buf = de_window[:n_count].zero_()
        launch(n_begin, n_count, 0, vocab, buf, None, False, True, False, False)
        de[n_begin : n_begin + n_count].copy_(buf)

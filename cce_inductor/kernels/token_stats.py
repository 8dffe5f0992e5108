"""Triton kernels of ``linear_token_stats``: per-token log-probability, entropy, arg-max and log-sum-exp
of softmax(z), z = (E @ C^T + bias, softcapped) * inv_temp, and their gradients, never the N x V logits.

Contract with ``token_stats.py`` (mirrors ``chunked_stats_forward`` / ``chunked_stats_backward``):

    stats_forward(e, c, bias, targets, ignore_index, softcap, inv_temp, logprob, entropy, argmax, variance)
        -> (logprob | None, entropy | None, argmax | None, lse, variance | None), float32 (argmax int64), (N,)
    stats_backward(e, c, bias, targets, lse, entropy, g_logprob, g_entropy, g_lse, ignore_index, softcap,
                   inv_temp, needs_e, needs_c, needs_bias) -> (de | None, dc | None, dbias | None)

Forward (split-vocabulary online softmax, two launches, as forward.py):
  1. ``_stats_partial_kernel``: programs over (token tile, vocab split) in groups of GROUP_N token tiles
     x every split. For each vocab tile of its split a program computes the logit tile
         z = (E[n] @ C[v]^T + bias[v], softcapped) * inv_temp          # [BLOCK_N, BLOCK_V] float32
     (``common.logit_tile``) and folds it, in the same pass, into per-token running values:
         m (max), s = sum exp(z - m), t = sum exp(z - m) (z - m)  (entropy; re-based when m grows:
         t <- exp(m - m') (t + (m - m') s)), the best logit and its first id (arg-max), the target logit.
         With a learnable temperature also q = sum exp(z - m) (z - m)^2 (re-based likewise), for the
     variance of z under p, its gradient's coefficient.
     One partial (m, s, t, q, best, id) per token and split; the target logit by the split that holds it.
  2. ``_stats_combine_kernel``: per token, over the splits: lse = M + log S, entropy = log S - T / S
     (two non-negative terms: no cancellation for a peaked softmax), arg-max = the lowest id among
     the splits' best (ties: the first index, as torch.argmax), logprob = z_y - lse (0 where ignored,
     NaN where the target is outside [0, V)).
  The arg-max compares the logits rounded to the input dtype for 16-bit inputs (eager's logits are).

Backward (the buffered strategy of backward_buffered.py, with this op's dz):
  for each window of tokens (outer) and chunk of the vocabulary (inner):
  1. ``_stats_dz_kernel`` (persistent: one program per SM walks the launch's tiles, GROUP_N token tiles
     sweeping the chunk together; the tile loop flattened except under a softcap, as
     backward_buffered's dz kernel) recomputes z and forms
         dz = g_lp onehot(y) + p (g_lse - g_lp + g_H ((lse - z) - H)),   p = exp(z - lse)
     times inv_temp, times 1 - tanh^2 under a softcap -- every requested output's gradient in one
     recompute, with per-token coefficients so that each logit costs two FMAs, an exp2, a multiply
     and the target compare -- stores it in the input dtype into a bounded buffer; dbias by float32
     atomics;
  2. dE[window] += dz @ C[chunk] (float32 accumulator), dC[chunk] (+)= dz^T @ E[window] (torch matmuls:
     cuBLAS on CUDA, float32 accumulation inside).
  Windows and chunks are ``backward_buffered.buffered_shape``'s, within ``buffer_bytes``.

Limits: logits accumulated in float32 (float32 inputs: IEEE dots in the kernels; the gradient GEMMs
follow torch's matmul precision settings); dC is rounded once per window (16-bit). All row offsets
are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backward_buffered import BUFFER_BYTES, buffer_row_stride, buffered_shape
from .common import (
    HAS_FLATTEN, LOG2E, buffered_config, capped_logits, dot_precision, dot_upcast, forward_config, logit_tile,
    prepare_inputs, sm_count, tma_descriptor,
)
from .forward import vocab_splits

_PARTIAL_BYTES = 4 * 2**20  # cap on one float32 partial buffer (splits x N)
# torch builds with a mixed-precision addmm (16-bit operands, float32 result; see backward.py)
_HAS_ADDMM_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


# ----------------------------------------------------------------------------- forward


@triton.jit
def _stats_partial_kernel(
    # data (E_desc, C_desc: TMA descriptors when TMA, else E and C again)
    E, C, E_desc, C_desc, Bias, Targets, MaxPart, SumPart, TPart, QPart, BestPart, IdPart, TargetLogit,
    # shapes
    N, V, D, tiles_per_split,
    # strides (the D stride of E and C is 1)
    stride_en, stride_cv,
    # constants
    softcap, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
    LOGPROB: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, ROUND_ARGMAX: tl.constexpr,
    VARIANCE: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr, FLATTEN: tl.constexpr,
):
    # programs in groups of GROUP_N token tiles x every split, the token tile fastest (forward.py)
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_splits = tl.cdiv(tl.cdiv(V, BLOCK_V), tiles_per_split)
    group_width = GROUP_N * num_splits
    first_n = (pid // group_width) * GROUP_N
    group_size = tl.minimum(num_n_tiles - first_n, GROUP_N)
    pid_n = first_n + (pid % group_width) % group_size
    pid_split = (pid % group_width) // group_size

    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    mask_n = offs_n < N
    if LOGPROB:
        targets = tl.load(Targets + offs_n, mask=mask_n, other=-1)  # [BLOCK_N] int64
    else:
        targets = tl.full((BLOCK_N,), -1, tl.int64)
    v_tile_begin = pid_split * tiles_per_split
    v_tile_end = tl.minimum(v_tile_begin + tiles_per_split, tl.cdiv(V, BLOCK_V))

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    run_t = tl.zeros((BLOCK_N,), tl.float32)
    run_q = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_id = tl.zeros((BLOCK_N,), tl.int64)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    # The same loop twice: tl.range(flatten=...) exists only in newer triton (see forward.py).
    if FLATTEN:
        for v_tile in tl.range(v_tile_begin, v_tile_end, flatten=True):
            run_max, run_sum, run_t, run_q, best, best_id, target_logit = _fold_tile(
                E, C, E_desc, C_desc, Bias, pid_n * BLOCK_N, offs_n, mask_n, targets, v_tile, V, D, stride_en,
                stride_cv, softcap, inv_temp, run_max, run_sum, run_t, run_q, best, best_id, target_logit,
                BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_TEMP, LOGPROB, ENTROPY, ARGMAX, ROUND_ARGMAX,
                VARIANCE, EVEN_D, DOT_PRECISION, UPCAST, TMA)
    else:
        for v_tile in range(v_tile_begin, v_tile_end):
            run_max, run_sum, run_t, run_q, best, best_id, target_logit = _fold_tile(
                E, C, E_desc, C_desc, Bias, pid_n * BLOCK_N, offs_n, mask_n, targets, v_tile, V, D, stride_en,
                stride_cv, softcap, inv_temp, run_max, run_sum, run_t, run_q, best, best_id, target_logit,
                BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_TEMP, LOGPROB, ENTROPY, ARGMAX, ROUND_ARGMAX,
                VARIANCE, EVEN_D, DOT_PRECISION, UPCAST, TMA)

    part = pid_split.to(tl.int64) * N + offs_n
    tl.store(MaxPart + part, run_max, mask=mask_n)
    tl.store(SumPart + part, run_sum, mask=mask_n)
    if ENTROPY or VARIANCE:
        tl.store(TPart + part, run_t, mask=mask_n)
    if VARIANCE:
        tl.store(QPart + part, run_q, mask=mask_n)
    if ARGMAX:
        tl.store(BestPart + part, best, mask=mask_n)
        tl.store(IdPart + part, best_id, mask=mask_n)
    if LOGPROB:
        owns_target = (targets >= v_tile_begin * BLOCK_V) & (targets < v_tile_end * BLOCK_V)
        tl.store(TargetLogit + offs_n, target_logit, mask=mask_n & owns_target)


@triton.jit
def _fold_tile(
    E, C, E_desc, C_desc, Bias, n0, offs_n, mask_n, targets, v_tile, V, D, stride_en, stride_cv, softcap,
    inv_temp, run_max, run_sum, run_t, run_q, best, best_id, target_logit,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
    LOGPROB: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, ROUND_ARGMAX: tl.constexpr,
    VARIANCE: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    """Fold one vocab tile into the running max, sum, first and second moments of z - m (entropy,
    VARIANCE), arg-max and target logit."""
    v0 = v_tile * BLOCK_V
    offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # [BLOCK_V]
    mask_v = offs_v < V
    z = logit_tile(E, C, E_desc, C_desc, n0, v0, offs_n, offs_v, mask_n, mask_v, D, stride_en, stride_cv,
                   BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, TMA, DOT_PRECISION, UPCAST)  # [BLOCK_N, BLOCK_V] float32
    z, _ = capped_logits(z, Bias, offs_v, mask_v, softcap, HAS_BIAS, HAS_SOFTCAP)
    if HAS_TEMP:
        z = z * inv_temp

    z_valid = tl.where(mask_v[None, :], z, float("-inf"))
    new_max = tl.maximum(run_max, tl.max(z_valid, axis=1))  # [BLOCK_N]
    alpha = tl.exp(run_max - new_max)  # 0 at the first tile (run_max = -inf)
    below = z_valid - new_max[:, None]  # z - m' <= 0; -inf in masked columns
    p = tl.exp2(below * LOG2E)  # [BLOCK_N, BLOCK_V]; 0 in masked columns
    if ENTROPY or VARIANCE:
        # re-base the moments on the new max, delta = m - m': sum e^(z-m')(z-m') = e^(m-m') (t + delta s),
        # sum e^(z-m')(z-m')^2 = e^(m-m') (q + 2 delta t + delta^2 s); at the first tile s = 0
        delta = tl.where(run_sum > 0.0, run_max - new_max, 0.0)
        below = tl.where(mask_v[None, :], below, 0.0)  # finite: p = 0 there
        p_below = p * below
        if VARIANCE:
            run_q = alpha * (run_q + 2.0 * delta * run_t + delta * delta * run_sum) + tl.sum(p_below * below, axis=1)
        run_t = alpha * (run_t + delta * run_sum) + tl.sum(p_below, axis=1)
    run_sum = run_sum * alpha + tl.sum(p, axis=1)
    if ARGMAX:
        if ROUND_ARGMAX:  # compare the logits as eager holds them: rounded to the input dtype
            z_cmp = z_valid.to(E.dtype.element_ty).to(tl.float32)
        else:
            z_cmp = z_valid
        tile_best = tl.max(z_cmp, axis=1)  # [BLOCK_N]
        tile_id = tl.argmax(z_cmp, axis=1, tie_break_left=True).to(tl.int64)  # the first of equal maxima
        better = tile_best > best  # strictly: an earlier tile keeps a tie
        best = tl.where(better, tile_best, best)
        best_id = tl.where(better, v0 + tile_id, best_id)
    if LOGPROB:
        cols = tl.where((targets >= v0) & (targets < v0 + BLOCK_V), targets - v0, -1).to(tl.int32)  # [BLOCK_N]
        target_logit += tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == cols[:, None], z, 0.0), axis=1)
    return new_max, run_sum, run_t, run_q, best, best_id, target_logit


@triton.jit
def _stats_combine_kernel(
    # data
    MaxPart, SumPart, TPart, QPart, BestPart, IdPart, TargetLogit, Targets, LogProb, Entropy, Argmax, Lse,
    Variance,
    # shapes
    N, V, num_splits,
    # constants
    ignore_index,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    LOGPROB: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, VARIANCE: tl.constexpr,
):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BLOCK_T]
    mask_t = offs_t < N
    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_T,), tl.float32)
    run_t = tl.zeros((BLOCK_T,), tl.float32)
    run_q = tl.zeros((BLOCK_T,), tl.float32)
    best = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    best_id = tl.zeros((BLOCK_T,), tl.int64)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        mask = mask_t[:, None] & (offs_s < num_splits)[None, :]  # [BLOCK_T, BLOCK_S]
        ptrs = offs_s[None, :].to(tl.int64) * N + offs_t[:, None]
        m = tl.load(MaxPart + ptrs, mask=mask, other=float("-inf"))
        s = tl.load(SumPart + ptrs, mask=mask, other=0.0)
        new_max = tl.maximum(run_max, tl.max(m, axis=1))
        new_max = tl.where(mask_t, new_max, 0.0)  # rows past N: keep the arithmetic finite
        alpha = tl.exp(run_max - new_max)
        w = tl.exp(m - new_max[:, None])  # 0 where masked
        if ENTROPY or VARIANCE:  # the partial moments re-based on the new max (as in _fold_tile)
            t = tl.load(TPart + ptrs, mask=mask, other=0.0)
            delta = tl.where(run_sum > 0.0, run_max - new_max, 0.0)  # [BLOCK_T]
            delta_s = tl.where(mask, m - new_max[:, None], 0.0)  # [BLOCK_T, BLOCK_S]
            if VARIANCE:
                q = tl.load(QPart + ptrs, mask=mask, other=0.0)
                run_q = alpha * (run_q + 2.0 * delta * run_t + delta * delta * run_sum) + tl.sum(
                    tl.where(mask, w * (q + 2.0 * delta_s * t + delta_s * delta_s * s), 0.0), axis=1)
            run_t = alpha * (run_t + delta * run_sum) + tl.sum(tl.where(mask, w * (t + delta_s * s), 0.0), axis=1)
        run_sum = run_sum * alpha + tl.sum(w * s, axis=1)
        run_max = new_max
        if ARGMAX:  # the best of the earliest split among equals: its ids are the lowest
            b = tl.load(BestPart + ptrs, mask=mask, other=float("-inf"))
            ids = tl.load(IdPart + ptrs, mask=mask, other=0)
            block_best = tl.max(b, axis=1)
            block_id = tl.min(tl.where(b == block_best[:, None], ids, V), axis=1)
            better = block_best > best
            best = tl.where(better, block_best, best)
            best_id = tl.where(better, block_id, best_id)
    run_sum = tl.where(mask_t, run_sum, 1.0)
    log_sum = tl.log(run_sum)
    lse = run_max + log_sum
    tl.store(Lse + offs_t, lse, mask=mask_t)
    if ENTROPY:
        tl.store(Entropy + offs_t, log_sum - run_t / run_sum, mask=mask_t)
    if VARIANCE:  # E[(z - m)^2] - E[z - m]^2
        mean = run_t / run_sum
        tl.store(Variance + offs_t, tl.maximum(run_q / run_sum - mean * mean, 0.0), mask=mask_t)
    if ARGMAX:
        tl.store(Argmax + offs_t, best_id, mask=mask_t)
    if LOGPROB:
        targets = tl.load(Targets + offs_t, mask=mask_t, other=ignore_index)
        valid = targets != ignore_index
        in_range = (targets >= 0) & (targets < V)
        logprob = tl.load(TargetLogit + offs_t, mask=mask_t & valid & in_range, other=0.0) - lse
        logprob = tl.where(in_range, logprob, float("nan"))
        tl.store(LogProb + offs_t, tl.where(valid, logprob, 0.0), mask=mask_t)


def stats_forward(e: Tensor, c: Tensor, bias: Tensor | None, targets: Tensor | None, ignore_index: int,
                  softcap: float, inv_temp: float, want_logprob: bool, want_entropy: bool, want_argmax: bool,
                  want_variance: bool = False, *, config=None, splits_per_step: int = 64):
    """(logprob, entropy, argmax, lse, variance) of flattened inputs, each (N,) (float32; argmax
    int64), None for what is not wanted; semantics of ``token_stats.chunked_stats_forward``. ``splits_per_step``:
    the combine kernel's splits per step of its loop (a power of two; tests take several steps)."""
    num_tokens = e.shape[0]
    if targets is None:  # never read without LOGPROB; prepare_inputs wants one
        targets = torch.empty(num_tokens, dtype=torch.int64, device=e.device)
    round_argmax = e.dtype in (torch.bfloat16, torch.float16)  # before prepare_inputs' promotion
    e, c, bias, targets = prepare_inputs(e, c, bias, targets)
    dim, vocab = e.shape[1], c.shape[0]
    cfg = config or forward_config(e)
    f32 = dict(dtype=torch.float32, device=e.device)
    lse = torch.empty(num_tokens, **f32)
    logprob = torch.empty(num_tokens, **f32) if want_logprob else None
    entropy = torch.empty(num_tokens, **f32) if want_entropy else None
    argmax = torch.empty(num_tokens, dtype=torch.int64, device=e.device) if want_argmax else None
    variance = torch.empty(num_tokens, **f32) if want_variance else None
    if num_tokens == 0:
        return logprob, entropy, argmax, lse, variance
    n_tiles, v_tiles = triton.cdiv(num_tokens, cfg.block_n), triton.cdiv(vocab, cfg.block_v)
    max_splits = max(1, min(1024, _PARTIAL_BYTES // (4 * num_tokens)))
    tiles_per_split, splits = vocab_splits(n_tiles, v_tiles, sm_count(e.device), max_splits)
    max_part = torch.empty(splits, num_tokens, **f32)
    sum_part = torch.empty_like(max_part)
    t_part = torch.empty_like(max_part) if want_entropy or want_variance else max_part
    q_part = torch.empty_like(max_part) if want_variance else max_part
    best_part = torch.empty_like(max_part) if want_argmax else max_part
    id_part = torch.empty(splits, num_tokens, dtype=torch.int64, device=e.device) if want_argmax else max_part
    target_logit = torch.empty(num_tokens, **f32) if want_logprob else lse
    e_desc = tma_descriptor(e, [cfg.block_n, cfg.block_d], cfg)
    c_desc = tma_descriptor(c, [cfg.block_v, cfg.block_d], cfg)
    tma = e_desc is not None and c_desc is not None
    _stats_partial_kernel[(n_tiles * splits,)](
        e, c, e_desc if tma else e, c_desc if tma else c, bias, targets, max_part, sum_part, t_part, q_part,
        best_part, id_part, target_logit,
        num_tokens, vocab, dim, tiles_per_split,
        e.stride(0), c.stride(0),
        float(softcap), float(inv_temp),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap != 0.0, HAS_TEMP=inv_temp != 1.0,
        LOGPROB=want_logprob, ENTROPY=want_entropy, ARGMAX=want_argmax, ROUND_ARGMAX=round_argmax,
        VARIANCE=want_variance, EVEN_D=dim % cfg.block_d == 0, DOT_PRECISION=dot_precision(e.dtype),
        UPCAST=dot_upcast(e),
        TMA=tma, FLATTEN=tma and HAS_FLATTEN,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    block_t = 64
    _stats_combine_kernel[(triton.cdiv(num_tokens, block_t),)](
        max_part, sum_part, t_part, q_part, best_part, id_part, target_logit, targets,
        logprob if want_logprob else lse, entropy if want_entropy else lse, argmax if want_argmax else lse, lse,
        variance if want_variance else lse,
        num_tokens, vocab, splits,
        ignore_index,
        BLOCK_T=block_t, BLOCK_S=min(splits_per_step, triton.next_power_of_2(splits)),
        LOGPROB=want_logprob, ENTROPY=want_entropy, ARGMAX=want_argmax, VARIANCE=want_variance, num_warps=4,
    )
    return logprob, entropy, argmax, lse, variance


# ----------------------------------------------------------------------------- backward


@triton.jit
def _stats_dz_kernel(
    # data (E_desc, C_desc, Dz_desc: TMA descriptors when TMA, else E, C, Dz again)
    E, C, E_desc, C_desc, Bias, Targets, Lse, Entropy, GradLogProb, GradEntropy, GradLse, dBias, Dz, Dz_desc,
    # shapes: tokens [0, N) of E x vocabulary rows [v_begin, v_begin + v_count) of C
    N, V, D, v_begin, v_count, num_programs,
    # strides (the D stride of E and C is 1)
    stride_en, stride_cv, stride_dzn,
    # constants
    ignore_index, softcap, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
    LOGPROB: tl.constexpr, ENTROPY: tl.constexpr, LSE: tl.constexpr, NEEDS_BIAS: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """dz of every (token tile, vocab tile) of the launch into the (N, v_count) buffer Dz, in the input
    dtype; dbias by float32 atomics. Persistent: one program per SM walks the tiles (with TMA the
    tile loop is flattened into the loop over D, so the next tile's loads overlap this tile's
    epilogue, as backward_buffered's dz kernel). LOGPROB / ENTROPY / LSE: which upstream gradients
    there are."""
    num_tiles = tl.cdiv(N, BLOCK_N) * tl.cdiv(v_count, BLOCK_V)
    # The same loop twice: tl.range(flatten=...) exists only in newer triton (see forward.py).
    if FLATTEN:
        for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
            _stats_dz_tile(E, C, E_desc, C_desc, Bias, Targets, Lse, Entropy, GradLogProb, GradEntropy, GradLse,
                           dBias, Dz, Dz_desc, tile, N, V, D, v_begin, v_count, stride_en, stride_cv, stride_dzn,
                           ignore_index, softcap, inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, GROUP_N, HAS_BIAS,
                           HAS_SOFTCAP, HAS_TEMP, LOGPROB, ENTROPY, LSE, NEEDS_BIAS, EVEN_D, DOT_PRECISION, UPCAST,
                           TMA)
    else:
        for tile in range(tl.program_id(0), num_tiles, num_programs):
            _stats_dz_tile(E, C, E_desc, C_desc, Bias, Targets, Lse, Entropy, GradLogProb, GradEntropy, GradLse,
                           dBias, Dz, Dz_desc, tile, N, V, D, v_begin, v_count, stride_en, stride_cv, stride_dzn,
                           ignore_index, softcap, inv_temp, BLOCK_N, BLOCK_V, BLOCK_D, GROUP_N, HAS_BIAS,
                           HAS_SOFTCAP, HAS_TEMP, LOGPROB, ENTROPY, LSE, NEEDS_BIAS, EVEN_D, DOT_PRECISION, UPCAST,
                           TMA)


@triton.jit
def _stats_dz_tile(
    E, C, E_desc, C_desc, Bias, Targets, Lse, Entropy, GradLogProb, GradEntropy, GradLse, dBias, Dz, Dz_desc,
    tile, N, V, D, v_begin, v_count, stride_en, stride_cv, stride_dzn, ignore_index, softcap, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
    LOGPROB: tl.constexpr, ENTROPY: tl.constexpr, LSE: tl.constexpr, NEEDS_BIAS: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):
    # GROUP_N token tiles sweep the launch's vocab tiles together (their E rows stay in L2)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    group_width = GROUP_N * tl.cdiv(v_count, BLOCK_V)
    first_n = (tile // group_width) * GROUP_N
    group_size = tl.minimum(num_n_tiles - first_n, GROUP_N)
    pid_n = first_n + (tile % group_width) % group_size
    pid_v = (tile % group_width) // group_size

    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    mask_n = offs_n < N
    pos_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # [BLOCK_V] position in the launch
    mask_v = pos_v < v_count
    ids_v = v_begin + pos_v

    # Per token, dz = g_lp onehot + p (a + g_H ((lse - z) - H)) with a = g_lse - g_lp, as
    #     dz = g_lp' onehot + p (c0 - c1 z),   c0 = (a + g_H (lse - H)) / T,  c1 = g_H / T,  g_lp' = g_lp / T
    # (the temperature's 1 / T folded in): one FMA per logit for the coefficient, one for the
    # exponent of p = exp2(z log2(e) - lse log2(e)). No row or column masks on the tile: rows past N
    # get lse = 1e30 (finite, so that p = 0 and 0 * c stays 0; all their coefficients are 0), and
    # columns past the launch's vocabulary are never stored (the descriptor clips them, the pointer
    # store and dbias's atomics are masked).
    lse = tl.load(Lse + offs_n, mask=mask_n, other=1e30)  # [BLOCK_N]
    c0 = tl.zeros((BLOCK_N,), tl.float32)
    if LSE:
        c0 += tl.load(GradLse + offs_n, mask=mask_n, other=0.0)
    if LOGPROB:
        targets = tl.load(Targets + offs_n, mask=mask_n, other=ignore_index)
        g_lp = tl.where(mask_n & (targets != ignore_index), tl.load(GradLogProb + offs_n, mask=mask_n, other=0.0), 0.0)
        c0 -= g_lp
    if ENTROPY:
        g_h = tl.load(GradEntropy + offs_n, mask=mask_n, other=0.0)
        c0 += g_h * (lse - tl.load(Entropy + offs_n, mask=mask_n, other=0.0))
    if HAS_TEMP:
        c0 = c0 * inv_temp
        if ENTROPY:
            g_h = g_h * inv_temp
        if LOGPROB:
            g_lp = g_lp * inv_temp

    z = logit_tile(E, C, E_desc, C_desc, pid_n * BLOCK_N, v_begin + pid_v * BLOCK_V, offs_n, ids_v, mask_n, mask_v,
                   D, stride_en, stride_cv, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, TMA, DOT_PRECISION, UPCAST)
    z, t = capped_logits(z, Bias, ids_v, mask_v, softcap, HAS_BIAS, HAS_SOFTCAP)
    if HAS_TEMP:
        z = z * inv_temp
    p = tl.exp2(z * LOG2E - (lse * LOG2E)[:, None])  # [BLOCK_N, BLOCK_V]
    if ENTROPY:
        dz = p * (c0[:, None] - g_h[:, None] * z)
    else:
        dz = p * c0[:, None]
    if LOGPROB:  # ids < V < 2^31: the compare in int32
        is_target = ids_v.to(tl.int32)[None, :] == targets.to(tl.int32)[:, None]
        dz += tl.where(is_target, g_lp[:, None], 0.0)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    if NEEDS_BIAS:
        tl.atomic_add(dBias + ids_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
    if TMA:  # the descriptor clips the tile at the buffer's edges
        Dz_desc.store([pid_n * BLOCK_N, pid_v * BLOCK_V], dz.to(Dz.dtype.element_ty))
    else:
        tl.store(Dz + offs_n[:, None] * stride_dzn + pos_v[None, :], dz.to(Dz.dtype.element_ty),
                 mask=mask_n[:, None] & mask_v[None, :])


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with float32 accumulation into a float32 acc: in place for float32 operands,
    cuBLAS's mixed-precision addmm for 16-bit ones on CUDA, else through float32 copies."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda" and _HAS_ADDMM_DTYPE:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def stats_backward(e: Tensor, c: Tensor, bias: Tensor | None, targets: Tensor | None, lse: Tensor,
                   entropy: Tensor | None, grad_logprob: Tensor | None, grad_entropy: Tensor | None,
                   grad_lse: Tensor | None, ignore_index: int, softcap: float, inv_temp: float,
                   needs_e: bool, needs_c: bool, needs_bias: bool, *, buffer_bytes: int = BUFFER_BYTES):
    """Gradients of sum(g_lp * logprob + g_H * entropy + g_lse * lse) w.r.t. e, c, bias (None where
    not needed; a None upstream gradient counts as 0); semantics of
    ``token_stats.chunked_stats_backward``. ``buffer_bytes`` bounds the dz buffer and dE's float32
    accumulator (``backward_buffered.buffered_shape``)."""
    orig_e_dtype, orig_c_dtype = e.dtype, c.dtype
    num_tokens = e.shape[0]
    with_logprob = grad_logprob is not None and targets is not None
    if targets is None:
        targets = torch.empty(num_tokens, dtype=torch.int64, device=e.device)
    e, c, bias, targets = prepare_inputs(e, c, bias, targets)
    dim, vocab = e.shape[1], c.shape[0]
    needs_bias = needs_bias and bias is not None
    if not (needs_e or needs_c or needs_bias):
        return None, None, None
    with_entropy = grad_entropy is not None
    if with_entropy and entropy is None:
        raise ValueError("a gradient of the entropy needs the forward's entropy")
    lse, entropy, grad_logprob, grad_entropy, grad_lse = map(_f32, (lse, entropy, grad_logprob, grad_entropy,
                                                                    grad_lse))
    dbias = torch.zeros(vocab, dtype=torch.float32, device=e.device) if needs_bias else None
    de = torch.empty(num_tokens, dim, dtype=e.dtype, device=e.device) if needs_e else None
    dc = torch.empty(vocab, dim, dtype=c.dtype, device=e.device) if needs_c else None
    if num_tokens == 0:
        if needs_c:
            dc.zero_()
        return de, dc, (dbias.to(bias.dtype) if needs_bias else None)

    cfg = buffered_config(e)
    sms = sm_count(e.device) if e.device.type == "cuda" else None
    rows, cols = buffered_shape(num_tokens, dim, vocab, e.element_size(), buffer_bytes, cfg.block_n, cfg.block_v,
                                sms=sms, max_chunk_tiles=None)
    ld = buffer_row_stride(cols)
    buf = torch.empty(rows * ld, dtype=e.dtype, device=e.device)
    acc = torch.empty(rows, dim, dtype=torch.float32, device=e.device) if needs_e else None
    c_desc = tma_descriptor(c, [cfg.block_v, cfg.block_d], cfg)
    dummy = lse
    constants = dict(
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap != 0.0, HAS_TEMP=inv_temp != 1.0,
        LOGPROB=with_logprob, ENTROPY=with_entropy, LSE=grad_lse is not None, NEEDS_BIAS=needs_bias,
        EVEN_D=dim % cfg.block_d == 0, DOT_PRECISION=dot_precision(e.dtype), UPCAST=dot_upcast(e),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    for n_begin in range(0, num_tokens, rows):
        n_count = min(rows, num_tokens - n_begin)
        window = slice(n_begin, n_begin + n_count)
        e_w = e[window]
        e_desc = tma_descriptor(e_w, [cfg.block_n, cfg.block_d], cfg)
        acc_w = acc[:n_count].zero_() if needs_e else None
        window_buf = buf[: n_count * ld].view(n_count, ld)
        for v_begin in range(0, vocab, cols):
            v_count = min(cols, vocab - v_begin)
            dz = window_buf[:, :v_count]
            dz_desc = tma_descriptor(dz, [cfg.block_n, cfg.block_v], cfg)
            tma = e_desc is not None and c_desc is not None and dz_desc is not None
            tiles = triton.cdiv(n_count, cfg.block_n) * triton.cdiv(v_count, cfg.block_v)
            programs = min(tiles, sm_count(e.device))
            _stats_dz_kernel[(programs,)](
                e_w, c, e_desc if tma else e_w, c_desc if tma else c, bias, targets[window], lse[window],
                entropy[window] if with_entropy else dummy,
                grad_logprob[window] if with_logprob else dummy, grad_entropy[window] if with_entropy else dummy,
                grad_lse[window] if grad_lse is not None else dummy, dbias if needs_bias else dummy,
                dz, dz_desc if tma else dz,
                n_count, vocab, dim, v_begin, v_count, programs,
                e.stride(0), c.stride(0), ld,
                ignore_index, float(softcap), float(inv_temp),
                TMA=tma, FLATTEN=tma and HAS_FLATTEN and softcap == 0.0, **constants,
            )
            c_chunk = c[v_begin : v_begin + v_count]
            if needs_e:
                _add_product(acc_w, dz, c_chunk)
            if needs_c:
                if n_begin == 0:
                    torch.mm(dz.T, e_w, out=dc[v_begin : v_begin + v_count])
                else:
                    dc[v_begin : v_begin + v_count].addmm_(dz.T, e_w)
        if needs_e:
            de[window].copy_(acc_w)
    return (
        de.to(orig_e_dtype) if needs_e else None,
        dc.to(orig_c_dtype) if needs_c else None,
        dbias.to(bias.dtype) if needs_bias else None,
    )


__all__ = ["stats_forward", "stats_backward"]

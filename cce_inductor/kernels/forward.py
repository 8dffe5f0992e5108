"""Forward of cut cross-entropy: per-token log-sum-exp and loss, never the N x V logits.

Algorithm (split-vocabulary online softmax, two launches, no locks):
  1. ``_lse_partial_kernel``, 1-D grid of (token tiles) x (vocab splits) in groups of GROUP_N token
     tiles x every split, the token tile varying fastest within a group: the programs resident
     together read the same classifier rows (one pass of C through L2 per wave rather than per token
     tile) and no more than GROUP_N tiles of E (all of E -- 67 MB at 8192 x 4096 -- would not stay
     in the 50 MB L2 between one vocab tile of a program and its next). A program owns BLOCK_N
     tokens and a contiguous run of vocab tiles; for each vocab tile it computes the logit tile
         z = E[n] @ C[v]^T (+ bias[v]) (softcapped: cap * tanh(z / cap))     # [BLOCK_N, BLOCK_V]
     in float32 on chip (``common.logit_tile``: tl.dot over D in BLOCK_D steps, inputs in their own
     dtype; on Hopper the E and C tiles come through TMA descriptors and the loop over vocab tiles is
     flattened into the loop over D, so the next tile's loads overlap this tile's epilogue), and folds it
     into a running max m and sum of exp(z - m) per token. The target logit z_y is taken from the
     same tile when the target falls in it, so that loss = lse - z_y of a confident token cancels
     consistently; with label smoothing the sum of the logits is accumulated too. Outputs per
     program: one partial lse per token (and a partial logit sum); the target logit is written by
     the one program whose vocab run holds the target.
  2. ``_combine_kernel``: lse = logsumexp over the splits; loss = lse - (1 - ls) z_y - ls / V sum_j z_j,
     0 where the target is ignore_index, NaN where it is outside [0, V).
  3. Only in ``lce_forward_with_keep``: step 1 also stores each token's log-sum-exp over each vocab
     tile, and ``_keep_flags_kernel`` turns them, with the lse and z_y, into the backward filter's
     keep flag per (token tile, vocab tile) -- so that the backward can skip the skipped tiles'
     recompute. Tokens in windows that bound the stored log-sum-exps (TILE_LSE_BYTES).

Sizes: the number of splits is picked on the host (integers only, no device sync) so that
(token tiles x splits) fills whole waves of the GPU; the partial buffers hold splits x N floats
(capped at 4 MiB each). All row offsets are int64 (N * D and V * D may pass 2^31).
Limits: dots in float32 inputs are IEEE float32 (not tf32); logits are accumulated in float32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    HAS_FLATTEN, LOG2E, TileConfig, capped_logits, dot_precision, dot_upcast, forward_config, logit_tile, prepare_inputs,
    sm_count, tma_descriptor,
)

_PARTIAL_BYTES = 4 * 2**20  # cap on one partial buffer (splits x N float32)
# Flatten the loop over vocab tiles (TMA loads only), so that the next tile's loads overlap this
# tile's epilogue. Flattened, the target compare runs on every tile; not flattened, only on tiles
# that hold a target. Flattened measured faster at the goal shapes (docs/PERF_NOTES.md).
FLATTEN_FORWARD = True


@triton.jit
def _lse_partial_kernel(
    # data (E_desc, C_desc: TMA descriptors of E and C when TMA, else E and C again)
    E, C, E_desc, C_desc, Bias, Targets, LsePart, LogitSumPart, TargetLogit, TileLse,
    # shapes
    N, V, D, tiles_per_split,
    # strides (the D stride of E and C is 1)
    stride_en, stride_cv,
    # constants
    softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr, FLATTEN: tl.constexpr, STORE_TILE_LSE: tl.constexpr,
):
    # Programs in groups of GROUP_N token tiles x every split, the token tile varying fastest: the
    # programs resident together read GROUP_N tiles of E and a few runs of C (see the module docstring).
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
    targets = tl.load(Targets + offs_n, mask=mask_n, other=-1)  # [BLOCK_N] int64

    v_tile_begin = pid_split * tiles_per_split
    v_tile_end = tl.minimum(v_tile_begin + tiles_per_split, tl.cdiv(V, BLOCK_V))

    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), tl.float32)
    # The same loop twice: tl.range(flatten=...) exists only in newer triton, and a constexpr branch
    # not taken is never compiled.
    if FLATTEN:
        for v_tile in tl.range(v_tile_begin, v_tile_end, flatten=True):
            run_max, run_sum, target_logit, logit_sum = _fold_tile(
                E, C, E_desc, C_desc, Bias, TileLse, pid_n * BLOCK_N, offs_n, mask_n, targets, v_tile, N, V, D,
                stride_en, stride_cv, softcap, run_max, run_sum, target_logit, logit_sum,
                BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, EVEN_D, DOT_PRECISION, UPCAST, TMA, FLATTEN,
                STORE_TILE_LSE)
    else:
        for v_tile in range(v_tile_begin, v_tile_end):
            run_max, run_sum, target_logit, logit_sum = _fold_tile(
                E, C, E_desc, C_desc, Bias, TileLse, pid_n * BLOCK_N, offs_n, mask_n, targets, v_tile, N, V, D,
                stride_en, stride_cv, softcap, run_max, run_sum, target_logit, logit_sum,
                BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING, EVEN_D, DOT_PRECISION, UPCAST, TMA, FLATTEN,
                STORE_TILE_LSE)

    part = pid_split.to(tl.int64) * N + offs_n
    tl.store(LsePart + part, run_max + tl.log(run_sum), mask=mask_n)
    if HAS_SMOOTHING:
        tl.store(LogitSumPart + part, logit_sum, mask=mask_n)
    owns_target = (targets >= v_tile_begin * BLOCK_V) & (targets < v_tile_end * BLOCK_V)
    tl.store(TargetLogit + offs_n, target_logit, mask=mask_n & owns_target)


@triton.jit
def _fold_tile(
    E, C, E_desc, C_desc, Bias, TileLse, n0, offs_n, mask_n, targets, v_tile, N, V, D,
    stride_en, stride_cv, softcap, run_max, run_sum, target_logit, logit_sum,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    FLATTEN: tl.constexpr, STORE_TILE_LSE: tl.constexpr,
):
    """Fold one vocab tile into the running max, sum of exp, target logit and logit sum; with
    STORE_TILE_LSE, store the tile's own log-sum-exp per token in TileLse[v_tile, token] (float32)."""
    v0 = v_tile * BLOCK_V
    offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # [BLOCK_V]
    mask_v = offs_v < V
    z = logit_tile(E, C, E_desc, C_desc, n0, v0, offs_n, offs_v, mask_n, mask_v, D, stride_en, stride_cv,
                   BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, TMA, DOT_PRECISION, UPCAST)  # [BLOCK_N, BLOCK_V] float32
    z, _ = capped_logits(z, Bias, offs_v, mask_v, softcap, HAS_BIAS, HAS_SOFTCAP)

    z_valid = tl.where(mask_v[None, :], z, float("-inf"))
    new_max = tl.maximum(run_max, tl.max(z_valid, axis=1))
    # exp(z - m) as exp2(z log2(e) - m log2(e)): one FMA per logit before the ex2 instead of a
    # subtraction and a multiplication; the exponent rounds at ~|m| * 2^-24, within the float32
    # logit's own rounding
    scaled_max = new_max * LOG2E
    tile_sum = tl.sum(tl.exp2(z_valid * LOG2E - scaled_max[:, None]), axis=1)  # [BLOCK_N]
    run_sum = run_sum * tl.exp(run_max - new_max) + tile_sum
    if STORE_TILE_LSE:  # -inf where the tile's share underflows (its mass is 0 then)
        tile_rows = (tl.zeros_like(offs_n) + v_tile) * N  # int64 (offs_n is)
        tl.store(TileLse + tile_rows + offs_n, new_max + tl.log(tile_sum), mask=mask_n)
    # The target logit comes from the tile itself (so that lse - z_y of a confident token cancels
    # to the rounding of one tile), but the full-tile compare runs only in the few tiles that hold
    # some token's target (at most BLOCK_N of the V / BLOCK_V tiles) -- except in a flattened loop,
    # where triton 3.6's flattening rejects a data-dependent branch.
    hit = (targets >= v0) & (targets < v0 + BLOCK_V)  # [BLOCK_N]
    cols = tl.where(hit, targets - v0, -1).to(tl.int32)  # [BLOCK_N] the target's column here, or -1
    if FLATTEN:
        target_logit += tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == cols[:, None], z, 0.0), axis=1)
    elif tl.max(hit.to(tl.int32), axis=0) > 0:
        target_logit += tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == cols[:, None], z, 0.0), axis=1)
    if HAS_SMOOTHING:
        logit_sum += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
    return new_max, run_sum, target_logit, logit_sum


@triton.jit
def _combine_kernel(
    # data
    LsePart, LogitSumPart, TargetLogit, Targets, Loss, Lse,
    # shapes
    N, V, num_splits,
    # constants
    ignore_index, target_weight, uniform_weight,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BLOCK_T]
    mask_t = offs_t < N
    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_T,), tl.float32)
    logit_sum = tl.zeros((BLOCK_T,), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        mask = mask_t[:, None] & (offs_s < num_splits)[None, :]
        ptrs = offs_s[None, :].to(tl.int64) * N + offs_t[:, None]  # [BLOCK_T, BLOCK_S]
        part = tl.load(LsePart + ptrs, mask=mask, other=float("-inf"))
        new_max = tl.maximum(run_max, tl.max(part, axis=1))
        new_max = tl.where(mask_t, new_max, 0.0)  # rows past N: keep the arithmetic finite
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(part - new_max[:, None]), axis=1)
        run_max = new_max
        if HAS_SMOOTHING:
            logit_sum += tl.sum(tl.load(LogitSumPart + ptrs, mask=mask, other=0.0), axis=1)
    lse = run_max + tl.log(tl.where(mask_t, run_sum, 1.0))

    targets = tl.load(Targets + offs_t, mask=mask_t, other=ignore_index)
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    target_logit = tl.load(TargetLogit + offs_t, mask=mask_t & valid & in_range, other=0.0)
    loss = lse - target_weight * target_logit
    if HAS_SMOOTHING:
        loss -= uniform_weight * logit_sum
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(valid, loss, 0.0)
    tl.store(Loss + offs_t, loss, mask=mask_t)
    tl.store(Lse + offs_t, lse, mask=mask_t)


@triton.jit
def _keep_flags_kernel(
    # data: TileLse float32 (vocab tiles, n) of the window's tokens; Keep int8, row stride keep_stride
    TileLse, Lse, TargetLogit, Targets, Keep,
    # shapes
    n, V, keep_stride,
    # constants
    ignore_index, filter_tau,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """The backward filter's keep flag of every (token tile, vocab tile) of a window, from the forward's
    per-token tile log-sum-exps: for token i and tile t the filter's mass sum_{j in t} |dz_ij| / |g_i| is
        m_it = P_it                  (P_it = exp(L_it - lse_i), the tile's share of the softmax)
        m_it = P_it + 1 - 2 p_iy     (the tile holding the target y: |p_iy - 1| in place of p_iy)
    and the tile is kept iff m_it >= 2 filter_tau |t| (and m_it > 0) for some non-ignored token -- the
    backward's rule (backward_shared._filter_keep) for the plain loss (grad_lse = 0, no label smoothing, no
    softcap), where w_i = 2 |g_i| makes it independent of the upstream gradient. A token whose target
    is outside [0, V) keeps every tile (its loss is NaN)."""
    pid_n = tl.program_id(0)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    mask_n = offs_n < n
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] vocab tiles
    num_v_tiles = tl.cdiv(V, BLOCK_V)
    mask_t = offs_t < num_v_tiles
    targets = tl.load(Targets + offs_n, mask=mask_n, other=ignore_index)
    valid = mask_n & (targets != ignore_index)
    in_range = (targets >= 0) & (targets < V)
    lse = tl.load(Lse + offs_n, mask=mask_n, other=0.0)
    p_target = tl.exp(tl.load(TargetLogit + offs_n, mask=valid & in_range, other=float("-inf")) - lse)
    tile_lse = tl.load(TileLse + offs_t[:, None].to(tl.int64) * n + offs_n[None, :],
                       mask=mask_t[:, None] & mask_n[None, :], other=float("-inf"))  # [BLOCK_T, BLOCK_N]
    mass = tl.exp(tile_lse - lse[None, :])
    holds_target = offs_t[:, None] == (targets // BLOCK_V)[None, :]
    mass = tl.where(holds_target, tl.maximum(mass + 1.0 - 2.0 * p_target[None, :], 0.0), mass)
    width = tl.minimum(V - offs_t * BLOCK_V, BLOCK_V).to(tl.float32)  # [BLOCK_T]
    over = (mass >= 2.0 * filter_tau * width[:, None]) & (mass > 0.0)
    over = (over | ~in_range[None, :]) & valid[None, :]
    keep = tl.max(over.to(tl.int32), axis=1) > 0  # [BLOCK_T]
    tl.store(Keep + pid_n.to(tl.int64) * keep_stride + offs_t, keep.to(tl.int8), mask=mask_t)


@functools.lru_cache(maxsize=1024)
def vocab_splits(n_tiles: int, v_tiles: int, sms: int, max_splits: int) -> tuple[int, int]:
    """(vocab tiles per split, splits) that minimize the waves x tiles-per-program makespan, one
    program per SM at a time; ties go to fewer splits (less partial memory)."""
    best = None
    for s in range(1, min(v_tiles, max_splits) + 1):
        per_split = -(-v_tiles // s)
        splits = -(-v_tiles // per_split)
        cost = -(-(n_tiles * splits) // sms) * per_split
        if best is None or cost < best[0]:
            best = (cost, per_split, splits)
    return best[1], best[2]


# The forward's scratch for the per-token tile log-sum-exps that keep flags are formed from
# (lce_forward_with_keep): 4 bytes per (token, vocab tile); the tokens go in windows that fit.
TILE_LSE_BYTES = 16 * 2**20


def lce_forward(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
    *,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token loss and log-sum-exp (float32, shape (N,)); semantics of reference.chunked_forward."""
    loss, lse, _ = _forward(e, c, bias, targets, ignore_index, softcap, label_smoothing, config, None)
    return loss, lse


def lce_forward_with_keep(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    filter_eps: float,
    *,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, keep): ``lce_forward`` (no softcap, no label smoothing) and the backward filter's
    keep flags, int8 (token tiles, vocab tiles) of the forward's BLOCK_N x BLOCK_V tiles (the
    buffered backward's dz tiles), formed from each token's tile log-sum-exps (``_keep_flags_kernel``)
    -- so that the backward computes only the kept tiles (``backward.lce_backward(keep=...)``). The
    flags are the backward's rule exactly where grad_lse = 0 (an lse that nothing downstream uses).
    Extra work: one float32 store per (token, vocab tile) and a pass over them, in windows of tokens
    whose scratch fits TILE_LSE_BYTES; the flags take (N / BLOCK_N) * (V / BLOCK_V) bytes."""
    return _forward(e, c, bias, targets, ignore_index, 0.0, 0.0, config, filter_eps)


def keep_shape(num_tokens: int, vocab: int, cfg: TileConfig) -> tuple[int, int]:
    """(token tiles, vocab tiles) of the keep flags ``lce_forward_with_keep`` returns."""
    return -(-num_tokens // cfg.block_n), -(-vocab // cfg.block_v)


def _forward(e, c, bias, targets, ignore_index, softcap, label_smoothing, config, filter_eps):
    e, c, bias, targets = prepare_inputs(e, c, bias, targets)
    num_tokens, dim = e.shape
    vocab = c.shape[0]
    cfg = config or forward_config(e)
    loss = torch.empty(num_tokens, dtype=torch.float32, device=e.device)
    lse = torch.empty_like(loss)
    with_keep = filter_eps is not None
    keep = torch.empty(keep_shape(num_tokens, vocab, cfg), dtype=torch.int8, device=e.device) if with_keep else None
    if num_tokens == 0:
        return loss, lse, keep
    v_tiles = triton.cdiv(vocab, cfg.block_v)
    window = num_tokens
    if with_keep:  # windows of whole token tiles whose tile log-sum-exps fit the scratch
        window = min(num_tokens, max(1, TILE_LSE_BYTES // (4 * v_tiles * cfg.block_n)) * cfg.block_n)
    smoothing = label_smoothing != 0.0
    c_desc = tma_descriptor(c, [cfg.block_v, cfg.block_d], cfg)
    target_logit = torch.empty_like(loss)
    tile_lse = torch.empty(v_tiles * window, dtype=torch.float32, device=e.device) if with_keep else loss
    for n_begin in range(0, num_tokens, window):
        rows = slice(n_begin, min(num_tokens, n_begin + window))
        e_w, targets_w, n = e[rows], targets[rows], rows.stop - rows.start
        n_tiles = triton.cdiv(n, cfg.block_n)
        max_splits = max(1, min(1024, _PARTIAL_BYTES // (4 * n)))
        tiles_per_split, splits = vocab_splits(n_tiles, v_tiles, sm_count(e.device), max_splits)
        lse_part = torch.empty(splits, n, dtype=torch.float32, device=e.device)
        logit_sum_part = torch.empty_like(lse_part) if smoothing else lse_part
        e_desc = tma_descriptor(e_w, [cfg.block_n, cfg.block_d], cfg)
        tma = e_desc is not None and c_desc is not None
        _lse_partial_kernel[(n_tiles * splits,)](
            e_w, c, e_desc if tma else e_w, c_desc if tma else c, bias, targets_w, lse_part, logit_sum_part,
            target_logit[rows], tile_lse,
            n, vocab, dim, tiles_per_split,
            e.stride(0), c.stride(0),
            float(softcap),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap != 0.0, HAS_SMOOTHING=smoothing,
            EVEN_D=dim % cfg.block_d == 0, DOT_PRECISION=dot_precision(e.dtype), UPCAST=dot_upcast(e),
            TMA=tma, FLATTEN=tma and HAS_FLATTEN and FLATTEN_FORWARD,  # flattened pointer loads measured slower
            STORE_TILE_LSE=with_keep, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        block_t = 64
        _combine_kernel[(triton.cdiv(n, block_t),)](
            lse_part, logit_sum_part, target_logit[rows], targets_w, loss[rows], lse[rows],
            n, vocab, splits,
            ignore_index, 1.0 - label_smoothing, label_smoothing / vocab,
            BLOCK_T=block_t, BLOCK_S=min(64, triton.next_power_of_2(splits)), HAS_SMOOTHING=smoothing,
            num_warps=4,
        )
        if with_keep:
            block_vt = 16 if e.device.type == "cuda" else 4
            _keep_flags_kernel[(n_tiles, triton.cdiv(v_tiles, block_vt))](
                tile_lse, lse[rows], target_logit[rows], targets_w, keep[n_begin // cfg.block_n :],
                n, vocab, keep.stride(0),
                ignore_index, filter_eps / vocab,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_T=block_vt, num_warps=4,
            )
    return loss, lse, keep


__all__ = ["keep_shape", "lce_forward", "lce_forward_with_keep", "vocab_splits"]

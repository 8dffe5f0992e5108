"""Backward of cut cross-entropy: dE, dC, dbias from recomputed logit tiles, with bounded filtering.

Two paths share the logit tile (``common.logit_tile``) and the gradient of the logits (``_logit_grad``):
  * buffered (16-bit inputs, exact; ``_buffered_backward``): a persistent kernel (``_dz_kernel``; on
    Hopper TMA loads and stores, its tile loop flattened except under a softcap) writes each tile's
    dz into a bounded buffer and cuBLAS forms dE and dC from it -- the default, measured 3.23-3.35 T
    for the backward on an H200 (T = the cuBLAS logits GEMM; results/h200-2026-12-01f), 3.30-3.76 T on
    an H100 before the windows were sized to the SMs (results/h100-2026-11-23d); with the filter, a
    Triton GEMM (``_filtered_de_kernel``) forms dE over the tiles the filter keeps, and with
    ``dc_filter="corrected"`` another (``_filtered_dc_kernel``) forms dC over them plus a rank-1
    stand-in for each skipped tile; with the forward's keep flags (``keep``, from
    ``forward.lce_forward_with_keep``) the dz kernel recomputes only the kept tiles and both GEMMs
    run over them (dC without stand-ins: a skipped tile has no column sums without its recompute);
  * atomic (float32 inputs, a filtered dC, a vocabulary order, torch builds without a mixed-precision
    addmm): the kernel ``_backward_kernel`` forms dE and dC itself with float32 atomics, as described
    below -- ~10-11 T.

Gradient of sum_i (grad_loss_i * loss_i + grad_lse_i * lse_i) w.r.t. the (capped) logits z:
    dz_ij = (g_i + grad_lse_i) * p_ij - g_i * ((1 - ls) * [j == y_i] + ls / V),   p = softmax(z),
with g_i = grad_loss_i where y_i != ignore_index, else 0 (an ignored token's loss is constant);
times (1 - tanh^2(u_ij / cap)) under a softcap. Then dE = dz @ C, dC = dz^T @ E, dbias = sum_i dz.

Algorithm (``_backward_kernel``): one program per (token tile, vocab tile), BLOCK_N x BLOCK_V, in
groups of GROUP_N token tiles that sweep the vocabulary together (their E rows, dE rows stay in L2).
  1. recompute z = E[n] @ C[v]^T (+ bias, softcap) in float32, accumulating over D;  # [BLOCK_N, BLOCK_V]
  2. p = exp(z - lse) with the forward's lse, dz as above, in float32;              # [BLOCK_N, BLOCK_V]
  3. dbias[v] += sum_n dz (float32 atomics, never filtered);
  4. cast dz to the input dtype and, for each BLOCK_D slice of D (``_gradient_gemms``),
     dE[n, d] += dz @ C[v, d] (unless filtered, below) and dC[v, d] += dz^T @ E[n, d]   # [BLOCK_N | BLOCK_V, BLOCK_D]
     as float32 atomic adds (relaxed). The float32 sums depend on the order of the atomics: two runs
     agree to float32 rounding of the accumulators, not bit for bit.

Accumulators (float32): at most ``window_bytes`` (default 32 MiB) of scratch at any time, whatever
N, D and V are. dC for 16-bit inputs goes through a float32 window of the vocabulary: the kernel is
launched once per window of vocabulary rows and each finished window is rounded into the 16-bit dC.
dE for 16-bit inputs accumulates in an (N, D) float32 buffer in the same launches when that buffer
fits in half of ``window_bytes`` (the dC window gets the rest); otherwise it is formed in a second
pass over windows of tokens (each launch covers the whole vocabulary for its tokens, dC off), which
recomputes the logits once more. float32 inputs accumulate straight into their outputs.
Measured before the scratch of the two passes was scoped apart: 67.2 MB above the gradients
(both 32 MiB windows alive in pass 2); by construction now at most one window, ~34 MB (not yet
re-measured on a GPU).

Cost (H100, bf16, measured 2026 with triton 3.6): the backward is bound by the L2 traffic of the
atomics, (BLOCK_N + BLOCK_V) * D * 4 bytes per tile against 6 * BLOCK_N * BLOCK_V * D flops: about
9 T (T = the cuBLAS logits GEMM) at 8192 x 2304 x 256000. Staggering the D order between programs
and 128 x 256 / 256 x 128 tiles were measured slower. Reaching ~3 T needs fewer partial sums per
flop (issue 6): larger reductions on chip before a flush, or a logits workspace.

Gradient filtering (``filter_grad=True``; ``False`` is exact and skips nothing):
  A (token tile, vocab tile) block skips its dE GEMM (``filter_dc=True``: its dC GEMM too) iff for
  EVERY token i of the tile
        sum_{j in tile} |dz_ij|  <  eps * (|tile| / V) * w_i,     w_i = |g_i + grad_lse_i| + |g_i|,
  |tile| = the tile's number of vocabulary entries (BLOCK_V, fewer at the edge).
  Bound: sum_j |dz_ij| <= w_i for every token (the softmax sums to one), and the tiles' widths sum
  to V, so the gradient mass dropped from any token's row of dz is < eps * w_i, in every data
  regime, and dE_i is off by at most eps * w_i * max_j |C_j|: a per-token bound, so dE's relative
  error does not grow with N (measured flat, 3.2e-3 at N = 4K..32K). For the plain loss
  w_i = 2 g_i: a tile is skipped only where every token has less than 2 eps times the uniform share
  |tile| / V of probability there, so a near-uniform softmax is never filtered (eps < 1/2); a tile
  holding a token's target is filtered only if 1 - p_y is that small; label smoothing ls puts
  ls * |tile| / V of mass in every tile, so with ls >= 2 eps nothing is filtered.
  Why dC is not filtered by default: dC_j = sum_i dz_ij E_i sums over tokens, and the dropped
  terms of a rarely likely row j add up coherently while dC's norm grows more slowly, so the same
  rule bounds only sum_j |error of dC_j| <= eps * sum_i w_i |E_i|, not dC's relative error.
  Measured (LM-like, D=2304, V=256000, eps=2^-2, s=0.64): dC error vs exact 4.7e-3, 6.9e-3, 9.6e-3,
  1.35e-2 at N = 4K, 8K, 16K, 32K (the bar is ~1.45e-2). ``dc_filter="dropped"`` keeps that mode
  for measurements. Replacing each skipped tile's dC terms by colsum(dz)^T mean(E rows) instead of
  dropping them held that error nearly flat in a float32 study (benchmarks/dc_filter_study.py:
  3.2e-4 against 2.9e-3 dropped at 8192 x 4096 x 128256): ``dc_filter="corrected"`` in the
  buffered path (``_filtered_dc_kernel``; opt-in, see DC_FILTER). eps = FILTER_EPS, chosen by
  measurement (see the constant).
  Vocabulary ordering (optional, off by default: measured not to help, see DEFAULT_ORDER): the
  vocabulary can be walked in the order of descending c_j . mean(e) through an index array (C is
  not copied), so that rarely likely entries share tiles; ``vocab_order`` in ``lce_backward``.
  ``tile_counts`` (optional int32 (2,) tensor) receives [tiles computed, tiles filtered] for
  measuring the skipped fraction s; the default op path passes none and never syncs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .forward import keep_shape
from .common import (
    HAS_FLATTEN, LOG2E, TileConfig, as_f32, backward_config, buffered_config, capped_logits, dot, dot_precision,
    dot_upcast, filtered_dc_config, filtered_de_config, logit_tile, prepare_inputs, sm_count, tma_descriptor,
)

# Dropped gradient mass per token is < FILTER_EPS * w_i (see the module docstring); with eps < 1/2
# a uniform softmax is never filtered. Measured on the LM-like regime (testing.make_inputs,
# D=2304, V=256000, 128 x 128 tiles; errors of the filtered dE relative to the exact one):
#   eps = 2^-3: s = 0.001-0.007, dE 1.4e-4..2.9e-4;  eps = 2^-2: s = 0.63-0.66, dE 3.2e-3
#   (N = 4K..32K, H100); CPU simulation at N=512: 2^-4 s=0.03; 2^0 s=0.84, dE 3.1e-3.
# The tail of that softmax (~10% of the mass spread over the whole vocabulary) sits between 2^-3 and
# 2^-2: no bounded rule skips a tile without dropping its share of that tail. The bar for dE is
# max(1.5 x torch bf16's error, 5e-3) >= 5e-3 (torch bf16: 1.2e-3 uniform, 9.4e-3 LM-like).
# 2^-2 was the default until a 300-step convergence run (H100, real text) put the filtered training
# loss 0.02-0.04 above eager's (mean |difference| per step 0.024 against compile's 0.002): the
# dropped tail is biased, not noise. 2^-3 drops at most 1/8 of each token's gradient scale.
FILTER_EPS = 2.0**-3
# Vocabulary rows of the float32 dC window for 16-bit inputs.
WINDOW_BYTES = 32 * 2**20
# The buffered path's scratch: a (tokens x vocabulary) dz buffer in the input dtype plus the float32
# dE accumulator of its tokens. 56 MiB (58.7 MB) keeps the backward within 64 MB of the gradients' own
# size; the exact path widens its chunks into it (buffered_shape: 8448 entries at 8192 x 2304 x 256000,
# 6144 at 8192 x 4096 x 128256; it was 48 MiB with 4096-wide chunks).
BUFFER_BYTES = 56 * 2**20
# The buffered path's vocabulary chunk (the narrowest, and the width windows are sized for): the dE
# GEMM's reduction and the dC GEMM's row count, wide enough for cuBLAS to run near its peak (measured
# with the earlier recompute kernel: backward 3.6-3.9 T at 4096, H100; a 16384-wide chunk made the dz
# kernel ~4% faster, benchmarks/gemm_core_variants.py). The exact path widens it where the budget allows.
CHUNK_V = 4096
# Window sizes chosen so that the dz kernel's launches fill whole waves of SMs (see buffered_shape);
# False: the fewest, evenly sized windows (for measurements).
WAVE_ALIGNED_WINDOWS = True
# At most this many vocab tiles per chunk of the filtered path: its dE GEMM lists a token tile's kept
# vocab tiles in four int64 words, 16 tiles of 4 bits each (_kept_tile_lists). 64 x 256 = 16384 entries
# on the GPU; it was 16 (one word) until the filtered chunks widened. Measured on an H200 against an
# int64 bitmask walked by its lowest set bit (a loop-carried index; backward_variants --de-variants,
# results/h200-2026-12-01g): the lists within 0.1 ms or faster at every one of 12 points, faster by
# 0.5-1.8 ms at 7; against the single word at 2816 x 4096 (compare_old.log) 1.1 ms slower at 128 x 128
# dE tiles, within 0.1 ms at 128 x 256.
MAX_CHUNK_TILES = 64
# At most this many token tiles per window where dC is filtered: the filtered dC GEMM lists a vocab
# tile's kept token tiles in the same four words (8192 tokens at 128-token tiles).
MAX_WINDOW_TILES = 64
# What filtering does to dC (see the module docstring), where the caller does not say: "exact" (dC
# never filtered: cuBLAS over the whole buffer) or "corrected" (the buffered path only: a skipped
# tile's dC terms replaced by the rank-1 stand-in colsum(dz)^T mean(E rows), dC by a Triton GEMM over
# the kept tiles, _filtered_dc_kernel); "dropped" (the atomic kernel only, for measurements) drops a
# skipped tile's dC terms with no stand-in. Measured on an H200 (bf16, backward in interleaved rounds;
# backward_variants --dc-variants, results/h200-2026-12-01h/dc_variants.log), corrected against exact
# dC: 8192 x 4096 x 128256 LM-like (s = 0.434) 37.06 against 38.08 ms, uniform 46.86 against 43.12;
# 8192 x 2304 x 256000 LM-like (s = 0.003) 54.27 against 48.88, uniform 54.67 against 49.42 -- its
# Triton GEMM runs at 1.25 T where cuBLAS's runs at 1.0 T. dC against float64 math: 2.98e-3
# corrected, 3.36e-3 exact at the first point (bf16 rounding dominates both). With the filtered GEMMs'
# TMA epilogues (FILTERED_*_EPILOGUE_PARTS; results/h200-2026-12-01i/, op-level bench, fw+bw):
# corrected 48.68 against 51.49 ms at the first point, 58.58 against 55.86 (uniform), 67.75 against
# 64.70 and 67.42 against 64.61 at the second -- faster only where much is skipped. Hence "exact".
DC_FILTER = "exact"
DC_FILTERS = ("exact", "corrected", "dropped")
# The filtered dE GEMM as a persistent kernel with its tile loop flattened (else one program per
# output tile). Measured (H100, bf16, LM-like, every tile kept; benchmarks/backward_variants.py):
# backward 54.3 against 55.2 ms at 8192 x 2304 x 256000, 43.5 against 43.6 ms at 8192 x 4096 x 128256.
FILTERED_DE_PERSISTENT = True
# The buffered path's dz epilogue without its row and column masks, with exp2 and an int32 target
# compare (see _logit_grad); False: the masked epilogue, for measurement. Measured on an H200 in
# interleaved rounds (benchmarks/backward_variants.py --epilogue, results/h200-2026-12-01c): backward
# 49.14 / 49.04 ms against 50.28 / 50.42 ms at 8192 x 2304 x 256000 (LM-like / uniform), 41.86 / 42.93
# against 42.73 / 43.32 ms at 8192 x 4096 x 128256. The atomic kernel always runs the masked one.
LEAN_DZ_EPILOGUE = True
# Tiles per step of _listed_tiles_kernel's loop over a dz launch (a launch may hold up to 64 x 64).
LIST_BLOCK = 1024
# torch builds with a mixed-precision addmm (16-bit operands, float32 result): the buffered path's
# dE accumulator needs it on CUDA (torch >= 2.8 or so; older builds take the atomic path).
_HAS_ADDMM_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


@triton.jit
def _token_coefficients(Targets, Lse, GradLoss, GradLse, offs_n, mask_n, V, ignore_index, LEAN: tl.constexpr):
    """Per token of a tile: clamped target, g_loss (0 where ignored), g_p = g_loss + grad_lse, lse
    (+inf past N, so that those rows' p is 0 without a mask)."""
    targets = tl.load(Targets + offs_n, mask=mask_n, other=ignore_index)
    valid = mask_n & (targets != ignore_index)
    g_loss = tl.where(valid, tl.load(GradLoss + offs_n, mask=mask_n, other=0.0), 0.0)  # [BLOCK_N]
    g_p = g_loss + tl.load(GradLse + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]
    if LEAN:
        lse = tl.load(Lse + offs_n, mask=mask_n, other=float("inf"))  # [BLOCK_N]
    else:
        lse = tl.load(Lse + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]
    targets = tl.minimum(tl.maximum(targets, 0), V - 1)  # out-of-range targets: as the reference
    return targets, g_loss, g_p, lse


@triton.jit
def _logit_grad(z, t, lse, g_p, g_loss, targets, ids_v, mask_n, mask_v, target_weight, uniform_weight,
                HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, LEAN: tl.constexpr):
    """dz = g_p * p - g_loss * ((1 - ls) onehot + ls / V), times 1 - t^2 under a softcap, float32
    [BLOCK_N, BLOCK_V]; 0 in rows past N. LEAN (the buffered path's dz kernel only): columns past
    the launch's vocabulary hold garbage, possibly inf (p = exp(-lse) there), and every consumer
    masks them -- the stores (clipped by the descriptor or masked), dbias and the filter's mass
    (tl.where). The atomic kernel multiplies dz by C's zero rows there (inf * 0 = NaN), so it keeps
    the masked epilogue."""
    if LEAN:
        # the row mask comes from lse = +inf (p = 0) and g = 0 past N; exp2 with log2(e) folded in
        # (one FMA; the exponent rounds at ~|lse| * 2^-24, as the float32 logit itself does); the
        # target compare in int32 (ids < V < 2^31)
        p = tl.exp2(z * LOG2E - (lse * LOG2E)[:, None])
        is_target = ids_v.to(tl.int32)[None, :] == targets.to(tl.int32)[:, None]
        onehot = tl.where(is_target, target_weight, 0.0)
        if HAS_SMOOTHING:
            onehot += uniform_weight
    else:
        mask_nv = mask_n[:, None] & mask_v[None, :]
        p = tl.where(mask_nv, tl.exp(z - lse[:, None]), 0.0)
        is_target = ids_v[None, :] == targets[:, None]
        onehot = tl.where(is_target & mask_v[None, :], target_weight, 0.0)
        if HAS_SMOOTHING:
            onehot += tl.where(mask_v[None, :], uniform_weight, 0.0)
    dz = g_p[:, None] * p - g_loss[:, None] * onehot
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    return dz


@triton.jit
def _filter_keep(dz, mask_v, g_p, g_loss, width, filter_tau):
    """The filter's rule for one tile of dz (float32 [BLOCK_N, BLOCK_V], ``width`` valid vocabulary
    columns, mask_v): keep it unless every token's mass there is < filter_tau * width * w_i."""
    mass = tl.sum(tl.where(mask_v[None, :], tl.abs(dz), 0.0), axis=1)  # [BLOCK_N]
    scale = tl.abs(g_p) + tl.abs(g_loss)  # [BLOCK_N]
    over = (mass >= filter_tau * width * scale) & (mass > 0.0)  # not negligible for this token
    return tl.max(over.to(tl.int32), axis=0) > 0


@triton.jit
def _dz_kernel(
    # data (E_desc, C_desc, Dz_desc: TMA descriptors when TMA, else E, C, Dz again)
    E, C, E_desc, C_desc, Bias, Targets, Lse, GradLoss, GradLse, dBias, Dz, Dz_desc, Keep, ColSums, TileCounts,
    TileList, TileCount,
    # shapes: tokens [0, N) of E x vocabulary rows [v_begin, v_begin + v_count) of C
    N, V, D, v_begin, v_count, num_programs,
    # strides (the D stride of E and C is 1)
    stride_en, stride_cv, stride_dzn, stride_sn,
    # constants
    ignore_index, softcap, target_weight, uniform_weight, filter_tau,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    NEEDS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr, FLATTEN: tl.constexpr, FILTER: tl.constexpr, FILTER_DC: tl.constexpr,
    COUNT_TILES: tl.constexpr, LEAN_DZ: tl.constexpr, LISTED: tl.constexpr,
):
    """The buffered path's recompute: dz of every (token tile, vocab tile) of the launch into the
    (N, v_count) buffer Dz, in the input dtype (and dbias by float32 atomics). Persistent: one
    program per SM walks the tiles, GROUP_N token tiles sweeping the vocabulary together.
    FILTER: each tile's keep flag (the filter's rule) goes to Keep[token tile, vocab tile] (int8), for
    the filtered GEMMs. FILTER_DC: a skipped tile's column sums of dz go to ColSums[token tile,
    column] (float32; 0 for a kept tile), for the filtered dC GEMM's correction. A skipped tile's dz
    is stored all the same: a store under the keep flag does not compile in the flattened tile loop
    (triton 3.6, Hopper: TritonGPUFuseNestedLoops fails on the scf.if).
    LISTED: only the TileCount[0] tiles listed in TileList (linear tile ids of the launch, in the
    order above, as ``_listed_tiles_kernel`` writes them from the forward's keep flags); the others
    are neither computed nor stored (their buffer columns keep what an earlier launch left there,
    which the filtered GEMMs never read)."""
    if LISTED:
        num_tiles = tl.load(TileCount)
    else:
        num_tiles = tl.cdiv(N, BLOCK_N) * tl.cdiv(v_count, BLOCK_V)
    # The same loop twice: tl.range(flatten=...) exists only in newer triton (see forward.py).
    if FLATTEN:
        for i in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
            if LISTED:
                tile = tl.load(TileList + i)
            else:
                tile = i
            _dz_tile(E, C, E_desc, C_desc, Bias, Targets, Lse, GradLoss, GradLse, dBias, Dz, Dz_desc, Keep,
                     ColSums, TileCounts, tile, N, V, D, v_begin, v_count, stride_en, stride_cv, stride_dzn,
                     stride_sn, ignore_index, softcap, target_weight, uniform_weight, filter_tau,
                     BLOCK_N, BLOCK_V, BLOCK_D, GROUP_N, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING,
                     NEEDS_BIAS, EVEN_D, DOT_PRECISION, UPCAST, TMA, FILTER, FILTER_DC, COUNT_TILES, LEAN_DZ)
    else:
        for i in range(tl.program_id(0), num_tiles, num_programs):
            if LISTED:
                tile = tl.load(TileList + i)
            else:
                tile = i
            _dz_tile(E, C, E_desc, C_desc, Bias, Targets, Lse, GradLoss, GradLse, dBias, Dz, Dz_desc, Keep,
                     ColSums, TileCounts, tile, N, V, D, v_begin, v_count, stride_en, stride_cv, stride_dzn,
                     stride_sn, ignore_index, softcap, target_weight, uniform_weight, filter_tau,
                     BLOCK_N, BLOCK_V, BLOCK_D, GROUP_N, HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING,
                     NEEDS_BIAS, EVEN_D, DOT_PRECISION, UPCAST, TMA, FILTER, FILTER_DC, COUNT_TILES, LEAN_DZ)


@triton.jit
def _tile_position(tile, N, v_count, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """(token tile, vocab tile) of a linear tile id: GROUP_N token tiles sweep the launch's vocab
    tiles together, so that their E rows stay in L2 while C streams past."""
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    group_width = GROUP_N * tl.cdiv(v_count, BLOCK_V)
    first_n = (tile // group_width) * GROUP_N
    group_size = tl.minimum(num_n_tiles - first_n, GROUP_N)
    return first_n + (tile % group_width) % group_size, (tile % group_width) // group_size


@triton.jit
def _listed_tiles_kernel(
    # Keep: int8 (token tiles, vocab tiles) of the whole call, row stride keep_stride; TileLists: int32
    # (launches, list_stride); TileCounts: int32 (launches,); Counts: int32 (2,) [computed, skipped]
    Keep, TileLists, TileCounts, Counts,
    # shapes: windows of `rows` tokens x chunks of `cols` vocabulary entries (the last ones: the rest)
    N, V, rows, cols, num_chunks, keep_stride, list_stride,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr, BLOCK: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):
    """The kept tiles of one dz launch (program = window * num_chunks + chunk), as the launch's linear
    tile ids in the dz kernel's order (``_tile_position``), ascending, and their number: what the dz
    kernel walks with LISTED."""
    launch = tl.program_id(0)
    n_begin = (launch // num_chunks) * rows
    v_begin = (launch % num_chunks) * cols
    n_count = tl.minimum(rows, N - n_begin)
    v_count = tl.minimum(cols, V - v_begin)
    num_tiles = tl.cdiv(n_count, BLOCK_N) * tl.cdiv(v_count, BLOCK_V)
    flags = Keep + (n_begin // BLOCK_N).to(tl.int64) * keep_stride + v_begin // BLOCK_V
    out = TileLists + launch.to(tl.int64) * list_stride
    taken = 0
    for t0 in range(0, num_tiles, BLOCK):
        tiles = t0 + tl.arange(0, BLOCK)
        in_launch = tiles < num_tiles
        pid_n, pid_v = _tile_position(tiles, n_count, v_count, BLOCK_N, BLOCK_V, GROUP_N)
        kept = (tl.load(flags + pid_n.to(tl.int64) * keep_stride + pid_v, mask=in_launch, other=0) != 0) & in_launch
        place = taken + tl.cumsum(kept.to(tl.int32), axis=0) - 1
        tl.store(out + place, tiles, mask=kept)
        taken += tl.sum(kept.to(tl.int32), axis=0)
    tl.store(TileCounts + launch, taken)
    if COUNT_TILES:
        tl.atomic_add(Counts, taken, sem="relaxed")
        tl.atomic_add(Counts + 1, num_tiles - taken, sem="relaxed")


@triton.jit
def _dz_tile(
    E, C, E_desc, C_desc, Bias, Targets, Lse, GradLoss, GradLse, dBias, Dz, Dz_desc, Keep, ColSums, TileCounts,
    tile, N, V, D, v_begin, v_count, stride_en, stride_cv, stride_dzn, stride_sn,
    ignore_index, softcap, target_weight, uniform_weight, filter_tau,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    NEEDS_BIAS: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr, FILTER: tl.constexpr, FILTER_DC: tl.constexpr, COUNT_TILES: tl.constexpr,
    LEAN_DZ: tl.constexpr,
):
    pid_n, pid_v = _tile_position(tile, N, v_count, BLOCK_N, BLOCK_V, GROUP_N)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    mask_n = offs_n < N
    pos_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # [BLOCK_V] position in the launch
    mask_v = pos_v < v_count
    ids_v = v_begin + pos_v
    targets, g_loss, g_p, lse = _token_coefficients(Targets, Lse, GradLoss, GradLse, offs_n, mask_n, V, ignore_index,
                                                    LEAN_DZ)
    z = logit_tile(E, C, E_desc, C_desc, pid_n * BLOCK_N, v_begin + pid_v * BLOCK_V, offs_n, ids_v, mask_n, mask_v,
                   D, stride_en, stride_cv, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, TMA, DOT_PRECISION, UPCAST)
    z, t = capped_logits(z, Bias, ids_v, mask_v, softcap, HAS_BIAS, HAS_SOFTCAP)
    dz = _logit_grad(z, t, lse, g_p, g_loss, targets, ids_v, mask_n, mask_v, target_weight, uniform_weight,
                     HAS_SMOOTHING, HAS_SOFTCAP, LEAN_DZ)
    if NEEDS_BIAS or FILTER_DC:
        col_sums = tl.sum(dz, axis=0)  # [BLOCK_V]; rows past N are 0
    if NEEDS_BIAS:
        tl.atomic_add(dBias + ids_v, col_sums, mask=mask_v, sem="relaxed")
    if FILTER:
        keep = _filter_keep(dz, mask_v, g_p, g_loss, tl.minimum(v_count - pid_v * BLOCK_V, BLOCK_V), filter_tau)
        tl.store(Keep + pid_n * tl.cdiv(v_count, BLOCK_V) + pid_v, keep.to(tl.int8))
        if COUNT_TILES:
            tl.atomic_add(TileCounts + tl.where(keep, 0, 1), 1, sem="relaxed")
        if FILTER_DC:
            tl.store(ColSums + pid_n * stride_sn + pos_v, tl.where(keep, 0.0, col_sums), mask=mask_v)
    if TMA:  # the descriptor clips the tile at the buffer's edges
        Dz_desc.store([pid_n * BLOCK_N, pid_v * BLOCK_V], dz.to(Dz.dtype.element_ty))
    else:
        tl.store(Dz + offs_n[:, None] * stride_dzn + pos_v[None, :], dz.to(Dz.dtype.element_ty),
                 mask=mask_n[:, None] & mask_v[None, :])


@triton.jit
def _filtered_de_kernel(
    # data (Dz_desc, C_desc: TMA descriptors when TMA, else Dz, C again); Acc: float32 (n_count, D)
    Dz, C, Dz_desc, C_desc, Keep, Acc, Acc_desc,
    # shapes: the chunk covers vocabulary rows [v_begin, v_begin + v_count) of C
    n_count, D, v_begin, v_count, num_programs,
    stride_dzn, stride_cv, stride_accn, keep_stride,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TILE_V: tl.constexpr,
    KEEP_WIDTH: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FLATTEN: tl.constexpr, EPILOGUE_PARTS: tl.constexpr, EPILOGUE_REDUCE: tl.constexpr,
    BALANCED: tl.constexpr, ITEMS: tl.constexpr, SPLIT: tl.constexpr, whole_tiles, pieces,
):
    """The filtered path's dE GEMM of one chunk: Acc[n, d] += sum over the kept vocab tiles t of
    dz[n, t] @ C[t, d] for every (token tile, D tile); the token tile's keep flags (Keep, one row
    of TILE_V-wide vocab tiles, as the dz kernel wrote them) decide which K steps run. Persistent
    (num_programs programs walk the output tiles, D fastest, so a token tile's dz rows stay in L2);
    FLATTEN folds the tile loop into the K loop, so the next tile's loads overlap this one's
    read-modify-write of Acc. EPILOGUE_PARTS (``_add_through_descriptor``): 0 = that read-modify-write
    through pointers, 1 or 2 = through Acc_desc (tiles of [BLOCK_N, BLOCK_D // EPILOGUE_PARTS]; a tile
    with nothing kept adds its zeros too); EPILOGUE_REDUCE: there as a TMA reduce-add (no load of Acc).
    BALANCED: the output tiles in descending order of their token tile's kept count, dealt to the
    programs in snake order (``_balanced_position``; ITEMS >= the token tiles, a power of two).
    SPLIT: the first ``whole_tiles`` tiles (the full waves) whole, the rest (the last, partial wave)
    each in ``pieces`` parts of its kept K steps, piece j of every such tile before piece j + 1, so
    that the programs of that wave run in step through K as a wave of whole tiles does (reading the
    same rows of C at about the same time); each part is added into Acc atomically (the TMA
    reduce-add, or float32 atomics through pointers: EPILOGUE_PARTS 0), in a run-dependent order."""
    num_tiles = tl.cdiv(n_count, BLOCK_N) * tl.cdiv(D, BLOCK_D)
    if SPLIT:
        num_items = whole_tiles + (num_tiles - whole_tiles) * pieces
    else:
        num_items = num_tiles
    if BALANCED:
        num_v_tiles = tl.cdiv(v_count, TILE_V)
        keys = _items_by_work(Keep, tl.cdiv(n_count, BLOCK_N), num_v_tiles, keep_stride, 1, ITEMS, KEEP_WIDTH)
    else:
        keys = tl.zeros([ITEMS], tl.int32)
    if FLATTEN:
        for item in tl.range(tl.program_id(0), num_items, num_programs, flatten=True):
            _filtered_de_tile(Dz, C, Dz_desc, C_desc, Keep, Acc, Acc_desc, item, num_tiles, num_programs, keys,
                              n_count, D, v_begin, v_count, stride_dzn, stride_cv, stride_accn, keep_stride,
                              whole_tiles, pieces, BLOCK_N, BLOCK_D,
                              BLOCK_K, TILE_V, KEEP_WIDTH, TMA, DOT_PRECISION, UPCAST, EPILOGUE_PARTS,
                              EPILOGUE_REDUCE, BALANCED, ITEMS, SPLIT)
    else:
        for item in range(tl.program_id(0), num_items, num_programs):
            _filtered_de_tile(Dz, C, Dz_desc, C_desc, Keep, Acc, Acc_desc, item, num_tiles, num_programs, keys,
                              n_count, D, v_begin, v_count, stride_dzn, stride_cv, stride_accn, keep_stride,
                              whole_tiles, pieces, BLOCK_N, BLOCK_D,
                              BLOCK_K, TILE_V, KEEP_WIDTH, TMA, DOT_PRECISION, UPCAST, EPILOGUE_PARTS,
                              EPILOGUE_REDUCE, BALANCED, ITEMS, SPLIT)


@triton.jit
def _items_by_work(Keep, num_items, num_flags, item_stride, flag_stride, ITEMS: tl.constexpr, FLAGS: tl.constexpr):
    """The launch's items (the dE GEMM's token tiles: rows of Keep; the dC GEMM's vocab tiles: its
    columns) in descending order of their kept tiles, as sort keys count * ITEMS + (ITEMS - 1 - item)
    (ties: the lower item first; -1 past num_items, so last); ``_balanced_position`` reads them."""
    items = tl.arange(0, ITEMS)
    flags = tl.arange(0, FLAGS)
    kept = tl.load(Keep + items[:, None] * item_stride + flags[None, :] * flag_stride,
                   mask=(items[:, None] < num_items) & (flags[None, :] < num_flags), other=0) != 0
    counts = tl.sum(kept.to(tl.int32), axis=1)
    return tl.sort(tl.where(items < num_items, counts * ITEMS + (ITEMS - 1 - items), -1), descending=True)


@triton.jit
def _balanced_position(tile, num_tiles, num_programs, tiles_per_item, keys, ITEMS: tl.constexpr):
    """(item, tile within the item) that a persistent program takes at loop position ``tile`` (its
    programs walk tile = pid, pid + num_programs, ...): the tiles ranked by their item's work
    (``keys`` from ``_items_by_work``, the item's tiles_per_item tiles together), dealt in snake order
    -- ranks left to right over the programs in even waves, right to left in odd ones (a partial last
    wave over the programs that have a tile in it) -- so that a program's long tiles pair with short
    ones. Static: the same schedule on every run, each rank taken once."""
    wave = tile // num_programs
    first = wave * num_programs
    width = tl.minimum(num_programs, num_tiles - first)
    rank = tl.where(wave % 2 == 0, tile, 2 * first + width - 1 - tile)
    key = tl.sum(tl.where(tl.arange(0, ITEMS) == rank // tiles_per_item, keys, 0), axis=0)
    return ITEMS - 1 - key % ITEMS, rank % tiles_per_item


@triton.jit
def _filtered_de_tile(
    Dz, C, Dz_desc, C_desc, Keep, Acc, Acc_desc, item, num_tiles, num_programs, keys, n_count, D, v_begin, v_count,
    stride_dzn, stride_cv, stride_accn, keep_stride, whole_tiles, pieces, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TILE_V: tl.constexpr, KEEP_WIDTH: tl.constexpr, TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EPILOGUE_PARTS: tl.constexpr, EPILOGUE_REDUCE: tl.constexpr,
    BALANCED: tl.constexpr, ITEMS: tl.constexpr, SPLIT: tl.constexpr,
):
    """One output tile, or with SPLIT one piece of a tile of the last wave. The K loop runs over the kept steps only, with no branch, no reduction and no
    loop-carried index in its body (so it stays pipelined): the kept tiles are listed first, as four
    int64 words of 4-bit indices, one per group of 16 vocab tiles (hence at most 64 vocab tiles per
    chunk, MAX_CHUNK_TILES), and each step's tile is a function of the step. A tile with nothing kept
    skips the accumulator's read-modify-write too in the pointer epilogue (masked off: no traffic);
    through a descriptor it adds its zeros."""
    num_d_tiles = tl.cdiv(D, BLOCK_D)
    if SPLIT:  # item -> (position of its tile in the schedule, piece of it)
        in_tail = item >= whole_tiles
        rest = tl.maximum(num_tiles - whole_tiles, 1)
        tile = tl.where(in_tail, whole_tiles + (item - whole_tiles) % rest, item)
        piece = tl.where(in_tail, (item - whole_tiles) // rest, 0)
        parts = tl.where(in_tail, pieces, 1)
    else:
        tile = item
    if BALANCED:
        pid_n, pid_d = _balanced_position(tile, num_tiles, num_programs, num_d_tiles, keys, ITEMS)
    else:
        pid_n = tile // num_d_tiles
        pid_d = tile % num_d_tiles
    num_v_tiles = tl.cdiv(v_count, TILE_V)
    slots = tl.arange(0, KEEP_WIDTH)
    keep = tl.load(Keep + pid_n * keep_stride + slots, mask=slots < num_v_tiles, other=0) != 0
    num_kept = tl.sum(keep.to(tl.int32), axis=0)
    w0, w1, w2, w3, p1, p2, p3 = _kept_tile_lists(keep, KEEP_WIDTH)
    STEPS: tl.constexpr = TILE_V // BLOCK_K  # K steps per vocab tile
    n0 = pid_n * BLOCK_N
    d0 = pid_d * BLOCK_D
    offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    if SPLIT:
        k_lo = piece * (num_kept * STEPS) // parts
        k_hi = (piece + 1) * (num_kept * STEPS) // parts
    else:
        k_lo = 0
        k_hi = num_kept * STEPS
    acc = _kept_steps_product(Dz, C, Dz_desc, C_desc, n0, d0, offs_n, offs_d, k_lo, k_hi,
                              w0, w1, w2, w3, p1, p2, p3, n_count, D, v_begin, v_count, stride_dzn, stride_cv,
                              BLOCK_N, BLOCK_D, BLOCK_K, TILE_V, TMA, DOT_PRECISION, UPCAST)
    if EPILOGUE_PARTS > 0:
        _add_through_descriptor(Acc_desc, n0, d0, acc, Acc.dtype.element_ty, True, EPILOGUE_PARTS, EPILOGUE_REDUCE)
    elif SPLIT:  # several pieces of a tile: atomics (a tile with nothing kept adds nothing)
        nonempty = tl.full([BLOCK_D], 0, tl.int32) + (k_hi - k_lo) > 0  # as a vector, for the interpreter
        mask = (offs_n[:, None] < n_count) & (offs_d[None, :] < D) & nonempty[None, :]
        tl.atomic_add(Acc + offs_n[:, None] * stride_accn + offs_d[None, :], acc, mask=mask, sem="relaxed")
    else:
        acc_ptrs = Acc + offs_n[:, None] * stride_accn + offs_d[None, :]
        any_kept = tl.full([BLOCK_D], 0, tl.int32) + num_kept > 0  # as a vector: the interpreter takes no scalar mask
        mask = (offs_n[:, None] < n_count) & (offs_d[None, :] < D) & any_kept[None, :]
        tl.store(acc_ptrs, tl.load(acc_ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _kept_steps_product(Dz, C, Dz_desc, C_desc, n0, d0, offs_n, offs_d, k_lo, k_hi, w0, w1, w2, w3, p1, p2, p3,
                        n_count, D, v_begin, v_count, stride_dzn, stride_cv, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TILE_V: tl.constexpr, TMA: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The float32 [BLOCK_N, BLOCK_D] sum over a token tile's kept K steps [k_lo, k_hi) (its kept
    vocab tiles' ``_kept_tile_lists``, TILE_V // BLOCK_K steps each) of dz[n0 rows, step] @ C[step,
    d0 columns]; no branch, reduction or loop-carried index in the loop body (so it stays pipelined)."""
    STEPS: tl.constexpr = TILE_V // BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i in range(k_lo, k_hi):
        vocab_tile = _kept_tile(i // STEPS, w0, w1, w2, w3, p1, p2, p3)
        k0 = vocab_tile * TILE_V + (i % STEPS) * BLOCK_K  # column of the chunk
        if TMA:  # zero outside the buffer's v_count columns (and C's rows): no masks
            a = Dz_desc.load([n0, k0])
            b = C_desc.load([v_begin + k0, d0])
        else:
            ks = (k0 + offs_k).to(tl.int64)
            mask_k = ks < v_count
            a = tl.load(Dz + offs_n[:, None] * stride_dzn + ks[None, :],
                        mask=(offs_n[:, None] < n_count) & mask_k[None, :], other=0.0)
            b = tl.load(C + (v_begin + ks)[:, None] * stride_cv + offs_d[None, :],
                        mask=mask_k[:, None] & (offs_d[None, :] < D), other=0.0)
        acc = dot(a, b, acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _kept_tile_lists(keep, KEEP_WIDTH: tl.constexpr):
    """A row of up to 64 keep flags (KEEP_WIDTH >= 16, a power of two) as four ordered lists, one int64
    per group of 16 vocab tiles holding its kept tiles' indices within the group, 4 bits each (the
    16th entry's top bit is the word's sign: ``_kept_tile`` masks the shifted word), and the positions
    in the whole list where groups 1, 2, 3 begin. Groups past KEEP_WIDTH are empty."""
    GROUPS: tl.constexpr = KEEP_WIDTH // 16
    flags = tl.reshape(keep.to(tl.int32), [GROUPS, 16])
    lane = tl.arange(0, 16).to(tl.int64)
    place = (tl.cumsum(flags, axis=1) - 1).to(tl.int64)  # place in its group's list
    words = tl.sum(tl.where(flags != 0, lane[None, :] << (4 * place), 0), axis=1)  # [GROUPS]
    counts = tl.sum(flags, axis=1)  # [GROUPS]
    group = tl.arange(0, GROUPS)
    w0 = tl.sum(tl.where(group == 0, words, 0), axis=0)
    w1 = tl.sum(tl.where(group == 1, words, 0), axis=0)
    w2 = tl.sum(tl.where(group == 2, words, 0), axis=0)
    w3 = tl.sum(tl.where(group == 3, words, 0), axis=0)
    p1 = tl.sum(tl.where(group < 1, counts, 0), axis=0)
    p2 = tl.sum(tl.where(group < 2, counts, 0), axis=0)
    p3 = tl.sum(tl.where(group < 3, counts, 0), axis=0)
    return w0, w1, w2, w3, p1, p2, p3


@triton.jit
def _kept_tile(j, w0, w1, w2, w3, p1, p2, p3):
    """The j-th kept vocab tile of a row from its ``_kept_tile_lists`` (an empty group's list is
    passed over: its start equals the next one's)."""
    in1 = j >= p1
    in2 = j >= p2
    in3 = j >= p3
    word = tl.where(in3, w3, tl.where(in2, w2, tl.where(in1, w1, w0)))
    start = tl.where(in3, p3, tl.where(in2, p2, tl.where(in1, p1, 0)))
    group = in1.to(tl.int32) + in2.to(tl.int32) + in3.to(tl.int32)
    return 16 * group + ((word >> (4 * (j - start)).to(tl.int64)) & 15).to(tl.int32)


@triton.jit
def _filtered_dc_kernel(
    # data (Dz_desc, E_desc: TMA descriptors when TMA, else Dz, E again); dC: the chunk's rows of dC
    Dz, E, Dz_desc, E_desc, Keep, ColSums, TileMeans, dC, dC_desc,
    # shapes: the window's n_count tokens x the chunk's v_count vocabulary rows
    n_count, D, v_count, num_programs,
    stride_dzn, stride_en, stride_sn, stride_mn, stride_dcv, keep_stride,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TILE_N: tl.constexpr,
    TILE_V: tl.constexpr, KEEP_WIDTH: tl.constexpr, ACCUMULATE: tl.constexpr, TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FLATTEN: tl.constexpr,
    EPILOGUE_PARTS: tl.constexpr, EPILOGUE_REDUCE: tl.constexpr, BALANCED: tl.constexpr, ITEMS: tl.constexpr,
    STAND_IN: tl.constexpr,
):
    """The filtered path's dC GEMM of one (window, chunk): for every (BLOCK_V rows, BLOCK_D columns)
    tile of the chunk's dC,
        dC[v, d] (+)= sum over the kept token tiles t of dz[t, v]^T @ E[t, d]
                      + sum over all token tiles t of ColSums[t, v]^T @ TileMeans[t, d],
    the second term the rank-1 stand-in for each skipped tile (ColSums is 0 where a tile was kept).
    The vocab tile's keep flags (one column of Keep) decide which K steps run, through the dE GEMM's
    lists (at most 64 token tiles per window). The sum is float32, rounded into the 16-bit dC once
    per window (ACCUMULATE: added to what earlier windows left there), as cuBLAS's addmm does.
    Persistent (D fastest, so that a vocab block's dz columns stay in L2); FLATTEN and EPILOGUE_PARTS
    (dC's read-modify-write through dC_desc) as in the dE GEMM; EPILOGUE_REDUCE (ACCUMULATE): the add
    as a TMA reduce-add of the sum rounded to dC's dtype (rounded twice: ``_add_through_descriptor``).
    BALANCED: the output tiles by their vocab tile's kept count as in the dE GEMM (ITEMS >= the
    chunk's vocab tiles); each vocab tile's TILE_V // BLOCK_V row blocks all count, also past v_count
    in the last one (masked or clipped)."""
    num_v_tiles = tl.cdiv(v_count, TILE_V)
    if BALANCED:
        num_tiles = num_v_tiles * (TILE_V // BLOCK_V) * tl.cdiv(D, BLOCK_D)
        keys = _items_by_work(Keep, num_v_tiles, tl.cdiv(n_count, TILE_N), 1, keep_stride, ITEMS, KEEP_WIDTH)
    else:
        num_tiles = tl.cdiv(v_count, BLOCK_V) * tl.cdiv(D, BLOCK_D)
        keys = tl.zeros([ITEMS], tl.int32)
    if FLATTEN:
        for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
            _filtered_dc_tile(Dz, E, Dz_desc, E_desc, Keep, ColSums, TileMeans, dC, dC_desc, tile, num_tiles,
                              num_programs, keys, n_count, D, v_count, stride_dzn, stride_en, stride_sn, stride_mn,
                              stride_dcv, keep_stride, BLOCK_V, BLOCK_D, BLOCK_K, TILE_N, TILE_V, KEEP_WIDTH,
                              ACCUMULATE, TMA, DOT_PRECISION, UPCAST, EPILOGUE_PARTS, EPILOGUE_REDUCE, BALANCED, ITEMS,
                              STAND_IN)
    else:
        for tile in range(tl.program_id(0), num_tiles, num_programs):
            _filtered_dc_tile(Dz, E, Dz_desc, E_desc, Keep, ColSums, TileMeans, dC, dC_desc, tile, num_tiles,
                              num_programs, keys, n_count, D, v_count, stride_dzn, stride_en, stride_sn, stride_mn,
                              stride_dcv, keep_stride, BLOCK_V, BLOCK_D, BLOCK_K, TILE_N, TILE_V, KEEP_WIDTH,
                              ACCUMULATE, TMA, DOT_PRECISION, UPCAST, EPILOGUE_PARTS, EPILOGUE_REDUCE, BALANCED, ITEMS,
                              STAND_IN)


@triton.jit
def _filtered_dc_tile(
    Dz, E, Dz_desc, E_desc, Keep, ColSums, TileMeans, dC, dC_desc, tile, num_tiles, num_programs, keys, n_count, D,
    v_count, stride_dzn, stride_en, stride_sn, stride_mn, stride_dcv, keep_stride,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TILE_N: tl.constexpr,
    TILE_V: tl.constexpr, KEEP_WIDTH: tl.constexpr, ACCUMULATE: tl.constexpr, TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EPILOGUE_PARTS: tl.constexpr, EPILOGUE_REDUCE: tl.constexpr,
    BALANCED: tl.constexpr, ITEMS: tl.constexpr, STAND_IN: tl.constexpr,
):
    """One output tile (BLOCK_V divides TILE_V: the tile's rows share one column of keep flags)."""
    num_d_tiles = tl.cdiv(D, BLOCK_D)
    if BALANCED:
        vocab_tile, within = _balanced_position(tile, num_tiles, num_programs, (TILE_V // BLOCK_V) * num_d_tiles,
                                                keys, ITEMS)
        v0 = vocab_tile * TILE_V + (within // num_d_tiles) * BLOCK_V
        pid_d = within % num_d_tiles
    else:
        v0 = (tile // num_d_tiles) * BLOCK_V
        pid_d = tile % num_d_tiles
    d0 = pid_d * BLOCK_D
    num_n_tiles = tl.cdiv(n_count, TILE_N)
    slots = tl.arange(0, KEEP_WIDTH)  # token tiles of the window
    in_window = slots < num_n_tiles
    keep = tl.load(Keep + slots * keep_stride + v0 // TILE_V, mask=in_window, other=0) != 0
    num_kept = tl.sum(keep.to(tl.int32), axis=0)
    w0, w1, w2, w3, p1, p2, p3 = _kept_tile_lists(keep, KEEP_WIDTH)
    STEPS: tl.constexpr = TILE_N // BLOCK_K  # K steps per token tile
    offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_v = offs_v < v_count
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    for i in range(num_kept * STEPS):
        token_tile = _kept_tile(i // STEPS, w0, w1, w2, w3, p1, p2, p3)
        k0 = token_tile * TILE_N + (i % STEPS) * BLOCK_K  # token of the window
        if TMA:  # zero outside the buffer's n_count rows and v_count columns (and E's rows): no masks
            a = Dz_desc.load([k0, v0])
            b = E_desc.load([k0, d0])
        else:
            ks = (k0 + offs_k).to(tl.int64)
            mask_k = ks < n_count
            a = tl.load(Dz + ks[:, None] * stride_dzn + offs_v[None, :], mask=mask_k[:, None] & mask_v[None, :],
                        other=0.0)
            b = tl.load(E + ks[:, None] * stride_en + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :],
                        other=0.0)
        acc = dot(tl.trans(a), b, acc, DOT_PRECISION, UPCAST)
    # the skipped tiles' stand-ins: [BLOCK_V, KEEP_WIDTH] @ [KEEP_WIDTH, BLOCK_D], both operands rounded
    # to the inputs' dtype (as dz is for the kept tiles). In float32 (a tf32 dot) the accumulator changed
    # MMA layout for this one dot, a 128 x 256 float32 round trip through shared memory per output tile
    # (results/h200-2026-12-01h/ir/_filtered_dc_kernel.ttgir); measured (H200, Llama LM, rounds) the
    # same backward either way (37.00 against 37.06 ms; this kernel 9.7 against 10.9 ms a call).
    # Where the column kept every token tile its column sums are all 0: their loads are masked off
    # (no traffic), the dot adds zeros.
    # Without STAND_IN (dC dropped where skipped: the forward's keep flags, no recompute of the tile)
    # there is none.
    if STAND_IN:
        skipped = in_window & (tl.full([KEEP_WIDTH], 0, tl.int32) + num_kept < num_n_tiles)
        sums = tl.load(ColSums + slots[None, :].to(tl.int64) * stride_sn + offs_v[:, None],
                       mask=skipped[None, :] & mask_v[:, None], other=0.0)
        means = tl.load(TileMeans + slots[:, None].to(tl.int64) * stride_mn + offs_d[None, :],
                        mask=skipped[:, None] & mask_d[None, :], other=0.0)
        acc = dot(sums.to(E.dtype.element_ty), means.to(E.dtype.element_ty), acc, DOT_PRECISION, UPCAST)
    if EPILOGUE_PARTS > 0:
        _add_through_descriptor(dC_desc, v0, d0, acc, dC.dtype.element_ty, ACCUMULATE, EPILOGUE_PARTS,
                                EPILOGUE_REDUCE)
    else:
        dc_ptrs = dC + offs_v[:, None] * stride_dcv + offs_d[None, :]
        mask = mask_v[:, None] & mask_d[None, :]
        if ACCUMULATE:
            acc += tl.load(dc_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dc_ptrs, acc.to(dC.dtype.element_ty), mask=mask)


@triton.jit
def _add_through_descriptor(desc, r0, c0, acc, OUT_DTYPE: tl.constexpr, ACCUMULATE: tl.constexpr,
                            PARTS: tl.constexpr, REDUCE: tl.constexpr = False):
    """The tensor under ``desc`` at [r0, c0] (+)= acc (float32), read and written through the TMA
    descriptor (zero-filled and clipped at the tensor's edges, so no masks; the store is asynchronous)
    in PARTS = 1, 2 or 4 column blocks of the tile (the descriptor's tiles: [rows, cols // PARTS];
    more parts, less of the shared memory the store goes through, which a float32 128 x 256 tile
    beside three pipeline stages does not have). REDUCE (ACCUMULATE): the add done by the TMA unit in
    L2 (a reduce-add, no load): into a float32 tensor the same float32 sum, old + acc; into a 16-bit
    one acc is rounded to it first, so the sum rounds twice, round(old + round(acc)), where the load
    and store round it once. GPU only: the interpreter has no descriptor reductions."""
    if REDUCE:
        tl.static_assert(ACCUMULATE, "a reduce-add adds to what is there")
    if PARTS == 1:
        _add_block(desc, r0, c0, acc, OUT_DTYPE, ACCUMULATE, REDUCE)
    else:
        tl.static_assert(PARTS == 2 or PARTS == 4, "one, two or four parts")
        left, right = _column_halves(acc)
        if PARTS == 2:
            _add_block(desc, r0, c0, left, OUT_DTYPE, ACCUMULATE, REDUCE)
            _add_block(desc, r0, c0 + left.shape[1], right, OUT_DTYPE, ACCUMULATE, REDUCE)
        else:
            QUARTER: tl.constexpr = left.shape[1] // 2
            a, b = _column_halves(left)
            _add_block(desc, r0, c0, a, OUT_DTYPE, ACCUMULATE, REDUCE)
            _add_block(desc, r0, c0 + QUARTER, b, OUT_DTYPE, ACCUMULATE, REDUCE)
            a, b = _column_halves(right)
            _add_block(desc, r0, c0 + 2 * QUARTER, a, OUT_DTYPE, ACCUMULATE, REDUCE)
            _add_block(desc, r0, c0 + 3 * QUARTER, b, OUT_DTYPE, ACCUMULATE, REDUCE)


@triton.jit
def _column_halves(acc):
    """acc's first and second halves of columns."""
    ROWS: tl.constexpr = acc.shape[0]
    HALF: tl.constexpr = acc.shape[1] // 2
    return tl.split(tl.permute(tl.reshape(acc, (ROWS, 2, HALF)), (0, 2, 1)))


@triton.jit
def _add_block(desc, r0, c0, acc, OUT_DTYPE: tl.constexpr, ACCUMULATE: tl.constexpr, REDUCE: tl.constexpr):
    """One descriptor tile of ``_add_through_descriptor``."""
    if REDUCE:
        desc.atomic_add([r0, c0], acc.to(OUT_DTYPE))
    else:
        if ACCUMULATE:
            acc += desc.load([r0, c0]).to(tl.float32)
        desc.store([r0, c0], acc.to(OUT_DTYPE))


# The filtered GEMMs' epilogues (their kernels' EPILOGUE_PARTS): 0 = the accumulator's
# read-modify-write through pointers, 1 or 2 = through a TMA descriptor in that many column blocks.
# Measured on an H200 (bf16, triton 3.6; each GEMM alone at the goal shapes' (window, chunk), in
# rounds; benchmarks/filtered_gemm_variants.py, results/h200-2026-12-01i/filtered_gemm_variants.log),
# per call against cuBLAS's addmm on the same operands, every tile kept / ~58% kept:
#   dC: pointers 1.17 / 0.83-0.89x, one TMA block 1.10-1.11 / 0.77-0.82x, two 1.12-1.13 / 0.80-0.85x
#       (no read of the old dC at all: 1.03-1.05x -- the read-modify-write is most of the gap);
#   dE: pointers 1.07-1.10 / 0.80-0.82x, two TMA blocks 1.07-1.09 / 0.78-0.79x (one block does not
#       fit in shared memory beside the 3 stages: its float32 tile is 128 KB, twice, load and store).
# The backward with dc_filter="corrected" at 8192 x 4096 x 128256, LM-like: 36.34 ms with pointers,
# 34.82 ms with these (dE 2, dC 1); 53.26 against 51.86 ms at 8192 x 2304 x 256000.
FILTERED_DE_EPILOGUE_PARTS = 2
FILTERED_DC_EPILOGUE_PARTS = 1
# dE's epilogue as a TMA reduce-add into its float32 accumulator (no load of the old tile; the same
# float32 sums), where it goes through a descriptor on a GPU. Predicted: dE with every tile kept
# 1.07-1.09x -> ~1.03-1.05x cuBLAS (dC's GEMM without its old-tile read measured 1.03-1.05x).
FILTERED_DE_EPILOGUE_REDUCE = True
# dC's epilogue (windows after the first) as a TMA reduce-add of the window's sum rounded to dC's
# 16-bit dtype, so that the kernel does not load the old dC tile: the running sum then rounds twice
# per window, round(old + round(sum)), against once (round(old + sum)) by the load and store.
# Predicted: the dC GEMM with every tile kept 1.10-1.12x -> 1.04-1.06x cuBLAS. Measured on an H200
# (results/h200-2026-12-01m/filtered_gemm_configs.log): 1.066 / 1.100x against 1.075 / 1.115x at
# the goal shapes' filter_dc windows (every tile kept; 2 blocks or 4 stages no better); the backward
# with filter_dc, in rounds, 50.83 / 50.89 against 51.23 / 51.64 ms at 8192 x 2304 x 256000 (LM-like
# / uniform), 29.25 / 43.86 against 30.89 / 44.11 at 8192 x 4096 x 128256; dC against float64 3.34e-3
# against 2.96e-3, 4.38e-3 against 4.09e-3 at the LM-like points (torch bf16: 9.5e-3, 9.4e-3),
# 8.5e-4 / 1.30e-3 against 8.2e-4 / 1.24e-3 at the uniform ones (exact mode's: 8.4e-4 / 1.30e-3).
FILTERED_DC_EPILOGUE_REDUCE = True
# The filtered GEMMs' output tiles walked in descending order of their work (kept tiles), dealt to
# the persistent programs in snake order (_balanced_position), instead of in index order. A CPU model
# of one Llama-shaped window of the LM-like data (4096 x 128256, 2048 tokens, chunks of 6144, 57.5%
# kept; 132 programs, each tile's time = its kept K steps): the longest program's work, as a fraction
# of the all-kept launch's, dE 0.72 in index order -> 0.65 balanced (0.56 a perfect split), dC 0.63 ->
# 0.58 (0.56) -- index order puts a token tile's 16 D tiles on neighbouring programs of one wave.
# Measured on an H200 (results/h200-2026-12-01j/), each GEMM alone (filtered_gemm_variants_first.log):
# dE with every tile kept 1.052 / 1.054x cuBLAS either way, ~58% kept at random 0.677 against 0.736x
# in index order at 4096 x 128256 (one wave at 2304 x 256000: no change); dC with every tile kept
# 1.124 / 1.134x against 1.105 / 1.119x in index order (its tiles are 3-6x shorter than dE's, so the
# per-tile lookup counts more), ~58% kept 0.767 / 0.752x against 0.796 / 0.757x. The backward on
# LM-like data at 8192 x 4096 x 128256 (s = 0.434; filtered_backward_variants.log, 5 rounds): dE's
# order -0.58 ms, dC's (dc_filter="corrected") -0.26 ms; +0.03 to +0.21 ms where little is skipped.
BALANCED_FILTERED_DE = True
BALANCED_FILTERED_DC = True
# Above this many items (token tiles of a dE window, vocab tiles of a dC chunk): index order, as every
# program would hold their [items, KEEP_WIDTH] keep flags for the sort (not measured; the goal
# shapes have 14-16 token tiles per window and 24-46 vocab tiles per chunk).
MAX_BALANCED_ITEMS = 256
# The filtered dE GEMM's last, partial wave of output tiles cut into pieces along their kept K steps,
# as many per tile as keep every program busy (programs // the wave's tiles), where that is >= 2: a
# launch of 144 tiles on 132 SMs then takes ~1.09 waves of time instead of 2. So the filtered path's
# windows need not fit the dE GEMM's waves (buffered_window) and are the exact path's. Off where
# torch.use_deterministic_algorithms(True) is set: a tile's pieces are added in a run-dependent order.
# A first version as stream-K (each program one contiguous run of the launch's kept K steps, tiles cut
# anywhere; results/h200-2026-12-01l/stream_k_de*.log) ran 30-45% slower per K step than whole tiles
# on an H200 (dE 17.8 against 12.5 ms at 8192 x 4096 x 128256 uniform, same windows): its programs no
# longer step through K together, so what they read at one time spreads over the whole chunk's dz and
# C (75 MB there, beyond the 50 MB L2). Here the pieces of a wave start at the same K offset.
SPLIT_LAST_DE_WAVE = True


def split_last_wave_applies() -> bool:
    """Whether the filtered dE GEMM cuts its last partial wave into pieces (SPLIT_LAST_DE_WAVE, and
    no deterministic algorithms requested from torch); read at each call."""
    return SPLIT_LAST_DE_WAVE and not torch.are_deterministic_algorithms_enabled()


def epilogue_descriptor(t: Tensor, cfg: TileConfig, rows: int, parts: int):
    """The TMA descriptor a filtered GEMM's epilogue reads and writes ``t`` through, tiles of
    [rows, cfg.block_d // parts] (None: no descriptor for t, or parts 0: pointers)."""
    if parts == 0:
        return None
    return tma_descriptor(t, [rows, cfg.block_d // parts], cfg, accumulator=True)


def _balanced_items(items: int, balanced: bool, tiles: int, programs: int) -> int:
    """The filtered GEMM kernels' ITEMS for ``items`` items (token or vocab tiles) where their
    ``tiles`` go in order of work (``balanced``), else 0: index order, also where there is nothing to
    balance -- one item (its tiles all do the same work) or one wave (a tile per program) -- since the
    sort and the lookups cost each program time (measured ~0.15 ms a backward at 8192 x 2304 x
    256000, whose dE launches are one wave: results/h200-2026-12-01j/filtered_backward_variants.log)."""
    if not balanced or items < 2 or items > MAX_BALANCED_ITEMS or tiles <= programs:
        return 0
    return triton.next_power_of_2(items)


def filtered_de_gemm(acc: Tensor, dz: Tensor, c: Tensor, keep: Tensor, v_begin: int, cfg: TileConfig,
                     tile_v: int, sms: int, *, dz_desc=None, c_desc=None, acc_desc=None,
                     epilogue_parts: int | None = None, epilogue_reduce: bool | None = None,
                     balanced: bool | None = None, keep_stride: int | None = None,
                     split_last_wave: bool | None = None) -> None:
    """acc (float32, the window's (n, D)) += dz @ C[v_begin : v_begin + v_count] over the vocab tiles
    (``tile_v`` wide, the dz kernel's) that ``keep`` (int8, one row of flags per token tile, as the dz
    kernel wrote them) kept; dz: (n, v_count), unit column stride. TMA loads where both descriptors
    are given (dz's of [cfg.block_n, cfg.block_v], C's of [cfg.block_v, cfg.block_d]); the epilogue
    in ``epilogue_parts`` (None: FILTERED_DE_EPILOGUE_PARTS) through ``acc_desc`` (made by
    ``epilogue_descriptor`` for those parts), or through pointers where it is None or parts is 0; as
    a TMA reduce-add where ``epilogue_reduce`` (None: FILTERED_DE_EPILOGUE_REDUCE) and the epilogue
    goes through the descriptor on a GPU. ``balanced`` (None: BALANCED_FILTERED_DE): the tiles in
    order of work (``_balanced_position``; persistent launches only). ``keep_stride``: the flags' row
    stride (None: one row per token tile of this chunk's vocab tiles, packed, as the dz kernel writes
    them; the forward's flags of the whole vocabulary are a strided view). ``split_last_wave``
    (None: ``split_last_wave_applies()``): the last partial wave's tiles in pieces along K
    (SPLIT_LAST_DE_WAVE; persistent launches only), added by the TMA reduce-add where the epilogue
    goes through the descriptor as one, else by float32 atomics through pointers."""
    n_count, v_count = dz.shape
    dim = acc.shape[1]
    tma = dz_desc is not None and c_desc is not None
    parts = FILTERED_DE_EPILOGUE_PARTS if epilogue_parts is None else epilogue_parts
    parts = parts if tma and acc_desc is not None else 0
    reduce = FILTERED_DE_EPILOGUE_REDUCE if epilogue_reduce is None else epilogue_reduce
    reduce = bool(reduce) and parts > 0 and acc.device.type == "cuda"
    tiles_n = triton.cdiv(n_count, cfg.block_n)
    tiles = tiles_n * triton.cdiv(dim, cfg.block_d)
    programs = min(tiles, sms) if FILTERED_DE_PERSISTENT else tiles
    balanced = BALANCED_FILTERED_DE if balanced is None else balanced
    items = _balanced_items(tiles_n, balanced and FILTERED_DE_PERSISTENT, tiles, programs)
    # the kernel's lists hold 64 tiles (buffered_shape keeps to it; a patched shape might not)
    assert triton.cdiv(v_count, tile_v) <= MAX_CHUNK_TILES, "chunk wider than the dE GEMM's lists"
    keep_width = max(16, triton.next_power_of_2(triton.cdiv(v_count, tile_v)))
    keep_stride = triton.cdiv(v_count, tile_v) if keep_stride is None else keep_stride
    split = split_last_wave_applies() if split_last_wave is None else split_last_wave
    whole, rest = (tiles // sms) * sms, tiles % sms
    pieces = sms // rest if rest else 1
    split = bool(split) and FILTERED_DE_PERSISTENT and pieces >= 2
    if split:
        programs = sms
        parts = parts if reduce else 0  # the pieces are added atomically: by the TMA reduce, else pointers
        items = _balanced_items(tiles_n, balanced, tiles, programs)
    _filtered_de_kernel[(programs,)](
        dz, c, dz_desc if tma else dz, c_desc if tma else c, keep, acc, acc_desc if parts else acc,
        n_count, dim, v_begin, v_count, programs, dz.stride(0), c.stride(0), acc.stride(0), keep_stride,
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_v, TILE_V=tile_v, KEEP_WIDTH=keep_width,
        TMA=tma, DOT_PRECISION=dot_precision(dz.dtype), UPCAST=dot_upcast(dz),
        FLATTEN=tma and HAS_FLATTEN and FILTERED_DE_PERSISTENT, EPILOGUE_PARTS=parts, EPILOGUE_REDUCE=reduce,
        BALANCED=items > 0, ITEMS=max(items, 1), SPLIT=split, whole_tiles=whole, pieces=pieces,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def filtered_dc_gemm(dc: Tensor, dz: Tensor, e: Tensor, keep: Tensor, col_sums: Tensor | None,
                     tile_means: Tensor | None, accumulate: bool, cfg: TileConfig, tile_n: int, tile_v: int, sms: int,
                     *, dz_desc=None, e_desc=None, dc_desc=None, epilogue_parts: int | None = None,
                     epilogue_reduce: bool | None = None, balanced: bool | None = None,
                     keep_stride: int | None = None) -> None:
    """dc (the chunk's (v_count, D) rows of the 16-bit dC) (+)= dz^T @ e over the (``tile_n`` x
    ``tile_v``) tiles that ``keep`` kept, plus col_sums^T @ tile_means for the rest (the stand-ins;
    col_sums float32 (token tiles, v_count), 0 where kept; tile_means float32 (token tiles, D)); added
    to dc's contents where ``accumulate``. dz: (n, v_count), unit column stride. TMA loads where
    dz_desc ([cfg.block_n, cfg.block_v]) and e_desc ([cfg.block_n, cfg.block_d]) are given; the
    epilogue as in ``filtered_de_gemm`` (None: FILTERED_DC_EPILOGUE_PARTS; ``dc_desc`` from
    ``epilogue_descriptor(dc, cfg, cfg.block_v, parts)``), where ``accumulate`` as a TMA reduce-add
    of the rounded sum if ``epilogue_reduce`` (None: FILTERED_DC_EPILOGUE_REDUCE; on a GPU, through
    the descriptor only); ``balanced`` (None: BALANCED_FILTERED_DC) and ``keep_stride``
    as there. col_sums and tile_means None: no stand-ins (a skipped tile's dC terms are dropped)."""
    n_count, dim = e.shape
    v_count = dc.shape[0]
    tiles_n = triton.cdiv(n_count, tile_n)
    tma = dz_desc is not None and e_desc is not None
    parts = FILTERED_DC_EPILOGUE_PARTS if epilogue_parts is None else epilogue_parts
    parts = parts if tma and dc_desc is not None else 0
    reduce = FILTERED_DC_EPILOGUE_REDUCE if epilogue_reduce is None else epilogue_reduce
    reduce = bool(reduce) and bool(accumulate) and parts > 0 and dc.device.type == "cuda"
    tiles_v, tiles_d = triton.cdiv(v_count, tile_v), triton.cdiv(dim, cfg.block_d)
    balanced_tiles = tiles_v * (tile_v // cfg.block_v) * tiles_d  # whole vocab tiles' row blocks
    items = _balanced_items(tiles_v, BALANCED_FILTERED_DC if balanced is None else balanced, balanced_tiles,
                            min(balanced_tiles, sms))
    programs = min(balanced_tiles if items else triton.cdiv(v_count, cfg.block_v) * tiles_d, sms)
    # the kernel's lists hold 64 token tiles (buffered_shape keeps to it; a patched shape might not)
    assert tiles_n <= MAX_WINDOW_TILES, "window longer than the dC GEMM's lists"
    stand_in = col_sums is not None
    _filtered_dc_kernel[(programs,)](
        dz, e, dz_desc if tma else dz, e_desc if tma else e, keep, col_sums if stand_in else dc,
        tile_means if stand_in else dc, dc, dc_desc if parts else dc, n_count, dim, v_count, programs,
        dz.stride(0), e.stride(0), col_sums.stride(0) if stand_in else 0, tile_means.stride(0) if stand_in else 0,
        dc.stride(0), tiles_v if keep_stride is None else keep_stride,
        BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, BLOCK_K=cfg.block_n, TILE_N=tile_n, TILE_V=tile_v,
        KEEP_WIDTH=max(16, triton.next_power_of_2(tiles_n)), ACCUMULATE=bool(accumulate), TMA=tma,
        DOT_PRECISION=dot_precision(e.dtype), UPCAST=dot_upcast(e), FLATTEN=tma and HAS_FLATTEN,
        EPILOGUE_PARTS=parts, EPILOGUE_REDUCE=reduce, BALANCED=items > 0, ITEMS=max(items, 1), STAND_IN=stand_in,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


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


def lce_backward(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    grad_loss: Tensor,
    grad_lse: Tensor,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
    filter_grad: bool,
    needs_e: bool,
    needs_c: bool,
    needs_bias: bool,
    *,
    config: TileConfig | None = None,
    filter_eps: float = FILTER_EPS,
    dc_filter: str | None = None,
    vocab_order: bool | Tensor | None = None,
    window_bytes: int = WINDOW_BYTES,
    tile_counts: Tensor | None = None,
    buffered: bool | None = None,
    buffer_bytes: int = BUFFER_BYTES,
    keep: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of sum(grad_loss * loss + grad_lse * lse) w.r.t. e, c, bias (None where not needed);
    semantics of reference.chunked_backward, plus filtering when ``filter_grad``.

    ``dc_filter``: what the filter does to dC (``DC_FILTERS``; None: ``DC_FILTER`` in the buffered
    path, "exact" in the atomic one): "corrected" (buffered path only) skips a tile's dC GEMM and adds
    its rank-1 stand-in, "dropped" (the atomic path, or the buffered one with ``keep``; no relative
    bound on dC) skips it, "exact" never does. ``vocab_order``: None = ``DEFAULT_ORDER`` when filtering, True/False to force, or
    an explicit (V,) permutation of the vocabulary. ``tile_counts``: optional int32 (2,) tensor
    that receives [tiles computed, tiles filtered] (added to its contents). ``buffered``: None =
    the buffered path where ``buffered_path_applies`` (exact 16-bit), True/False to force it (for
    tests and measurements); ``buffer_bytes`` bounds its scratch.

    ``keep``: the filter's keep flags from the forward (``forward.lce_forward_with_keep``, int8
    (token tiles, vocab tiles) of the dz kernel's tiles; needs ``filter_grad``, the buffered path and
    no dbias): the dz kernel then recomputes only the kept tiles (``_listed_tiles_kernel``, LISTED),
    dE is the filtered dE GEMM's and dC the filtered dC GEMM's without stand-ins (a skipped tile's dC
    terms are dropped: there are no column sums without its recompute; ``dc_filter`` None or
    "dropped"). The flags are the filter's rule only where grad_lse is 0: the caller's to ensure."""
    orig_e_dtype, orig_c_dtype = e.dtype, c.dtype
    e, c, bias, targets = prepare_inputs(e, c, bias, targets)
    num_tokens, dim = e.shape
    vocab = c.shape[0]
    needs_bias = needs_bias and bias is not None
    if not (needs_e or needs_c or needs_bias):
        return None, None, None
    if num_tokens == 0:
        return (
            torch.zeros_like(e, dtype=orig_e_dtype) if needs_e else None,
            torch.zeros_like(c, dtype=orig_c_dtype) if needs_c else None,
            torch.zeros_like(bias) if needs_bias else None,
        )
    lse, grad_loss, grad_lse = as_f32(lse), as_f32(grad_loss), as_f32(grad_lse)
    tile = config or backward_config(e)
    device = e.device

    if isinstance(vocab_order, Tensor):
        order = vocab_order.to(device=device, dtype=torch.int64).contiguous()
        if order.shape != (vocab,):
            raise ValueError(f"vocab_order must have shape ({vocab},), got {tuple(order.shape)}")
    elif vocab_order or (vocab_order is None and filter_grad and DEFAULT_ORDER):
        order = default_vocab_order(e, c)
    else:
        order = None

    if dc_filter is not None and dc_filter not in DC_FILTERS:
        raise ValueError(f"dc_filter must be one of {DC_FILTERS} or None, got {dc_filter!r}")
    listed = keep is not None
    if listed:
        if not filter_grad or needs_bias or dc_filter not in (None, "dropped") or order is not None:
            raise ValueError("keep flags from the forward need filter_grad=True, no dbias, dc_filter None or "
                             "'dropped' and no vocab_order")
        if buffered is False or (buffered is None and not buffered_path_applies(e, None)):
            raise ValueError("keep flags from the forward run in the buffered path only (16-bit inputs, a torch "
                             "with a mixed-precision addmm)")
        tiles_shape = keep_shape(num_tokens, vocab, buffered_config(e))
        if keep.dtype != torch.int8 or tuple(keep.shape) != tiles_shape or keep.stride(1) != 1:
            raise ValueError(f"keep must be an int8 tensor of shape {tiles_shape} with unit column stride, got "
                             f"{keep.dtype} {tuple(keep.shape)}")
        buffered = True
    dropped_dc = bool(filter_grad) and dc_filter == "dropped" and not listed
    f32 = torch.float32
    dummy = lse  # stands in for absent pointers
    if tile_counts is not None and (tile_counts.dtype != torch.int32 or tile_counts.numel() < 2):
        raise ValueError("tile_counts must be an int32 tensor with 2 elements")

    def launch(n_begin, n_count, v_begin, v_count, de_buf, dc_buf, dc_by_id, do_e, do_c, do_bias):
        """One launch of the atomic kernel over tokens [n_begin, +n_count) x vocabulary positions
        [v_begin, +v_count)."""
        rows = slice(n_begin, n_begin + n_count)
        grid = (triton.cdiv(n_count, tile.block_n) * triton.cdiv(v_count, tile.block_v),)
        _backward_kernel[grid](
            e[rows], c, bias, targets[rows], lse[rows], grad_loss[rows], grad_lse[rows],
            order if order is not None else dummy,
            de_buf if do_e else dummy, dc_buf if do_c else dummy, dbias if do_bias else dummy,
            tile_counts if tile_counts is not None and do_e else dummy,
            n_count, vocab, dim, v_begin, v_count,
            e.stride(0), c.stride(0), dim, dim,
            ignore_index, float(softcap), 1.0 - label_smoothing, label_smoothing / vocab, filter_tau,
            BLOCK_N=tile.block_n, BLOCK_V=tile.block_v, BLOCK_D=tile.block_d, GROUP_N=tile.group_n,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap != 0.0, HAS_SMOOTHING=label_smoothing != 0.0,
            HAS_ORDER=order is not None, DC_ROW_BY_ID=dc_by_id, FILTER=bool(filter_grad),
            COUNT_TILES=tile_counts is not None and do_e, NEEDS_E=do_e, NEEDS_C=do_c,
            NEEDS_BIAS=do_bias, EVEN_D=dim % tile.block_d == 0, DOT_PRECISION=dot_precision(e.dtype),
            UPCAST=dot_upcast(e), FILTER_DC=dropped_dc,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )

    filter_tau = filter_eps / vocab  # allotment per vocabulary entry
    dbias = torch.zeros(vocab, dtype=f32, device=device) if needs_bias else None
    if buffered is None:
        buffered = buffered_path_applies(e, order, dropped_dc) and (needs_e or needs_c)
    elif buffered and (order is not None or dropped_dc):
        raise ValueError("the buffered path walks the vocabulary in id order and never drops dC without its "
                         "stand-in: buffered=True needs no vocab_order and dc_filter other than 'dropped'")
    if not buffered and filter_grad and dc_filter == "corrected":
        raise ValueError("dc_filter='corrected' runs in the buffered path only (16-bit inputs, no vocab_order, "
                         "a torch with a mixed-precision addmm)")
    if buffered:
        cfg = buffered_config(e)
        c_desc = tma_descriptor(c, [cfg.block_v, cfg.block_d], cfg)  # one per call: C is the same
        sms = sm_count(device)
        filter_de = bool(filter_grad) and needs_e
        filter_dc = bool(filter_grad) and needs_c and (listed or (dc_filter or DC_FILTER) == "corrected")
        stand_in = filter_dc and not listed
        de_cfg, dc_cfg = filtered_de_config(e), filtered_dc_config(e)
        assert de_cfg.block_n == cfg.block_n, "the dE GEMM's token tiles are the dz kernel's (one keep flag each)"
        assert cfg.block_v % dc_cfg.block_v == 0 and cfg.block_n % dc_cfg.block_n == 0, \
            "the dC GEMM's tiles split the dz kernel's (one keep flag each)"
        c_desc_de = tma_descriptor(c, [de_cfg.block_v, de_cfg.block_d], de_cfg) if filter_de else None
        # The tile loop is flattened except under a softcap. Measured (H100, triton 3.6, bf16, LM-like
        # 8192 x 2304 x 256000, backward; benchmarks/softcap_cost.py): no softcap 49.7 ms flattened,
        # 52.3 ms not; softcap 30: 71.3 ms flattened, 56.4 ms not, 59.5 ms with pointer loads.
        constants = dict(  # the same for every launch of the call
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap != 0.0, HAS_SMOOTHING=label_smoothing != 0.0,
            NEEDS_BIAS=needs_bias, EVEN_D=dim % cfg.block_d == 0, DOT_PRECISION=dot_precision(e.dtype),
            UPCAST=dot_upcast(e), LEAN_DZ=LEAN_DZ_EPILOGUE, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

        dc_descs = {}  # the filtered dC GEMM's epilogue descriptors of dC's chunks, made once per call
        window_rows, chunk_cols = buffered_window(e, vocab, buffer_bytes, filter_de, filter_dc)
        num_chunks = triton.cdiv(vocab, chunk_cols)
        if listed:  # each dz launch's kept tiles, listed once for the call
            list_stride = triton.cdiv(window_rows, cfg.block_n) * triton.cdiv(chunk_cols, cfg.block_v)
            launches = triton.cdiv(num_tokens, window_rows) * num_chunks
            tile_lists = torch.empty(launches, list_stride, dtype=torch.int32, device=device)
            tile_list_counts = torch.empty(launches, dtype=torch.int32, device=device)
            _listed_tiles_kernel[(launches,)](
                keep, tile_lists, tile_list_counts, tile_counts if tile_counts is not None else dummy,
                num_tokens, vocab, window_rows, chunk_cols, num_chunks, keep.stride(0), list_stride,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, GROUP_N=cfg.group_n,
                BLOCK=min(LIST_BLOCK, triton.next_power_of_2(list_stride)), COUNT_TILES=tile_counts is not None,
                num_warps=4,
            )

        def window_launcher(n_begin, n_count):
            """The dz kernel's launcher for the window of tokens [n_begin, +n_count): launch(v_begin,
            v_count, dz_buf) writes dz of vocabulary rows [v_begin, +v_count) into dz_buf ((n_count,
            v_count), the input dtype, unit column stride). The window's slices and E descriptor are
            made once, a buffer view's descriptor once: the host time per launch is what feeds the
            GPU at small heads (benchmarks/host_overhead.py)."""
            rows = slice(n_begin, n_begin + n_count)
            e_w, targets_w, lse_w, grad_loss_w, grad_lse_w = (
                e[rows], targets[rows], lse[rows], grad_loss[rows], grad_lse[rows])
            e_desc = tma_descriptor(e_w, [cfg.block_n, cfg.block_d], cfg)
            e_desc_dc = tma_descriptor(e_w, [dc_cfg.block_n, dc_cfg.block_d], dc_cfg) if filter_dc else None
            tiles_n = triton.cdiv(n_count, cfg.block_n)
            tile_means = _tile_means(e_w, cfg.block_n) if stand_in else None
            dz_descs, keeps, col_sums = {}, {}, {}
            launch_of_window = (n_begin // window_rows) * num_chunks

            def keep_flags(v_begin, v_count):
                """(flags, row stride) of the chunk's tiles: the forward's, or what the dz kernel wrote."""
                if listed:
                    return keep[n_begin // cfg.block_n :, v_begin // cfg.block_v :], keep.stride(0)
                return keeps[v_count], triton.cdiv(v_count, cfg.block_v)

            def launch(v_begin, v_count, dz_buf):
                key = (dz_buf.data_ptr(), v_count)
                if key not in dz_descs:
                    dz_descs[key] = (tma_descriptor(dz_buf, [cfg.block_n, cfg.block_v], cfg),
                                     tma_descriptor(dz_buf, [de_cfg.block_n, de_cfg.block_v], de_cfg)
                                     if filter_de else None,
                                     tma_descriptor(dz_buf, [dc_cfg.block_n, dc_cfg.block_v], dc_cfg)
                                     if filter_dc else None)
                    keeps[v_count] = torch.empty(tiles_n * triton.cdiv(v_count, cfg.block_v), dtype=torch.int8,
                                                 device=device) if filter_grad and not listed else dummy
                    col_sums[v_count] = torch.empty(tiles_n, v_count, dtype=f32, device=device) if stand_in else dummy
                dz_desc = dz_descs[key][0]
                which = launch_of_window + v_begin // chunk_cols
                listed_tiles = (tile_lists[which], tile_list_counts[which:]) if listed else (dummy, dummy)
                tma = e_desc is not None and c_desc is not None and dz_desc is not None
                tiles = triton.cdiv(n_count, cfg.block_n) * triton.cdiv(v_count, cfg.block_v)
                programs = min(tiles, sms)
                _dz_kernel[(programs,)](
                    e_w, c, e_desc if tma else e_w, c_desc if tma else c, bias, targets_w, lse_w,
                    grad_loss_w, grad_lse_w, dbias if needs_bias else dummy, dz_buf, dz_desc if tma else dz_buf,
                    keeps[v_count], col_sums[v_count], tile_counts if tile_counts is not None else dummy,
                    *listed_tiles, n_count, vocab, dim, v_begin, v_count, programs,
                    e.stride(0), c.stride(0), dz_buf.stride(0), v_count,
                    ignore_index, float(softcap), 1.0 - label_smoothing, label_smoothing / vocab, filter_tau,
                    TMA=tma, FLATTEN=tma and HAS_FLATTEN and softcap == 0.0, FILTER=bool(filter_grad) and not listed,
                    FILTER_DC=stand_in, COUNT_TILES=tile_counts is not None and bool(filter_grad) and not listed,
                    LISTED=listed, **constants,
                )

            acc_descs = {}  # the window's accumulator's epilogue descriptor (dC's: once per call, above)

            def add_de(acc_window, v_begin, v_count, dz_buf):
                """acc_window += dz_buf @ C[chunk] over the tiles the filter kept."""
                parts = FILTERED_DE_EPILOGUE_PARTS
                key = (acc_window.data_ptr(), tuple(acc_window.shape), parts)
                if key not in acc_descs:
                    acc_descs[key] = epilogue_descriptor(acc_window, de_cfg, de_cfg.block_n, parts)
                flags, stride = keep_flags(v_begin, v_count)
                filtered_de_gemm(acc_window, dz_buf, c, flags, v_begin, de_cfg, cfg.block_v, sms,
                                 dz_desc=dz_descs[(dz_buf.data_ptr(), v_count)][1], c_desc=c_desc_de,
                                 acc_desc=acc_descs[key], epilogue_parts=parts, keep_stride=stride)

            def add_dc(dc_chunk, v_begin, v_count, dz_buf, accumulate):
                """dc_chunk (+)= dz_buf^T @ E[window] over the tiles the filter kept, plus the skipped
                tiles' stand-ins unless listed (the 16-bit dC rows of the chunk; accumulate: after the
                first window)."""
                parts = FILTERED_DC_EPILOGUE_PARTS
                key = (dc_chunk.data_ptr(), tuple(dc_chunk.shape), parts)
                if key not in dc_descs:
                    dc_descs[key] = epilogue_descriptor(dc_chunk, dc_cfg, dc_cfg.block_v, parts)
                flags, stride = keep_flags(v_begin, v_count)
                filtered_dc_gemm(dc_chunk, dz_buf, e_w, flags, col_sums[v_count] if stand_in else None, tile_means,
                                 accumulate, dc_cfg, cfg.block_n, cfg.block_v, sms,
                                 dz_desc=dz_descs[(dz_buf.data_ptr(), v_count)][2], e_desc=e_desc_dc,
                                 dc_desc=dc_descs[key], epilogue_parts=parts, keep_stride=stride)

            return launch, (add_de if filter_de else None), (add_dc if filter_dc else None)

        de, dc = _buffered_backward(window_launcher, e, c, num_tokens, dim, vocab, needs_e, needs_c, window_rows,
                                    chunk_cols)
    else:
        de, dc = _atomic_backward(launch, e, c, num_tokens, dim, vocab, order, tile, needs_e, needs_c,
                                  needs_bias, window_bytes)
    return (
        de.to(orig_e_dtype) if needs_e else None,
        dc.to(orig_c_dtype) if needs_c else None,
        dbias.to(bias.dtype) if needs_bias else None,
    )


def _atomic_backward(launch, e, c, num_tokens, dim, vocab, order, tile, needs_e, needs_c, needs_bias,
                     window_bytes):
    """The atomic path: the kernel forms dE and dC with float32 atomics. Returns (dE or None, dC or
    None) in the inputs' (common) dtype."""
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
    de_acc = None if (de is None or split_e) else (de if e.dtype == f32 else torch.zeros(num_tokens, dim, dtype=f32, device=device))
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


# Whether filtering walks the vocabulary in default_vocab_order. Measured on the LM-like regime at
# eps = 2^-2 (as above): s = 0.42 ordered vs 0.71 in the identity order -- that data's ids are
# already frequency-ranked (Zipf over ids), and ordering by the batch's mean logit scatters them.
# Off by default; ``vocab_order=True`` turns it on.
DEFAULT_ORDER = False


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


# ----------------------------------------------------------------------------- buffered path


def buffered_path_applies(e: Tensor, order, dropped_dc: bool = False) -> bool:
    """The buffered path serves 16-bit gradients, exact or filtered (dC exact or corrected): float32
    inputs keep the kernel's IEEE dots (cuBLAS would follow torch's TF32 setting), a vocabulary order
    and a dropped dC (dc_filter="dropped") need the atomic kernel, and on CUDA it needs torch's
    mixed-precision addmm."""
    if e.dtype == torch.float32 or order is not None or dropped_dc:
        return False
    return e.device.type != "cuda" or _HAS_ADDMM_DTYPE


# Cached: a pure function of its arguments (the module's constants come in as arguments too), and its
# search costs up to ~0.6 ms of host time at small N, on every backward call.
@functools.lru_cache(maxsize=256)
def buffered_shape(num_tokens: int, dim: int, vocab: int, element_size: int, buffer_bytes: int,
                   block_n: int, block_v: int, sms: int | None = None,
                   max_chunk_tiles: int | None = MAX_CHUNK_TILES, de_d_tiles: int = 0,
                   chunk_v: int = CHUNK_V, max_window_tiles: int | None = None) -> tuple[int, int]:
    """(tokens per window, vocabulary entries per chunk) for the buffered path, windows in whole
    tiles. Buffer rows*cols*element_size + accumulator 4*rows*dim stay within buffer_bytes, unless
    one tile of each is already more. Chunks are ``chunk_v`` entries (all of V when smaller) or, with
    ``sms``, wider where the budget allows; never more than ``max_chunk_tiles`` vocab tiles (the
    filtered dE GEMM's lists of kept tiles; None: no limit, the exact path). ``de_d_tiles``:
    the filtered dE GEMM's output tiles per token tile (its tiles across D), launched once per
    chunk like the dz kernel; their waves count with the dz kernel's (0: dE by cuBLAS).
    ``max_window_tiles``: at most this many token tiles per window (the filtered dC GEMM's lists of
    kept tiles; None: no limit). Its launches are not counted: counting them picked 3072 x 4864 at
    8192 x 2304 x 256000, which measured 60.7 against 48.9 ms for the filtered path's 1792 x 11776
    with dC by cuBLAS (results/h200-2026-12-01h/dc_variants_waves.log).

    ``sms`` None: ``chunk_v``-wide chunks, windows as few as the budget allows, evenly sized.
    ``sms`` given (the dz kernel's programs): the window within the budget at ``chunk_v``-wide chunks
    with the fewest waves of ``sms`` tiles over the whole call (a launch takes as long as its number
    of waves, a partial last wave costing a whole one), then the fewest windows; then, for that
    window, the chunk width (from ``chunk_v`` up to what the budget holds) with the fewest waves, then
    the fewest bytes read and written by the GEMMs' accumulating epilogues (dE's float32 window once
    per chunk, dC once per window after the first). The last window and chunk hold the rest.
    Measured on an H200 (bf16; benchmarks/backward_variants.py, results/h200-2026-12-01/ and -f/):
    at 8192 x 2304 x 256000, 4 windows of 2048 tokens against 3 of 2816 (256 against 352 tiles per
    launch: 1.94 against 2.67 waves), backward 48.9 / 49.0 against 53.4 / 52.5 ms (LM-like, two runs);
    chunks of 8192 against 4096 at 2048 tokens, 47.21 / 47.85 against 47.95 / 48.10 ms (LM-like /
    uniform), and at 8192 x 4096 x 128256 40.59 / 39.92 against 42.28 / 41.40 ms (uniform / LM-like;
    64 MiB, over the budget). E.g. (8192, 2304, 256000, bf16, 56 MiB, 128 x 256 tiles, 132 SMs): 4
    windows of 2048 tokens and chunks of 8448; without ``sms`` 3 windows of 2816 and chunks of 4096."""
    tile_cap = max_chunk_tiles if max_chunk_tiles is not None else -(-vocab // block_v)
    base = min(vocab, chunk_v, tile_cap * block_v)
    per_token = element_size * buffer_row_stride(base) + 4 * dim
    fit = max(block_n, buffer_bytes // per_token // block_n * block_n)
    if max_window_tiles is not None:
        fit = min(fit, max_window_tiles * block_n)
    if sms is None:
        windows = -(-num_tokens // fit)
        rows = -(-num_tokens // windows)
        return min(fit, -(-rows // block_n) * block_n, num_tokens), base
    tiles_n, tiles_v = -(-num_tokens // block_n), -(-vocab // block_v)

    def launch_waves(width, chunk_tiles):  # one chunk of a window of `width` token tiles
        if width == 0 or chunk_tiles == 0:
            return 0
        return -(-width * chunk_tiles // sms) + -(-width * de_d_tiles // sms)

    def waves(window_tiles, chunk_tiles):  # over the whole call
        def per_window(width):
            full, rest = divmod(tiles_v, chunk_tiles)
            return full * launch_waves(width, chunk_tiles) + launch_waves(width, rest)

        full, rest = divmod(tiles_n, window_tiles)
        return full * per_window(window_tiles) + per_window(rest)

    def epilogue_bytes(window_tiles, chunk_tiles):
        windows, chunks = -(-tiles_n // window_tiles), -(-tiles_v // chunk_tiles)
        return 8 * num_tokens * dim * chunks + 2 * element_size * vocab * dim * (windows - 1)

    # The window first, at ``chunk_v``-wide chunks (whole-call waves, then the fewest windows, then the
    # larger), then the chunk's width for that window. (A joint search picks windows of 640-1536
    # tokens for a wave or two, which the measurements above put 1-2 ms behind: the model counts the
    # dz kernel's waves, not the cuBLAS GEMMs' loss of speed on a short window.)
    base_tiles = -(-base // block_v)
    window_tiles = min(range(1, max(1, min(tiles_n, fit // block_n)) + 1),
                       key=lambda t: (waves(t, base_tiles), -(-tiles_n // t), -t))
    rows = min(window_tiles * block_n, num_tokens)
    room = (buffer_bytes - 4 * dim * rows) // (element_size * rows)  # buffer columns that fit
    widest = max(base_tiles, min(tile_cap, tiles_v, room // block_v))
    chunk_tiles = min(range(base_tiles, widest + 1),
                      key=lambda w: (waves(window_tiles, w), epilogue_bytes(window_tiles, w)))
    return rows, min(chunk_tiles * block_v, vocab)


def buffered_window(e: Tensor, vocab: int, buffer_bytes: int = BUFFER_BYTES, filtered: bool = False,
                    filtered_dc: bool = False) -> tuple[int, int]:
    """(tokens per window, vocabulary entries per chunk) as the buffered path chooses them for
    (N, D) = e.shape, its dtype and device, exact, with dE ``filtered`` or (and) dC ``filtered_dc``
    (``buffered_shape``; windows and chunks fit to the device's SMs where WAVE_ALIGNED_WINDOWS; a
    filtered path's chunks hold at most MAX_CHUNK_TILES vocab tiles; the filtered dE GEMM's launches
    count unless it cuts its last wave into pieces (``split_last_wave_applies``) and dC is not
    filtered; with dC filtered, windows hold at most MAX_WINDOW_TILES token tiles)."""
    cfg = buffered_config(e)
    if filtered or filtered_dc:
        # with dC filtered too (filter_dc), windows sized to the dE GEMM's waves measured faster all the
        # same (results/h200-2026-12-01l/de_last_wave.log, 8192 x 2304 x 256000: 48.96 / 50.87 ms at
        # 1792 tokens against 49.51 / 53.56 at 2048, LM-like / uniform)
        waves_count = filtered and (filtered_dc or not split_last_wave_applies())
        de_d_tiles = triton.cdiv(e.shape[1], filtered_de_config(e).block_d) if waves_count else 0
        shape_options = dict(max_chunk_tiles=MAX_CHUNK_TILES, de_d_tiles=de_d_tiles,
                             max_window_tiles=MAX_WINDOW_TILES if filtered_dc else None)
    else:
        shape_options = dict(max_chunk_tiles=None)
    return buffered_shape(e.shape[0], e.shape[1], vocab, e.element_size(), buffer_bytes, cfg.block_n, cfg.block_v,
                          sms=sm_count(e.device) if WAVE_ALIGNED_WINDOWS else None, chunk_v=CHUNK_V, **shape_options)


def _tile_means(e_window: Tensor, block_n: int) -> Tensor:
    """The float32 mean of each block_n rows of e_window (the last block: of its rows), (tiles, D):
    the filtered dC's stand-in for a skipped tile multiplies its column sums of dz by these. Reduced
    in float32 from the 16-bit rows (no float32 copy of the window)."""
    n, dim = e_window.shape
    full = n // block_n
    means = torch.empty(-(-n // block_n), dim, dtype=torch.float32, device=e_window.device)
    if full:
        torch.mean(e_window[: full * block_n].view(full, block_n, dim), dim=1, dtype=torch.float32, out=means[:full])
    if full * block_n < n:
        torch.mean(e_window[full * block_n :], dim=0, dtype=torch.float32, out=means[full])
    return means


def buffer_row_stride(cols: int) -> int:
    """The dz buffer's row stride: cols rounded up to 8 elements, so that every row starts 16-byte
    aligned (TMA stores need it; cuBLAS takes the padded leading dimension as it is)."""
    return -(-cols // 8) * 8


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, float32 acc, 16-bit a and b: cuBLAS's mixed-precision addmm on CUDA (float32
    accumulation, no copies); through float32 copies elsewhere (the interpreter's CPU tensors)."""
    if acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _buffered_backward(window_launcher, e, c, num_tokens, dim, vocab, needs_e, needs_c, rows, cols):
    """Exact 16-bit gradients with GEMMs by cuBLAS, in bounded memory. For each window of tokens
    (outer) and chunk of the vocabulary (inner), the recompute kernel writes dz (the input dtype) into
    one buffer, then
        dE_acc[window] += dz @ C[chunk]    (float32 accumulator of the window's tokens; dE once per window)
        dC[chunk]     (+)= dz^T @ E[window] (cuBLAS, into the 16-bit dC: float32 inside the GEMM, the
                                            running sum rounded once per window after the first)
    dbias comes from the kernel's float32 atomics. One recompute of the logits (the atomic path
    needs two once dE's float32 buffer passes its window), three GEMMs by cuBLAS, and the buffer's
    traffic. dC's rounding: one per window (bf16: ~2^-9 each, on a sum that grows with the windows),
    so dC's error stays within torch's own while the windows are few (4 at N = 8192 under the
    default budget). ``window_launcher(n_begin, n_count)`` returns the window's dz launcher
    ``launch(v_begin, v_count, dz)``. The views of each chunk are made once per call, not per
    iteration (host time; see window_launcher). Windows of ``rows`` tokens, chunks of ``cols``
    vocabulary entries (``buffered_window``). Returns (dE or None, dC or None) in the input dtype."""
    ld = buffer_row_stride(cols)
    buf = torch.empty(rows * ld, dtype=e.dtype, device=e.device)
    dc = torch.empty(vocab, dim, dtype=c.dtype, device=c.device) if needs_c else None
    acc = torch.empty(rows, dim, dtype=torch.float32, device=e.device) if needs_e else None
    chunks = [(v_begin, min(cols, vocab - v_begin)) for v_begin in range(0, vocab, cols)]
    c_chunks = [c[v_begin : v_begin + v_count] for v_begin, v_count in chunks]
    dc_chunks = [dc[v_begin : v_begin + v_count] for v_begin, v_count in chunks] if needs_c else None
    de = None  # allocated once the first window is done (after the buffer is freed, for one window)
    for n_begin in range(0, num_tokens, rows):
        n_count = min(rows, num_tokens - n_begin)
        e_window = e[n_begin : n_begin + n_count]
        acc_window = acc[:n_count].zero_() if needs_e else None
        launch, add_filtered_de, add_filtered_dc = window_launcher(n_begin, n_count)
        window_buf = buf[: n_count * ld].view(n_count, ld)
        widths = {v_count for _, v_count in chunks}  # one or two: the full chunk and the last
        dz_views = {v_count: (window_buf[:, :v_count], window_buf[:, :v_count].T) for v_count in widths}
        for i, (v_begin, v_count) in enumerate(chunks):
            dz, dz_t = dz_views[v_count]
            launch(v_begin, v_count, dz)
            if needs_e and add_filtered_de is not None:
                add_filtered_de(acc_window, v_begin, v_count, dz)
            elif needs_e:
                _add_product(acc_window, dz, c_chunks[i])
            if needs_c and add_filtered_dc is not None:
                add_filtered_dc(dc_chunks[i], v_begin, v_count, dz, n_begin > 0)
            elif needs_c:
                if n_begin == 0:
                    torch.mm(dz_t, e_window, out=dc_chunks[i])
                else:
                    dc_chunks[i].addmm_(dz_t, e_window)
        if needs_e:
            if n_begin + n_count == num_tokens:
                # the last window: the buffer (held by its views and the launcher's descriptors) is
                # free before dE takes its own memory
                del dz, dz_t, dz_views, window_buf, buf, launch, add_filtered_de, add_filtered_dc
            if de is None:
                de = torch.empty(num_tokens, dim, dtype=e.dtype, device=e.device)
            de[n_begin : n_begin + n_count].copy_(acc_window)
    return de, dc

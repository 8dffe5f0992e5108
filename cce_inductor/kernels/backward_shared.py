"""What the backward strategies share: a call's inputs, the gradient of a logit tile, the filter's rule,
and the filtered GEMMs' lists of kept tiles, schedule in order of work and epilogue through descriptors.

Gradient of sum_i (grad_loss_i * loss_i + grad_lse_i * lse_i) w.r.t. the (capped) logits z:
    dz_ij = (g_i + grad_lse_i) * p_ij - g_i * ((1 - ls) * [j == y_i] + ls / V),   p = softmax(z),
with g_i = grad_loss_i where y_i != ignore_index, else 0 (an ignored token's loss is constant);
times (1 - tanh^2(u_ij / cap)) under a softcap. Then dE = dz @ C, dC = dz^T @ E, dbias = sum_i dz.
``_token_coefficients`` loads a token tile's coefficients, ``_logit_grad`` forms dz of one logit tile
[BLOCK_N, BLOCK_V] in float32 from the forward's lse; both the atomic kernel (backward_atomic.py) and
the buffered path's dz kernel (backward_buffered.py) call them, with ``_tile_position``'s order of tiles.

The filter (``filter_grad=True``; ``_filter_keep``). A (token tile, vocab tile) block is skipped iff
for EVERY token i of the tile
      sum_{j in tile} |dz_ij|  <  eps * (|tile| / V) * w_i,     w_i = |g_i + grad_lse_i| + |g_i|,
|tile| = the tile's number of vocabulary entries (BLOCK_V, fewer at the edge); eps = FILTER_EPS
(backward.py). Skipped means: no dE product (dC: as ``dc_filter`` says, backward.py).
  Bound: sum_j |dz_ij| <= w_i for every token (the softmax sums to one), and the tiles' widths sum
  to V, so the gradient mass dropped from any token's row of dz is < eps * w_i, in every data
  regime, and dE_i is off by at most eps * w_i * max_j |C_j|: a per-token bound, so dE's relative
  error does not grow with N. For the plain loss w_i = 2 g_i: a tile is skipped only where every
  token has less than 2 eps times the uniform share |tile| / V of probability there, so a
  near-uniform softmax is never filtered (eps < 1/2); a tile holding a token's target is filtered
  only if 1 - p_y is that small; label smoothing ls puts ls * |tile| / V of mass in every tile, so
  with ls >= 2 eps nothing is filtered.
  dC: dC_j = sum_i dz_ij E_i sums over tokens, and the dropped terms of a rarely likely row j add up
  coherently while dC's norm grows more slowly, so the same rule bounds only
  sum_j |error of dC_j| <= eps * sum_i w_i |E_i|, not dC's relative error: its error grows with N.
  Replacing each skipped tile's dC terms by colsum(dz)^T mean(E rows) (the "corrected" dC,
  backward_filtered_dc.py) holds it nearly flat.

The filtered GEMMs (backward_filtered_de.py, backward_filtered_dc.py) run their K loop over the kept
tiles only, with no branch in it: a row of up to 64 keep flags is first listed as four int64 words of
4-bit indices (``_kept_tile_lists``; ``_kept_tile`` reads the j-th), hence at most 64 tiles along K.
Their persistent programs may take the output tiles in descending order of work, dealt in snake
order (``_items_by_work``, ``_balanced_position``: a program's long tiles pair with short ones), and
their epilogues may read-modify-write the accumulator through a TMA descriptor, in 1, 2 or 4 column
blocks of the tile ([rows, cols // PARTS]; ``_add_through_descriptor``), or reduce-add into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl
from torch import Tensor

from .common import LOG2E, TileConfig, tma_descriptor


@dataclass(frozen=True)
class BackwardCall:
    """One backward call as the strategies read it: the inputs after ``common.prepare_inputs`` (lse
    and the upstream gradients float32), the loss's options, what is needed, and the outputs every
    strategy adds to in place (dbias's float32 accumulator, the optional tile counts)."""

    e: Tensor  # (N, D)
    c: Tensor  # (V, D)
    bias: Tensor | None  # (V,)
    targets: Tensor  # (N,) int64
    lse: Tensor  # (N,) float32, the forward's
    grad_loss: Tensor  # (N,) float32
    grad_lse: Tensor  # (N,) float32
    ignore_index: int
    softcap: float  # 0: none
    label_smoothing: float
    filter_grad: bool
    filter_tau: float  # the filter's allotment per vocabulary entry: eps / V
    needs_e: bool
    needs_c: bool
    needs_bias: bool  # and a bias given
    dbias: Tensor | None  # (V,) float32 zeros where needs_bias, added to by the kernels' atomics
    tile_counts: Tensor | None  # int32 (2,) [tiles computed, tiles filtered], added to; or None

    @property
    def num_tokens(self) -> int:
        return self.e.shape[0]

    @property
    def dim(self) -> int:
        return self.e.shape[1]

    @property
    def vocab(self) -> int:
        return self.c.shape[0]

    @property
    def dummy(self) -> Tensor:
        """Stands in for absent pointers."""
        return self.lse

    def kernel_scalars(self) -> tuple:
        """(ignore_index, softcap, target_weight, uniform_weight, filter_tau), as the recompute kernels
        take them: the weights of the target's one-hot, (1 - ls), and of every entry, ls / V."""
        return (self.ignore_index, float(self.softcap), 1.0 - self.label_smoothing,
                self.label_smoothing / self.vocab, self.filter_tau)

    def loss_flags(self) -> dict:
        """The recompute kernels' HAS_BIAS, HAS_SOFTCAP, HAS_SMOOTHING."""
        return dict(HAS_BIAS=self.bias is not None, HAS_SOFTCAP=self.softcap != 0.0,
                    HAS_SMOOTHING=self.label_smoothing != 0.0)


# ----------------------------------------------------------------------------- the gradient of a logit tile


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


# ----------------------------------------------------------------------------- the filtered GEMMs: kept-tile lists


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


# ----------------------------------------------------------------------------- the filtered GEMMs: order of work


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


# Above this many items (token tiles of a dE window, vocab tiles of a dC chunk): index order, as every
# program would hold their [items, KEEP_WIDTH] keep flags for the sort (not measured; far more items
# than the goal shapes' windows and chunks hold).
MAX_BALANCED_ITEMS = 256


def _balanced_items(items: int, balanced: bool, tiles: int, programs: int) -> int:
    """The filtered GEMM kernels' ITEMS for ``items`` items (token or vocab tiles) where their
    ``tiles`` go in order of work (``balanced``), else 0: index order, also where there is nothing to
    balance -- one item (its tiles all do the same work) or one wave (a tile per program) -- since the
    sort and the lookups cost each program time."""
    if not balanced or items < 2 or items > MAX_BALANCED_ITEMS or tiles <= programs:
        return 0
    return triton.next_power_of_2(items)


# ----------------------------------------------------------------------------- the filtered GEMMs: epilogue


def epilogue_descriptor(t: Tensor, cfg: TileConfig, rows: int, parts: int):
    """The TMA descriptor a filtered GEMM's epilogue reads and writes ``t`` through, tiles of
    [rows, cfg.block_d // parts] (None: no descriptor for t, or parts 0: pointers)."""
    if parts == 0:
        return None
    return tma_descriptor(t, [rows, cfg.block_d // parts], cfg, accumulator=True)


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

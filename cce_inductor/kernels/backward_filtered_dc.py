"""The filtered dC GEMM: dC (+)= dz^T @ E over the tiles the filter kept, plus stand-ins for the rest.

For one window of tokens and one chunk of the vocabulary (buffered path, dC filtered: ``dc_filter=
"corrected"``, or the forward's keep flags), after the dz kernel (backward_buffered.py) has written
the chunk's dz and one keep flag per (token tile, vocab tile), for every (BLOCK_V rows, BLOCK_D
columns) tile of the chunk's dC:
    dC[v, d] (+)= sum over the kept token tiles t of dz[t, v]^T @ E[t, d]
                  + sum over all token tiles t of ColSums[t, v]^T @ TileMeans[t, d],
the second term the rank-1 stand-in for each skipped tile (STAND_IN): its column sums of dz (written
by the dz kernel; 0 for a kept tile) times the mean of its rows of E (``_tile_means``). Without
stand-ins (the forward's keep flags: a skipped tile is never recomputed, so it has no column sums) a
skipped tile's dC terms are dropped. The K loop walks the vocab tile's kept token tiles through the
lists of ``backward_shared._kept_tile_lists``. The sum is float32, rounded into the 16-bit dC once per
window (ACCUMULATE: added to what earlier windows left there), as cuBLAS's addmm does.

Tiles: output [BLOCK_V, BLOCK_D], BLOCK_V dividing the dz kernel's vocab tile (one keep flag per output
tile); K steps of BLOCK_K tokens, TILE_N // BLOCK_K of them per token tile (``common.filtered_dc_config``).
Schedule: persistent, D fastest (a vocab block's dz columns stay in L2), the tile loop flattened on TMA;
the output tiles by their vocab tile's kept count where BALANCED_FILTERED_DC.
Epilogue: dC's read-modify-write through pointers or through a TMA descriptor in
FILTERED_DC_EPILOGUE_PARTS column blocks; after the first window as a TMA reduce-add of the sum
rounded to dC's dtype where FILTERED_DC_EPILOGUE_REDUCE and on a GPU (the running sum then rounds
twice per window, round(old + round(sum)), where the load and store round it once).
Limits: at most MAX_WINDOW_TILES token tiles per window (the lists' 64 entries; a longer window is
refused); dz with unit column stride; the interpreter has no descriptor reductions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backward_shared import (
    _add_through_descriptor, _balanced_items, _balanced_position, _items_by_work, _kept_tile, _kept_tile_lists,
)
from .common import HAS_FLATTEN, TileConfig, dot, dot_precision, dot_upcast

# At most this many token tiles per window: the K loop lists a vocab tile's kept token tiles in the
# same four int64 words as the dE GEMM (backward_shared._kept_tile_lists).
MAX_WINDOW_TILES = 64
# The epilogue (the kernel's EPILOGUE_PARTS), as the dE GEMM's (backward_filtered_de.py): one block
# through a TMA descriptor; most of this GEMM's time beyond cuBLAS's is that read-modify-write of dC.
FILTERED_DC_EPILOGUE_PARTS = 1
# After the first window, the epilogue as a TMA reduce-add of the window's sum rounded to dC's 16-bit
# dtype, so that the kernel does not load the old dC tile (the sum rounds twice per window). Measured
# faster in the backward, dC's error against float64 still well within torch bf16's.
FILTERED_DC_EPILOGUE_REDUCE = True
# The output tiles walked in descending order of their vocab tile's work (kept tiles), in snake order
# over the programs, as in the dE GEMM: measured faster where much is skipped, slower where every tile
# is kept (its tiles are shorter than dE's, so the per-tile lookup counts more).
BALANCED_FILTERED_DC = True


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
    # MMA layout for this one dot, a 128 x 256 float32 round trip through shared memory per output tile,
    # which made this kernel slower.
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

"""The filtered dE GEMM: dE += dz @ C over the vocab tiles the filter kept (buffered path, filtered).

For one window of tokens and one chunk of the vocabulary, after the dz kernel (backward_buffered.py)
has written the chunk's dz into its buffer and one keep flag per (token tile, vocab tile):
    Acc[n, d] += sum over the kept vocab tiles t of dz[n, t] @ C[t, d]
for every (token tile, D tile) output tile, into the window's float32 accumulator. The K loop runs
over the kept steps only, through the token tile's lists of kept tiles
(``backward_shared._kept_tile_lists``): no branch, reduction or loop-carried index in its body, so it
stays pipelined.

Tiles: output [BLOCK_N, BLOCK_D], BLOCK_N the dz kernel's token tile (one keep flag per output row
block); K steps of BLOCK_K vocabulary entries, TILE_V // BLOCK_K of them per vocab tile of the dz
kernel (``common.filtered_de_config``).
Schedule: persistent (FILTERED_DE_PERSISTENT), D fastest so that a token tile's dz rows stay in L2;
on TMA the tile loop is flattened into the K loop (the next tile's loads overlap this one's
epilogue); the output tiles in descending order of work where BALANCED_FILTERED_DE
(``backward_shared._balanced_position``).
Split last wave (SPLIT_LAST_DE_WAVE): the launch's last, partial wave of output tiles is cut into
pieces along their kept K steps, as many per tile as keep every program busy, piece j of every such
tile before piece j + 1, so that the programs of that wave step through K together as a wave of
whole tiles does; each piece is added into Acc atomically, in a run-dependent order (hence off under
``torch.use_deterministic_algorithms(True)``).
Epilogue: Acc's read-modify-write through pointers, or through a TMA descriptor in
FILTERED_DE_EPILOGUE_PARTS column blocks, as a TMA reduce-add (no load of Acc) where
FILTERED_DE_EPILOGUE_REDUCE and on a GPU.
Limits: at most MAX_CHUNK_TILES vocab tiles per chunk (the lists' 64 entries; a wider chunk is
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

# At most this many vocab tiles per chunk: the K loop lists a token tile's kept vocab tiles in four
# int64 words, 16 tiles of 4 bits each (backward_shared._kept_tile_lists). The lists measured as fast
# or faster than an int64 bitmask walked by its lowest set bit (a loop-carried index).
MAX_CHUNK_TILES = 64
# A persistent kernel with its tile loop flattened (else one program per output tile): measured faster.
FILTERED_DE_PERSISTENT = True
# The epilogue (the kernel's EPILOGUE_PARTS): 0 = the accumulator's read-modify-write through
# pointers, 1 or 2 = through a TMA descriptor in that many column blocks. The descriptor epilogues
# (dE's in two blocks, dC's in one) measured faster in the backward than pointers; one block does not
# fit in shared memory beside the 3 stages (its float32 128 x 256 tile is 128 KB, loaded and stored).
FILTERED_DE_EPILOGUE_PARTS = 2
# The epilogue as a TMA reduce-add into the float32 accumulator where it goes through a descriptor on
# a GPU: no load of the old tile, the same float32 sums.
FILTERED_DE_EPILOGUE_REDUCE = True
# The output tiles walked in descending order of their work (kept tiles), dealt to the persistent
# programs in snake order, instead of in index order, which puts a token tile's D tiles on
# neighbouring programs of one wave. Measured faster where much is skipped, marginally slower where
# little is.
BALANCED_FILTERED_DE = True
# The last, partial wave of output tiles cut into pieces along their kept K steps, as many per tile as
# keep every program busy (programs // the wave's tiles), where that is >= 2: a launch of 144 tiles on
# 132 SMs then takes about 1.09 waves of time instead of 2. So the filtered path's windows need not fit
# the dE GEMM's waves (backward_buffered.buffered_window) and are the exact path's. Off where
# torch.use_deterministic_algorithms(True) is set: a tile's pieces are added in a run-dependent order.
# Stream-K (each program one contiguous run of the launch's kept K steps, tiles cut anywhere) measured
# slower per K step than whole tiles: its programs no longer step through K together, so what they
# read at one time spreads over the whole chunk's dz and C, beyond L2. Here the pieces of a wave start
# at the same K offset.
SPLIT_LAST_DE_WAVE = True


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
def _filtered_de_tile(
    Dz, C, Dz_desc, C_desc, Keep, Acc, Acc_desc, item, num_tiles, num_programs, keys, n_count, D, v_begin, v_count,
    stride_dzn, stride_cv, stride_accn, keep_stride, whole_tiles, pieces, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TILE_V: tl.constexpr, KEEP_WIDTH: tl.constexpr, TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EPILOGUE_PARTS: tl.constexpr, EPILOGUE_REDUCE: tl.constexpr,
    BALANCED: tl.constexpr, ITEMS: tl.constexpr, SPLIT: tl.constexpr,
):
    """One output tile, or with SPLIT one piece of a tile of the last wave. The K loop runs over the
    kept steps only, with no branch, no reduction and no loop-carried index in its body (so it stays
    pipelined): the kept tiles are listed first, as four
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


def split_last_wave_applies() -> bool:
    """Whether the filtered dE GEMM cuts its last partial wave into pieces (SPLIT_LAST_DE_WAVE, and
    no deterministic algorithms requested from torch); read at each call."""
    return SPLIT_LAST_DE_WAVE and not torch.are_deterministic_algorithms_enabled()


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

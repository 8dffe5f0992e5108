"""The buffered path (16-bit inputs, exact or filtered): a dz kernel writes each tile's logit gradient
into a bounded buffer, and GEMMs form dE and dC from it.

Algorithm, for each window of ``rows`` tokens (outer) and chunk of ``cols`` vocabulary entries (inner):
  1. ``_dz_kernel`` (persistent: one program per SM walks the launch's tiles, GROUP_N token tiles
     sweeping the chunk together) recomputes each logit tile (``common.logit_tile``: TMA loads where
     the GPU and the rows allow, the tile loop flattened except under a softcap), forms dz
     (``backward_shared._logit_grad``) and stores it, in the input dtype, into the (rows, cols)
     buffer; dbias by float32 atomics. With the filter, each tile's keep flag (the filter's rule,
     ``backward_shared._filter_keep``) and, for the corrected dC, a skipped tile's column sums.
  2. dE_acc[window] += dz @ C[chunk] into a float32 accumulator of the window's tokens: cuBLAS's
     mixed-precision addmm, or with the filter the filtered dE GEMM over the kept tiles
     (backward_filtered_de.py); dE is rounded once per window.
  3. dC[chunk] (+)= dz^T @ E[window]: cuBLAS into the 16-bit dC (float32 inside the GEMM, the running
     sum rounded once per window after the first), or where dC is filtered the filtered dC GEMM
     (backward_filtered_dc.py).
  With the forward's keep flags (``keep``), ``_listed_tiles_kernel`` lists each dz launch's kept tiles
  once per call, the dz kernel recomputes only those (LISTED) and both filtered GEMMs run over them
  (dC without stand-ins).
Tiles: dz tiles [BLOCK_N, BLOCK_V] (``common.buffered_config``); windows and chunks in whole tiles.
Memory: the buffer (rows x cols in the input dtype, rows padded to 16 bytes) and the float32 dE
accumulator (rows x D) stay within ``buffer_bytes`` (BUFFER_BYTES) whatever N and V are:
``buffered_shape`` sizes the windows so that the dz launches fill whole waves of SMs, then widens the
chunks into what remains.
Limits: one recompute of the logits and three GEMMs; dC's error grows with the windows (one rounding
each, within torch's own while they are few); with the filter, chunks of at most MAX_CHUNK_TILES vocab
tiles and, where dC is filtered, windows of at most MAX_WINDOW_TILES token tiles (the filtered GEMMs'
lists); a skipped tile's dz is stored all the same; float32 inputs, a vocabulary order and a dropped
dC are the atomic path's (backward.buffered_path_applies).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import backward_filtered_dc, backward_filtered_de
from .backward_filtered_dc import MAX_WINDOW_TILES, _tile_means, filtered_dc_gemm
from .backward_filtered_de import MAX_CHUNK_TILES, filtered_de_gemm, split_last_wave_applies
from .backward_shared import (
    BackwardCall, _filter_keep, _logit_grad, _tile_position, _token_coefficients, epilogue_descriptor,
)
from .common import (
    HAS_FLATTEN, buffered_config, capped_logits, dot_precision, dot_upcast, filtered_dc_config, filtered_de_config,
    logit_tile, sm_count, tma_descriptor,
)

# The scratch: a (tokens x vocabulary) dz buffer in the input dtype plus the float32 dE accumulator of
# its tokens. 56 MiB (58.7 MB) keeps the backward within 64 MB of the gradients' own size; the exact
# path widens its chunks into it (buffered_shape).
BUFFER_BYTES = 56 * 2**20
# The vocabulary chunk (the narrowest, and the width windows are sized for): the dE GEMM's reduction
# and the dC GEMM's row count, wide enough for cuBLAS to run near its peak. The exact path widens it
# where the budget allows.
CHUNK_V = 4096
# Window sizes chosen so that the dz kernel's launches fill whole waves of SMs (see buffered_shape);
# False: the fewest, evenly sized windows (for measurements).
WAVE_ALIGNED_WINDOWS = True
# The dz epilogue without its row and column masks, with exp2 and an int32 target compare (see
# backward_shared._logit_grad), measured faster; False: the masked epilogue, for measurement. The
# atomic kernel always runs the masked one.
LEAN_DZ_EPILOGUE = True
# Tiles per step of _listed_tiles_kernel's loop over a dz launch (a launch may hold up to 64 x 64).
LIST_BLOCK = 1024


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


# ----------------------------------------------------------------------------- windows and chunks


# Cached: a pure function of its arguments (the module's constants come in as arguments too), and its
# search takes host time on every backward call.
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
    kept tiles; None: no limit). Its launches are not counted: counting them picked windows that
    measured slower than the filtered path's with dC by cuBLAS.

    ``sms`` None: ``chunk_v``-wide chunks, windows as few as the budget allows, evenly sized.
    ``sms`` given (the dz kernel's programs): the window within the budget at ``chunk_v``-wide chunks
    with the fewest waves of ``sms`` tiles over the whole call (a launch takes as long as its number
    of waves, a partial last wave costing a whole one), then the fewest windows; then, for that
    window, the chunk width (from ``chunk_v`` up to what the budget holds) with the fewest waves, then
    the fewest bytes read and written by the GEMMs' accumulating epilogues (dE's float32 window once
    per chunk, dC once per window after the first). The last window and chunk hold the rest. Windows
    that fill whole waves, and chunks wider than ``chunk_v``, measured faster. E.g. (8192, 2304,
    256000, bf16, 56 MiB, 128 x 256 tiles, 132 SMs): 4 windows of 2048 tokens and chunks of 8448;
    without ``sms`` 3 windows of 2816 and chunks of 4096."""
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
    # larger), then the chunk's width for that window. (A joint search picks windows of a wave or two,
    # which measured slower: the model counts the dz kernel's waves, not the cuBLAS GEMMs' loss of
    # speed on a short window.)
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
        # same
        waves_count = filtered and (filtered_dc or not split_last_wave_applies())
        de_d_tiles = triton.cdiv(e.shape[1], filtered_de_config(e).block_d) if waves_count else 0
        shape_options = dict(max_chunk_tiles=MAX_CHUNK_TILES, de_d_tiles=de_d_tiles,
                             max_window_tiles=MAX_WINDOW_TILES if filtered_dc else None)
    else:
        shape_options = dict(max_chunk_tiles=None)
    return buffered_shape(e.shape[0], e.shape[1], vocab, e.element_size(), buffer_bytes, cfg.block_n, cfg.block_v,
                          sms=sm_count(e.device) if WAVE_ALIGNED_WINDOWS else None, chunk_v=CHUNK_V, **shape_options)


def buffer_row_stride(cols: int) -> int:
    """The dz buffer's row stride: cols rounded up to 8 elements, so that every row starts 16-byte
    aligned (TMA stores need it; cuBLAS takes the padded leading dimension as it is)."""
    return -(-cols // 8) * 8


# ----------------------------------------------------------------------------- the call


def buffered_backward(call: BackwardCall, buffer_bytes: int, keep: Tensor | None,
                      corrected_dc: bool) -> tuple[Tensor | None, Tensor | None]:
    """(dE or None, dC or None) in the input dtype by the buffered path; dbias into ``call.dbias``.
    ``keep``: the forward's keep flags (checked by the caller), or None. ``corrected_dc``: with the
    filter, dC by the filtered dC GEMM with stand-ins (else cuBLAS, exact); with ``keep`` dC is
    filtered (without stand-ins) whatever it says."""
    plan = _Plan(call, buffer_bytes, keep, corrected_dc)
    return _windows_and_chunks(plan.window, call.e, call.c, call.num_tokens, call.dim, call.vocab, call.needs_e,
                               call.needs_c, plan.window_rows, plan.chunk_cols)


class _Plan:
    """What the launches of one call share: the tile configs, C's descriptors, what is filtered, the
    windows and chunks, the dz kernel's constants and, with the forward's flags, each dz launch's list
    of kept tiles (made once for the call)."""

    def __init__(self, call: BackwardCall, buffer_bytes: int, keep: Tensor | None, corrected_dc: bool):
        e, c = call.e, call.c
        self.call, self.keep, self.listed = call, keep, keep is not None
        self.cfg = cfg = buffered_config(e)
        self.c_desc = tma_descriptor(c, [cfg.block_v, cfg.block_d], cfg)  # one per call: C is the same
        self.sms = sm_count(e.device)
        self.filter_de = call.filter_grad and call.needs_e
        self.filter_dc = call.filter_grad and call.needs_c and (self.listed or corrected_dc)
        self.stand_in = self.filter_dc and not self.listed
        self.de_cfg, self.dc_cfg = de_cfg, dc_cfg = filtered_de_config(e), filtered_dc_config(e)
        assert de_cfg.block_n == cfg.block_n, "the dE GEMM's token tiles are the dz kernel's (one keep flag each)"
        assert cfg.block_v % dc_cfg.block_v == 0 and cfg.block_n % dc_cfg.block_n == 0, \
            "the dC GEMM's tiles split the dz kernel's (one keep flag each)"
        self.c_desc_de = tma_descriptor(c, [de_cfg.block_v, de_cfg.block_d], de_cfg) if self.filter_de else None
        # The tile loop is flattened except under a softcap, where the flattened loop measured slower.
        self.constants = dict(  # the same for every launch of the call
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n, **call.loss_flags(),
            NEEDS_BIAS=call.needs_bias, EVEN_D=call.dim % cfg.block_d == 0, DOT_PRECISION=dot_precision(e.dtype),
            UPCAST=dot_upcast(e), LEAN_DZ=LEAN_DZ_EPILOGUE, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        self.dc_descs = {}  # the filtered dC GEMM's epilogue descriptors of dC's chunks, made once per call
        self.window_rows, self.chunk_cols = buffered_window(e, call.vocab, buffer_bytes, self.filter_de,
                                                            self.filter_dc)
        self.num_chunks = triton.cdiv(call.vocab, self.chunk_cols)
        self.tile_lists, self.tile_list_counts = self._list_kept_tiles() if self.listed else (None, None)

    def _list_kept_tiles(self) -> tuple[Tensor, Tensor]:
        """Each dz launch's kept tiles (from the forward's flags) and their number, listed once for the
        call (``_listed_tiles_kernel``)."""
        call, cfg, keep = self.call, self.cfg, self.keep
        list_stride = triton.cdiv(self.window_rows, cfg.block_n) * triton.cdiv(self.chunk_cols, cfg.block_v)
        launches = triton.cdiv(call.num_tokens, self.window_rows) * self.num_chunks
        tile_lists = torch.empty(launches, list_stride, dtype=torch.int32, device=call.e.device)
        tile_list_counts = torch.empty(launches, dtype=torch.int32, device=call.e.device)
        _listed_tiles_kernel[(launches,)](
            keep, tile_lists, tile_list_counts, call.tile_counts if call.tile_counts is not None else call.dummy,
            call.num_tokens, call.vocab, self.window_rows, self.chunk_cols, self.num_chunks, keep.stride(0),
            list_stride, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, GROUP_N=cfg.group_n,
            BLOCK=min(LIST_BLOCK, triton.next_power_of_2(list_stride)), COUNT_TILES=call.tile_counts is not None,
            num_warps=4,
        )
        return tile_lists, tile_list_counts

    def window(self, n_begin: int, n_count: int):
        """The launchers of the window of tokens [n_begin, +n_count), as ``_windows_and_chunks`` takes
        them: (the dz kernel's, the filtered dE GEMM's or None, the filtered dC GEMM's or None)."""
        window = _Window(self, n_begin, n_count)
        return window.launch, (window.add_de if self.filter_de else None), (window.add_dc if self.filter_dc else None)


class _Window:
    """One window of tokens [n_begin, +n_count). ``launch(v_begin, v_count, dz_buf)`` writes dz of
    vocabulary rows [v_begin, +v_count) into dz_buf ((n_count, v_count), the input dtype, unit column
    stride); ``add_de`` and ``add_dc`` run the filtered GEMMs on it. The window's slices and E
    descriptors are made once, a buffer view's descriptors (and the chunk width's keep flags and
    column sums) once: the host time per launch is what feeds the GPU at small heads."""

    def __init__(self, plan: _Plan, n_begin: int, n_count: int):
        call, cfg = plan.call, plan.cfg
        self.plan, self.n_begin, self.n_count = plan, n_begin, n_count
        rows = slice(n_begin, n_begin + n_count)
        self.e_w, self.targets_w, self.lse_w, self.grad_loss_w, self.grad_lse_w = (
            call.e[rows], call.targets[rows], call.lse[rows], call.grad_loss[rows], call.grad_lse[rows])
        self.e_desc = tma_descriptor(self.e_w, [cfg.block_n, cfg.block_d], cfg)
        self.e_desc_dc = (tma_descriptor(self.e_w, [plan.dc_cfg.block_n, plan.dc_cfg.block_d], plan.dc_cfg)
                          if plan.filter_dc else None)
        self.tiles_n = triton.cdiv(n_count, cfg.block_n)
        self.tile_means = _tile_means(self.e_w, cfg.block_n) if plan.stand_in else None
        self.dz_descs, self.keeps, self.col_sums = {}, {}, {}
        self.acc_descs = {}  # the window's accumulator's epilogue descriptor (dC's: the plan's, once per call)
        self.launch_of_window = (n_begin // plan.window_rows) * plan.num_chunks

    def keep_flags(self, v_begin: int, v_count: int):
        """(flags, row stride) of the chunk's tiles: the forward's, or what the dz kernel wrote."""
        plan = self.plan
        if plan.listed:
            return plan.keep[self.n_begin // plan.cfg.block_n :, v_begin // plan.cfg.block_v :], plan.keep.stride(0)
        return self.keeps[v_count], triton.cdiv(v_count, plan.cfg.block_v)

    def _buffers_of(self, dz_buf: Tensor, v_count: int) -> None:
        """dz_buf's descriptors (dz kernel's, dE GEMM's, dC GEMM's) and the chunk width's keep flags
        and column sums, made at the first launch into this view of the buffer."""
        plan, call, cfg = self.plan, self.plan.call, self.plan.cfg
        de_cfg, dc_cfg, device = plan.de_cfg, plan.dc_cfg, call.e.device
        self.dz_descs[(dz_buf.data_ptr(), v_count)] = (
            tma_descriptor(dz_buf, [cfg.block_n, cfg.block_v], cfg),
            tma_descriptor(dz_buf, [de_cfg.block_n, de_cfg.block_v], de_cfg) if plan.filter_de else None,
            tma_descriptor(dz_buf, [dc_cfg.block_n, dc_cfg.block_v], dc_cfg) if plan.filter_dc else None)
        self.keeps[v_count] = torch.empty(self.tiles_n * triton.cdiv(v_count, cfg.block_v), dtype=torch.int8,
                                          device=device) if call.filter_grad and not plan.listed else call.dummy
        self.col_sums[v_count] = (torch.empty(self.tiles_n, v_count, dtype=torch.float32, device=device)
                                  if plan.stand_in else call.dummy)

    def launch(self, v_begin: int, v_count: int, dz_buf: Tensor) -> None:
        """The dz kernel over the window's tokens x vocabulary rows [v_begin, +v_count), into dz_buf."""
        plan, call, cfg = self.plan, self.plan.call, self.plan.cfg
        e, c, dummy, counts = call.e, call.c, call.dummy, call.tile_counts
        key = (dz_buf.data_ptr(), v_count)
        if key not in self.dz_descs:
            self._buffers_of(dz_buf, v_count)
        dz_desc = self.dz_descs[key][0]
        which = self.launch_of_window + v_begin // plan.chunk_cols
        listed_tiles = (plan.tile_lists[which], plan.tile_list_counts[which:]) if plan.listed else (dummy, dummy)
        tma = self.e_desc is not None and plan.c_desc is not None and dz_desc is not None
        tiles = triton.cdiv(self.n_count, cfg.block_n) * triton.cdiv(v_count, cfg.block_v)
        programs = min(tiles, plan.sms)
        flagged = call.filter_grad and not plan.listed  # the dz kernel applies the filter's rule itself
        _dz_kernel[(programs,)](
            self.e_w, c, self.e_desc if tma else self.e_w, plan.c_desc if tma else c, call.bias, self.targets_w,
            self.lse_w, self.grad_loss_w, self.grad_lse_w, call.dbias if call.needs_bias else dummy, dz_buf,
            dz_desc if tma else dz_buf, self.keeps[v_count], self.col_sums[v_count],
            counts if counts is not None else dummy,
            *listed_tiles, self.n_count, call.vocab, call.dim, v_begin, v_count, programs,
            e.stride(0), c.stride(0), dz_buf.stride(0), v_count,
            *call.kernel_scalars(),
            TMA=tma, FLATTEN=tma and HAS_FLATTEN and call.softcap == 0.0, FILTER=flagged,
            FILTER_DC=plan.stand_in, COUNT_TILES=counts is not None and flagged, LISTED=plan.listed,
            **plan.constants,
        )

    def add_de(self, acc_window: Tensor, v_begin: int, v_count: int, dz_buf: Tensor) -> None:
        """acc_window += dz_buf @ C[chunk] over the tiles the filter kept."""
        plan = self.plan
        parts = backward_filtered_de.FILTERED_DE_EPILOGUE_PARTS
        key = (acc_window.data_ptr(), tuple(acc_window.shape), parts)
        if key not in self.acc_descs:
            self.acc_descs[key] = epilogue_descriptor(acc_window, plan.de_cfg, plan.de_cfg.block_n, parts)
        flags, stride = self.keep_flags(v_begin, v_count)
        filtered_de_gemm(acc_window, dz_buf, plan.call.c, flags, v_begin, plan.de_cfg, plan.cfg.block_v, plan.sms,
                         dz_desc=self.dz_descs[(dz_buf.data_ptr(), v_count)][1], c_desc=plan.c_desc_de,
                         acc_desc=self.acc_descs[key], epilogue_parts=parts, keep_stride=stride)

    def add_dc(self, dc_chunk: Tensor, v_begin: int, v_count: int, dz_buf: Tensor, accumulate: bool) -> None:
        """dc_chunk (+)= dz_buf^T @ E[window] over the tiles the filter kept, plus the skipped tiles'
        stand-ins unless listed (the 16-bit dC rows of the chunk; accumulate: after the first window)."""
        plan = self.plan
        parts = backward_filtered_dc.FILTERED_DC_EPILOGUE_PARTS
        key = (dc_chunk.data_ptr(), tuple(dc_chunk.shape), parts)
        if key not in plan.dc_descs:
            plan.dc_descs[key] = epilogue_descriptor(dc_chunk, plan.dc_cfg, plan.dc_cfg.block_v, parts)
        flags, stride = self.keep_flags(v_begin, v_count)
        filtered_dc_gemm(dc_chunk, dz_buf, self.e_w, flags, self.col_sums[v_count] if plan.stand_in else None,
                         self.tile_means, accumulate, plan.dc_cfg, plan.cfg.block_n, plan.cfg.block_v, plan.sms,
                         dz_desc=self.dz_descs[(dz_buf.data_ptr(), v_count)][2], e_desc=self.e_desc_dc,
                         dc_desc=plan.dc_descs[key], epilogue_parts=parts, keep_stride=stride)


def _add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, float32 acc, 16-bit a and b: cuBLAS's mixed-precision addmm on CUDA (float32
    accumulation, no copies); through float32 copies elsewhere (the interpreter's CPU tensors)."""
    if acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _windows_and_chunks(window_launcher, e, c, num_tokens, dim, vocab, needs_e, needs_c, rows, cols):
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
    ``launch(v_begin, v_count, dz)`` and its filtered GEMMs (or None: cuBLAS; ``_Window``). The views
    of each chunk are made once per call, not per iteration (host time; see ``_Window``). Windows of
    ``rows`` tokens, chunks of ``cols`` vocabulary entries (``buffered_window``). Returns (dE or None, dC or None) in the input dtype."""
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

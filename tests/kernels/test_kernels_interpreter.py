"""The Triton kernels under the Triton interpreter (CPU tensors, TRITON_INTERPRET=1, set by conftest).

Small odd shapes (D = 20 or 45, V = 101 prime, N = 37 or 1) against the float64 definition; the
interpreter's tiles are 16 x 16 x 16 (kernels/common.py), so every dimension spans several tiles
with a masked edge. Launcher-level tests cover what the op does not reach: the dC windows, vocab
orderings, strided rows, out-of-range targets, gradient subsets and the filter's bound. The
interpreter runs a kernel program by program in Python, so each test takes the fewest tiles, windows
and chunks that reach its path, and a parametrization lists the cases that reach different code
rather than every combination.
"""

import dataclasses
import math
import os
from unittest import mock

import pytest
import torch

from cce_inductor import reference
from kernel_cases import CASES, check_case

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs under the Triton interpreter"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy warnings of masked lanes
]

kernels = pytest.importorskip("cce_inductor.kernels")
if not kernels.AVAILABLE:  # pragma: no cover
    pytest.skip("triton is not installed", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from cce_inductor.kernels import lce_backward, lce_forward  # noqa: E402
from cce_inductor.kernels import backward, backward_buffered, backward_filtered_dc, backward_filtered_de  # noqa: E402
from cce_inductor.kernels import common, forward  # noqa: E402
from cce_inductor.kernels.backward_shared import (  # noqa: E402
    _balanced_position, _items_by_work, _kept_tile, _kept_tile_lists, epilogue_descriptor,
)
from cce_inductor.kernels.forward import vocab_splits  # noqa: E402


# Op-level cases at D = 20 (two steps of the 16-wide tiles, the last ragged) rather than kernel_cases'
# D = 45, whose third step adds time but no path; N = 37 and V = 101 keep a partial group of token tiles
# and the forward's splits of two vocab tiles (the last of one).
INTERPRETER_CASES = [dataclasses.replace(c, d=20) for c in CASES]


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: c.name)
def test_float32_matches_float64(case):
    check_case(case, torch.float32, "cpu")


# Both 16-bit dtypes on the plain loss, and the cases with the most options in one each (the dtypes run
# the same code).
LOW_PRECISION_CASES = [(c, dtype) for name, dtype in (("plain", torch.bfloat16), ("plain", torch.float16),
                                                      ("everything", torch.bfloat16),
                                                      ("ignore_is_a_class", torch.float16))
                       for c in INTERPRETER_CASES if c.name == name]


@pytest.mark.parametrize("case, dtype", LOW_PRECISION_CASES,
                         ids=[f"{c.name}-{str(dtype)[6:]}" for c, dtype in LOW_PRECISION_CASES])
def test_low_precision_no_worse_than_torch(case, dtype):
    check_case(case, dtype, "cpu")


# ----------------------------------------------------------------------------- launcher level


def _inputs(n=37, d=45, v=101, dtype=torch.float32, scale=1.0, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    e = (torch.randn(n, d, generator=g) * scale).to(dtype)
    c = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    return e, c, b, y


def _reference_grads(e, c, b, y, lse, gl, gs, ignore_index=-100, softcap=0.0, ls=0.0):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.chunked_backward(f64(e), f64(c), f64(b), y, lse.double(), gl.double(), gs.double(),
                                      ignore_index, softcap, ls, True, True, b is not None)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _float64_lse(e, c, b=None, softcap=0.0):
    """The log-sum-exp of the (capped) logits e @ c^T (+ b) in float64, as float32: the lse a backward
    takes, without the interpreter running the forward kernel (which the op-level cases test)."""
    z = e.double() @ c.double().T + (0.0 if b is None else b.double())
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return torch.logsumexp(z, 1).float()


def test_dc_windows_and_vocab_order():
    """16-bit dC goes through float32 windows of the vocabulary; several windows, in the identity order
    and in an explicit permutation, give the same gradients as one window in the identity order."""
    e, c, b, y = _inputs(d=20, dtype=torch.bfloat16, bias=True)
    lse = _float64_lse(e, c, b)
    gl, gs = torch.rand(37), torch.rand(37)
    args = (e, c, b, y, lse, gl, gs, -100, 0.0, 0.0, False, True, True, True)
    one = lce_backward(*args, buffered=False)
    gold = _reference_grads(e, c, b, y, lse, gl, gs)
    for order in (False, torch.randperm(101, generator=torch.Generator().manual_seed(3))):
        several = lce_backward(*args, window_bytes=4 * 20 * 32, vocab_order=order, buffered=False)  # 32-row windows
        for a, b_ in zip(several, one):
            assert _rel(a, b_) < 4e-3  # float32 sums in another order, rounded to bfloat16
        for a, g in zip(several, gold):
            assert _rel(a, g) < 1e-2


@pytest.mark.parametrize("filter_grad", [False, True], ids=["exact", "filtered"])
def test_de_token_windows_match_one_pass(filter_grad):
    """When a float32 (N, D) dE buffer would pass window_bytes, 16-bit dE is formed in a second pass
    over windows of tokens (bounded memory); it equals the one-pass result."""
    e, c, b, y = _inputs(d=20, dtype=torch.bfloat16, bias=True)
    lse = _float64_lse(e, c, b)
    gl, gs = torch.rand(37), torch.rand(37)
    args = (e, c, b, y, lse, gl, gs, -100, 0.0, 0.0, filter_grad, True, True, True)
    one = lce_backward(*args, buffered=False)
    counts = torch.zeros(2, dtype=torch.int32)
    split = lce_backward(*args, window_bytes=4 * 20 * 16, tile_counts=counts, buffered=False)  # 16-token windows
    assert int(counts.sum()) == 3 * 7  # every (token tile, vocab tile) block counted once
    for a, b_ in zip(split, one):
        assert _rel(a, b_) < 4e-3  # float32 sums in another order, rounded to bfloat16


SOFTCAP_SMOOTHING = dict(softcap=3.0, label_smoothing=0.1)
# (gradients needed, loss options, chunk room): every value of each with every value of the others
BUFFERED_CASES = {
    "all-plain-chunks_of_32": ((True, True, True), {}, 32),
    "all-softcap_smoothing-widened_to_48": ((True, True, True), SOFTCAP_SMOOTHING, 48),
    "e_only-softcap_smoothing-chunks_of_32": ((True, False, False), SOFTCAP_SMOOTHING, 32),
    "c_only-plain-widened_to_48": ((False, True, False), {}, 48),
}


@pytest.mark.parametrize("needs, options, chunk_room", BUFFERED_CASES.values(), ids=BUFFERED_CASES.keys())
def test_buffered_windows_and_chunks(needs, options, chunk_room):
    """The buffered path (exact 16-bit gradients through a dz buffer and GEMMs): several token
    windows and vocabulary chunks, with ragged edges, against the float64 gradients of the same
    inputs and lse, and against the atomic path. CHUNK_V = 32 and a budget of 16 tokens: 3 windows
    (16, 16, 5 tokens) x 4 chunks (32, 32, 32, 5 entries); or, with room for 48 columns, the exact
    path's chunks widened to 48 (3 vocab tiles of 16 per launch, one wave on the interpreter's 4
    "SMs": 3 launches per window against 4 at 32): 3 chunks (48, 48, 5 entries)."""
    softcap, ls = options.get("softcap", 0.0), options.get("label_smoothing", 0.0)
    e, c, b, y = _inputs(d=20, dtype=torch.bfloat16, bias=True, scale=2.0)
    y[3] = -100
    lse = _float64_lse(e, c, b, softcap)
    gl, gs = torch.rand(37), torch.rand(37)
    args = (e, c, b, y, lse, gl, gs, -100, softcap, ls, False, *needs)
    budget = 2 * 16 * chunk_room + 4 * 16 * 20
    with mock.patch.object(backward_buffered, "CHUNK_V", 32):
        assert backward_buffered.buffered_window(e, 101, budget) == (16, chunk_room)
        grads = lce_backward(*args, buffered=True, buffer_bytes=budget)
    atomic = lce_backward(*args, buffered=False)
    gold = _reference_grads(e, c, b, y, lse, gl, gs, softcap=softcap, ls=ls)
    for got, other, want, needed in zip(grads, atomic, gold, needs):
        if not needed:
            assert got is None
            continue
        assert got.dtype == torch.bfloat16
        # dz is rounded to bfloat16 before the GEMMs (as in the atomic path and in torch's bf16
        # backward); dC's running sum is rounded once per window
        assert _rel(got, want) < 1e-2
        assert _rel(got, other) < 1e-2


def test_tma_and_pointer_loads_agree():
    """16-bit rows of a length that TMA can address (D = 40: 16-byte aligned rows, a ragged last
    D step of the 16-wide tiles) go through TMA descriptors in the forward and in the buffered
    backward's dz kernel -- the path an H100 runs; pointer loads (tma=False) are the fallback.
    Both against float64, with bias, softcap, smoothing and an ignored token, over several windows,
    chunks (one narrower than a tile, stored through the padded buffer) and partial tiles. bf16 here;
    float16 runs the same code (its TMA loads: the filtered tests below)."""
    dtype = torch.bfloat16
    e, c, b, y = _inputs(n=37, d=40, v=101, dtype=dtype, bias=True, scale=2.0)
    y[5] = -100
    cfg = common.forward_config(e)
    assert cfg.tma and common.tma_descriptor(e, [16, 16], cfg) is not None
    assert common.tma_descriptor(torch.zeros(37, 45, dtype=dtype), [16, 16], cfg) is None  # 90-byte rows: pointers
    softcap, ls = 3.0, 0.1
    gl, gs = torch.rand(37), torch.rand(37)
    results = {}
    for tma in (True, False):
        with mock.patch.object(common, "_INTERPRETER", dataclasses.replace(common._INTERPRETER, tma=tma)), \
                mock.patch.object(backward_buffered, "CHUNK_V", 40):
            loss, lse = lce_forward(e, c, b, y, -100, softcap, ls)
            grads = lce_backward(e, c, b, y, lse, gl, gs, -100, softcap, ls, False, True, True, True,
                                 buffered=True, buffer_bytes=2 * 16 * 40 + 4 * 16 * 40)
        results[tma] = (loss, lse, *grads)
    gold_loss, gold_lse = reference.chunked_forward(e.double(), c.double(), b.double(), y, -100, softcap, ls)
    gold = _reference_grads(e, c, b, y, results[True][1], gl, gs, softcap=softcap, ls=ls)
    for tma, (loss, lse, de, dc, db) in results.items():
        assert torch.allclose(loss.double(), gold_loss.double(), rtol=1e-5, atol=1e-5), tma
        assert torch.allclose(lse.double(), gold_lse.double(), rtol=1e-5, atol=1e-5), tma
        for got, want in zip((de, dc, db), gold):
            assert _rel(got, want) < 1e-2, tma  # dz rounded to 16 bits before the GEMMs, as torch's
    for got, other in zip(results[True], results[False]):
        assert _rel(got, other) < 1e-2


@triton.jit
def _kept_tiles_kernel(Keep, Out, count, KEEP_WIDTH: tl.constexpr):
    """Out[j] = the j-th kept tile of the row Keep[:count], through the filtered dE GEMM's lists."""
    slots = tl.arange(0, KEEP_WIDTH)
    keep = tl.load(Keep + slots, mask=slots < count, other=0) != 0
    w0, w1, w2, w3, p1, p2, p3 = _kept_tile_lists(keep, KEEP_WIDTH)
    for j in range(tl.sum(keep.to(tl.int32), axis=0)):
        tl.store(Out + j, _kept_tile(j, w0, w1, w2, w3, p1, p2, p3))


@pytest.mark.parametrize("pattern", ["all_64", "none", "first_and_last", "empty_middle_groups", "random_40",
                                     "every_third_of_20"])
def test_kept_tile_lists_give_the_kept_tiles_in_order(pattern):
    """The filtered dE GEMM's lists of kept vocab tiles (four 4-bit lists of 16, _kept_tile_lists) give
    the j-th kept tile for every j: all 64 kept (each word's sign bit set), none, groups with nothing
    kept between kept ones, random rows, and a row shorter than the lists (KEEP_WIDTH 32)."""
    count = {"random_40": 40, "every_third_of_20": 20}.get(pattern, 64)
    gen = torch.Generator().manual_seed(3)
    keep = {
        "all_64": torch.ones(64), "none": torch.zeros(64),
        "first_and_last": torch.tensor([1] + [0] * 62 + [1]),
        "empty_middle_groups": torch.tensor([0] * 15 + [1] + [0] * 32 + [1] * 3 + [0] * 13),
        "random_40": (torch.rand(40, generator=gen) < 0.5).float(),
        "every_third_of_20": (torch.arange(20) % 3 == 0).float(),
    }[pattern].to(torch.int8)
    want = torch.nonzero(keep).flatten().to(torch.int32)
    out = torch.full((64,), -1, dtype=torch.int32)
    width = max(16, 1 << (count - 1).bit_length())
    _kept_tiles_kernel[(1,)](keep, out, count, KEEP_WIDTH=width)
    assert out[: len(want)].tolist() == want.tolist() and (out[len(want):] == -1).all()


@triton.jit
def _schedule_kernel(Keep, Out, num_items, num_flags, tiles_per_item, num_tiles, ITEMS: tl.constexpr,
                     FLAGS: tl.constexpr):
    keys = _items_by_work(Keep, num_items, num_flags, num_flags, 1, ITEMS, FLAGS)
    pid = tl.program_id(0)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        item, within = _balanced_position(tile, num_tiles, tl.num_programs(0), tiles_per_item, keys, ITEMS)
        tl.store(Out + 2 * tile, item)
        tl.store(Out + 2 * tile + 1, within)


@pytest.mark.parametrize("items, programs", [(5, 4), (13, 6), (16, 7)])
def test_balanced_schedule_takes_each_tile_once_longest_first(items, programs):
    """The filtered GEMMs' schedule in order of work (_items_by_work, _balanced_position) for random
    keep rows, 3 tiles per item: every (item, tile) once; the first wave takes the longest items'
    tiles (descending kept count, ties by index); and the longest program's work is never above
    what index order gives it (tile = pid, pid + programs, ...) -- below it here."""
    gen = torch.Generator().manual_seed(items)
    flags, per_item = 40, 3
    keep = (torch.rand(items, flags, generator=gen) < torch.rand(items, 1, generator=gen)).to(torch.int8)
    tiles = items * per_item
    out = torch.full((tiles, 2), -1, dtype=torch.int32)
    _schedule_kernel[(programs,)](keep, out, items, flags, per_item, tiles, ITEMS=triton.next_power_of_2(items),
                                  FLAGS=64)
    assert sorted(map(tuple, out.tolist())) == [(i, j) for i in range(items) for j in range(per_item)]
    counts = keep.sum(1).tolist()
    order = sorted(range(items), key=lambda i: (-counts[i], i))
    assert [i for i, _ in out[:programs].tolist()] == [order[r // per_item] for r in range(programs)]

    def longest(item_of_tile):
        return max(sum(counts[item_of_tile(t)] for t in range(p, tiles, programs)) for p in range(programs))

    assert longest(lambda t: out[t, 0].item()) < longest(lambda t: t // per_item)


@pytest.mark.parametrize("n, d, v, chunk", [(40, 45, 160, 48), (20, 16, 1068, 4096)],
                         ids=["chunks_of_3_tiles", "chunks_of_64_tiles"])
def test_filtered_buffered_path_drops_what_the_atomic_filter_drops(n, d, v, chunk):
    """Filtering in the buffered path: the dz kernel flags each tile by the filter's rule and the
    filtered dE GEMM runs over the kept tiles only. Peaked softmax, a bias, an ignored token,
    windows of 16 tokens (3 over 40 tokens; 2 over 20 for the widest chunks) x ragged chunks of the
    vocabulary (4 of 48 entries; or 1024 + 44, the first holding MAX_CHUNK_TILES = 64 tiles, so that
    all four lists of kept tiles are in use): the same tiles are skipped as by the atomic kernel (the interpreter's
    tiles are the same for both), the dropped part of dE (filtered - exact) is the same, and dC
    (dc_filter="exact") and dbias are not filtered (test_corrected_dc_filter_matches_the_reference
    covers the filtered dC). float32 inputs forced through the buffered path, so that both paths
    agree to float32 rounding -- both with the masked dz epilogue, which the atomic kernel always
    runs: the lean one's exp2 of z log2(e) - lse log2(e) rounds at ~|lse| * 2^-24, and at these
    logits (|lse| up to ~120) that alone moves dE by 1.4e-5, 1e-3 of the dropped part
    (test_lean_dz_epilogue_matches_the_masked_one covers the lean one). All three gradients: the
    filtered dE alone runs in test_listed_backward_matches_the_dropped_reference ("flagged")."""
    needs = (True, True, True)
    e, c, b, y = _inputs(n=n, d=d, v=v, scale=30.0, bias=True)
    y = (e @ c.T + b).argmax(1)
    y[3] = -100
    lse = _float64_lse(e, c, b)
    gen = torch.Generator().manual_seed(5)
    gl, gs = torch.rand(n, generator=gen), torch.rand(n, generator=gen) * 0.1
    args = (e, c, b, y, lse, gl, gs, -100, 0.0, 0.0)
    counts = {path: torch.zeros(2, dtype=torch.int32) for path in ("buffered", "atomic")}
    budget = 4 * 16 * (min(chunk, 64 * 16) + d)  # windows of 16 tokens
    with mock.patch.object(backward_buffered, "CHUNK_V", chunk), \
            mock.patch.object(backward_buffered, "LEAN_DZ_EPILOGUE", False):
        buffered = lce_backward(*args, True, *needs, buffered=True, buffer_bytes=budget, tile_counts=counts["buffered"],
                                dc_filter="exact")
        exact = lce_backward(*args, False, *needs, buffered=True, buffer_bytes=budget)
    atomic = lce_backward(*args, True, *needs, buffered=False, tile_counts=counts["atomic"])
    assert counts["buffered"].tolist() == counts["atomic"].tolist()
    assert sum(counts["buffered"].tolist()) == -(-n // 16) * -(-v // 16) and counts["buffered"][1] > 0
    dropped = buffered[0] - exact[0]
    assert dropped.norm() > 0 and _rel(dropped, atomic[0] - exact[0]) < 1e-4
    for got, want in zip(buffered[1:], exact[1:]):  # dC, dbias: exact
        assert (got is None) == (want is None)
        if got is not None:
            assert _rel(got, want) < 1e-5


_DC_GEMM_SPLIT = dict(block_n=8, block_v=8)  # dC GEMM tiles: 2 K steps per token tile, 2 row blocks per vocab tile


def _dc_gemm_config(dc_tiles):
    """The interpreter's tiles for the filtered dC GEMM: the dz kernel's ("dz_tiles") or split in both
    directions ("split")."""
    return common._INTERPRETER if dc_tiles == "dz_tiles" else dataclasses.replace(common._INTERPRETER,
                                                                                **_DC_GEMM_SPLIT)


def _peaked_filter_case(dtype, d, n=40, v=160):
    """n tokens x v vocabulary entries with a bias, a peaked softmax (logits of std ~30, targets at
    each token's argmax), one ignored token and seeded upstream gradients: the lce_backward arguments
    up to filter_grad, and the budget that gives windows of 16 tokens and chunks of 48 (with CHUNK_V
    patched to 48): 40 x 160 in 3 windows (the last of 8 tokens) x 4 chunks (the last of 16 entries);
    20 x 100 in 2 windows (the last of 4 tokens) x 3 chunks (the last of 4 entries, narrower than a
    tile)."""
    e, c, b, y = _inputs(n=n, d=d, v=v, scale=30.0, bias=True, dtype=dtype)
    y = (e.float() @ c.float().T + b.float()).argmax(1)
    y[3] = -100
    lse = _float64_lse(e, c, b)
    gen = torch.Generator().manual_seed(5)
    gl, gs = torch.rand(n, generator=gen), torch.rand(n, generator=gen) * 0.1
    return (e, c, b, y, lse, gl, gs, -100, 0.0, 0.0), e.element_size() * 16 * 48 + 4 * 16 * d


@pytest.mark.parametrize("dtype, dc_tiles", [(torch.float32, "split"), (torch.float16, "dz_tiles")],
                         ids=["float32_pointers-split", "fp16_tma-dz_tiles"])
def test_corrected_dc_filter_matches_the_reference(dtype, dc_tiles):
    """The buffered path's filtered dC (dc_filter="corrected"; not the default) against
    reference.filtered_backward: the dz kernel flags tiles and writes a skipped tile's column sums
    (and leaves its dz unstored), the dC GEMM runs over the kept token tiles of each vocab tile and adds
    colsum^T @ (mean of the tile's rows of E) for the skipped ones. Peaked softmax, a bias, an
    ignored token, 40 tokens (a partial last token tile: its mean is over its 8 rows) in 3 windows x
    ragged chunks; "split": the dC GEMM's tiles half the dz kernel's in both directions (the other
    two pairings of loads and tiles: test_filtered_gemms_in_order_of_work_match_float64). The same
    tiles are skipped as by the reference. float32 (pointer loads, masked dz epilogue): what filtering
    changes (filtered - exact kernel) is what it changes in float64 (filtered - exact reference), to
    1e-4 of it -- the kernels' float32 logits alone put the exact gradients ~6e-5 off float64 at these
    logits (std 30), which a direct comparison would mostly measure (this shape holds the two apart:
    on fewer tokens and entries the dropped part shrinks towards that noise). float16 (D = 48: TMA
    loads of E and dz; the lean epilogue): the filtered gradients within 1.5x (the accuracy bar's
    factor) of the exact kernel's distance from float64, from the float64 filtered ones (a missing
    stand-in would be ~3x off here). Not bf16: the interpreter's float32 -> bf16 casts truncate (the
    GPU's round to nearest), which would put the Triton-written dC ~1.5x further off than the exact
    path's torch GEMM."""
    args, budget = _peaked_filter_case(dtype, 45 if dtype == torch.float32 else 48)
    e, c, b, y, lse, gl, gs = args[:7]
    counts = torch.zeros(2, dtype=torch.int32)
    dc_cfg = _dc_gemm_config(dc_tiles)
    lean = dtype != torch.float32
    with mock.patch.object(backward_buffered, "CHUNK_V", 48), \
            mock.patch.object(backward_buffered, "LEAN_DZ_EPILOGUE", lean), \
            mock.patch.object(backward_buffered, "filtered_dc_config", lambda e: dc_cfg):
        assert backward_buffered.buffered_window(e, c.shape[0], budget, True, True) == (16, 48)
        assert (common.tma_descriptor(e, [16, 16], dc_cfg) is None) == (dtype == torch.float32)
        filtered = lce_backward(*args, True, True, True, True, buffered=True, buffer_bytes=budget, tile_counts=counts,
                                dc_filter="corrected")
        exact = lce_backward(*args, False, True, True, True, buffered=True, buffer_bytes=budget)

    def reference_grads(eps, dc_filter):
        f64 = lambda t: t.double()  # noqa: E731
        return reference.filtered_backward(f64(e), f64(c), f64(b), y, lse.double(), gl.double(), gs.double(), -100,
                                           0.0, 0.0, eps, 16, 16, dc_filter)

    want, want_exact = reference_grads(kernels.FILTER_EPS, "corrected"), reference_grads(0.0, "exact")
    keep = want[3]
    assert counts.tolist() == [int(keep.sum()), int((~keep).sum())] and 0 < counts[1] < keep.numel()
    for got, got_exact, ref, ref_exact in zip(filtered[:2], exact[:2], want[:2], want_exact[:2]):
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert _rel(got - got_exact, ref - ref_exact) < 1e-4
        else:
            assert _rel(got, ref) <= 1.5 * _rel(got_exact, ref_exact)  # the accuracy bar's factor
    assert _rel(filtered[2], exact[2]) < 1e-6  # dbias: never filtered

def _peaked_plain_loss_case(dtype, d, v=150):
    """40 tokens x v entries (150: a partial last vocab tile), no bias, a peaked softmax, targets at
    each token's argmax except one ignored token and two with an unlikely target (token 7: id 5;
    token 30: the last id), and the plain loss's upstream gradients (grad_lse = 0; grad_loss
    positive, differing per token: the forward's flags do not depend on it)."""
    n = 40
    e, c, _, _ = _inputs(n=n, d=d, v=v, scale=30.0, bias=False, dtype=dtype)
    y = (e.float() @ c.float().T).argmax(1)
    y[3], y[7], y[30] = -100, 5, v - 1
    gen = torch.Generator().manual_seed(5)
    return e, c, y, 0.5 + torch.rand(n, generator=gen), torch.zeros(n)


@pytest.mark.parametrize("windows", [1, 3])
def test_forward_keep_flags_are_the_backward_rule(windows):
    """lce_forward_with_keep: loss and lse bit-equal to lce_forward's, and keep flags equal to
    reference.filtered_backward's (the backward's rule in float64 for the plain loss) on a peaked
    softmax with partial token and vocab tiles, an ignored token and unlikely targets; in one window of
    tokens or in three (TILE_LSE_BYTES patched down to one token tile's scratch)."""
    # D = 45: here the three windows' vocab splits sum each token's lse to the same bits as one window's
    e, c, y, gl, gs = _peaked_plain_loss_case(torch.float32, 45)
    v_tiles = -(-c.shape[0] // 16)
    budget = forward.TILE_LSE_BYTES if windows == 1 else 4 * 16 * v_tiles
    with mock.patch.object(forward, "TILE_LSE_BYTES", budget):
        loss, lse, keep = forward.lce_forward_with_keep(e, c, None, y, -100, kernels.FILTER_EPS)
    want_loss, want_lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    assert torch.equal(loss, want_loss) and torch.equal(lse, want_lse)
    f64 = lambda t: t.double()  # noqa: E731
    *_, want = reference.filtered_backward(f64(e), f64(c), None, y, f64(lse), f64(gl), f64(gs), -100, 0.0, 0.0,
                                           kernels.FILTER_EPS, 16, 16, "dropped")
    assert keep.dtype == torch.int8 and keep.shape == want.shape == (3, v_tiles)
    assert torch.equal(keep.bool(), want) and 0 < int(keep.sum()) < keep.numel()
    assert keep[0, 5 // 16] and keep[30 // 16, -1]  # the unlikely targets' tiles
    assert not keep[3 // 16].all()  # the ignored token keeps nothing by itself


@pytest.mark.parametrize("dtype, list_block", [(torch.float32, 2), (torch.float16, 1024)],
                         ids=["float32_pointers-steps_of_2", "fp16_tma-one_step"])
def test_listed_backward_matches_the_dropped_reference(dtype, list_block):
    """The backward with the forward's keep flags (lce_backward(keep=...)): the dz kernel recomputes
    only the listed tiles, the filtered dE and dC GEMMs (no stand-ins) run over them, in 3 windows x
    ragged chunks (40 tokens, 100 entries in chunks of 48, the last of 4). Against
    reference.filtered_backward with dc_filter="dropped" in float64: the same tiles skipped, and both
    gradients within 1.5x (the accuracy bar's factor) of the exact kernel's distance from float64.
    float32 (pointer loads, the masked epilogue): what filtering changes (listed - exact kernel) is
    what the atomic kernel's dc_filter="dropped" changes, to 1e-4 of it (against float64 it is further
    off here: the float32 logits put the exact kernel off float64, and the dropped part is a small
    share of the gradients). float16: TMA loads and the lean epilogue. dE is the dz-kernel-flagged
    filtered path's, bit for bit (the same kept tiles, the same GEMM). "steps_of_2": the tile lists
    formed two tiles a step (LIST_BLOCK patched), as a GPU launch of more than 1024 tiles is;
    "one_step": in one step."""
    d = 20 if dtype == torch.float32 else 24
    e, c, y, gl, gs = _peaked_plain_loss_case(dtype, d, v=100)
    _, lse, keep = forward.lce_forward_with_keep(e, c, None, y, -100, kernels.FILTER_EPS)
    args = (e, c, None, y, lse, gl, gs, -100, 0.0, 0.0)
    budget = e.element_size() * 16 * 48 + 4 * 16 * d
    counts = torch.zeros(2, dtype=torch.int32)
    with mock.patch.object(backward_buffered, "CHUNK_V", 48), \
            mock.patch.object(backward_buffered, "LEAN_DZ_EPILOGUE", dtype != torch.float32), \
            mock.patch.object(backward_buffered, "LIST_BLOCK", list_block):
        assert backward_buffered.buffered_window(e, c.shape[0], budget, True, True) == (16, 48)
        listed = lce_backward(*args, True, True, True, False, buffered=True, buffer_bytes=budget, keep=keep,
                              tile_counts=counts)
        flagged = lce_backward(*args, True, True, False, False, buffered=True, buffer_bytes=budget)
        exact = lce_backward(*args, False, True, True, False, buffered=True, buffer_bytes=budget)
        if dtype == torch.float32:
            atomic = lce_backward(*args, True, True, True, False, buffered=False, dc_filter="dropped")
    f64 = lambda t: t.double()  # noqa: E731
    ref = [reference.filtered_backward(f64(e), f64(c), None, y, f64(lse), f64(gl), f64(gs), -100, 0.0, 0.0, eps, 16,
                                       16, dc_filter)
           for eps, dc_filter in ((kernels.FILTER_EPS, "dropped"), (0.0, "exact"))]
    assert counts.tolist() == [int(keep.sum()), int((keep == 0).sum())] and 0 < counts[1] < keep.numel()
    assert torch.equal(keep.bool(), ref[0][3])
    assert torch.equal(listed[0], flagged[0])
    for i, (got, got_exact, want, want_exact) in enumerate(zip(listed[:2], exact[:2], ref[0][:2], ref[1][:2])):
        assert got.dtype == dtype
        assert _rel(got, want) <= 1.5 * _rel(got_exact, want_exact)
        if dtype == torch.float32:
            assert _rel(got - got_exact, atomic[i] - got_exact) < 1e-4


def test_listed_backward_refuses_what_it_cannot_do():
    """keep flags need filter_grad, no dbias, no vocab order, dc_filter None or "dropped", the
    buffered path, and int8 flags of the dz kernel's tiles (each refused before any kernel runs)."""
    e, c, y, gl, gs = _peaked_plain_loss_case(torch.float32, 20)
    lse = torch.zeros(len(y))
    keep = torch.ones(3, 10, dtype=torch.int8)
    b = torch.zeros(c.shape[0])
    base = (e, c, None, y, lse, gl, gs, -100, 0.0, 0.0)
    with_bias = (e, c, b, y, lse, gl, gs, -100, 0.0, 0.0)
    for args, filter_grad, options in ((base, False, {}), (with_bias, True, {}),
                                       (base, True, {"dc_filter": "corrected"}), (base, True, {"vocab_order": True}),
                                       (base, True, {"buffered": False}), (base, True, {"keep": keep[:, :9]}),
                                       (base, True, {"keep": keep.int()})):
        options = {"keep": keep, "buffered": True, **options}
        with pytest.raises(ValueError, match="keep"):
            lce_backward(*args, filter_grad, True, True, True, **options)


@pytest.mark.parametrize("dc_tiles, parts", [("dz_tiles", 1), ("split", 2), ("dz_tiles", 4)])
def test_filtered_gemm_epilogues_through_descriptors_agree(dc_tiles, parts):
    """The filtered GEMMs' epilogues through TMA descriptors (dE's float32 and dC's 16-bit
    read-modify-write, in one, two or four column blocks) give the pointer epilogues' gradients bit for
    bit: the same float32 sums, only the loads and stores change (``_peaked_filter_case`` in fp16, D =
    40: TMA loads; 2 windows, so dC accumulates; ragged chunks and partial last token and D tiles,
    which the descriptors clip). A window's 3 dE tiles on the interpreter's 4 "SMs" leave no last
    wave to split, so dE's epilogue goes through its descriptor (a split wave's pieces are added by
    pointer atomics off the GPU). In four parts dC's epilogue goes through pointers, so its tiles are
    the dz kernel's there."""
    args, budget = _peaked_filter_case(torch.float16, 40, n=20, v=100)
    e = args[0]
    args = args + (True, True, True, True)
    dc_cfg = _dc_gemm_config(dc_tiles)
    # four parts of 16 columns: dE's float32 blocks are TMA's 16-byte minimum, dC's 16-bit ones under it
    # (its epilogue then goes through pointers)
    assert epilogue_descriptor(e.float(), dc_cfg, 16, parts) is not None
    assert (epilogue_descriptor(e, dc_cfg, 16, parts) is None) == (parts == 4)
    assert epilogue_descriptor(e, dc_cfg, 16, 0) is None

    def grads(de_parts, dc_parts):
        with mock.patch.object(backward_buffered, "CHUNK_V", 48), \
                mock.patch.object(backward_buffered, "filtered_dc_config", lambda e: dc_cfg), \
                mock.patch.object(backward_filtered_de, "FILTERED_DE_EPILOGUE_PARTS", de_parts), \
                mock.patch.object(backward_filtered_dc, "FILTERED_DC_EPILOGUE_PARTS", dc_parts):
            return lce_backward(*args, buffered=True, buffer_bytes=budget, dc_filter="corrected")

    for got, want in zip(grads(parts, parts), grads(0, 0)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dc_tiles, loads", [("dz_tiles", "pointers"), ("split", "tma")])
def test_filtered_gemms_in_order_of_work_match_float64(dc_tiles, loads):
    """The filtered GEMMs called directly, their output tiles walked in order of work
    (``_balanced_position``: descending kept count, snake order over the programs) and in index
    order, against float64 sums over the kept tiles: 72 tokens (5 token tiles, the last partial) x
    100 vocabulary entries (7 vocab tiles, the last partial) x D = 40 (3 D tiles), keep counts that
    differ between token tiles and between vocab tiles (one row and one column all skipped, one row
    all kept), 4 programs (several waves, a partial last one). A tile taken twice or never is off by
    a whole tile's product; both orders give the same float32 sums, bit for bit. "split": the dC
    GEMM's row blocks half a vocab tile (the last tile's second block past the chunk: clipped by the
    descriptors). (The other two pairings of loads and tiles run in
    test_corrected_dc_filter_matches_the_reference.)"""
    n, d, v, tile = 72, 40, 100, 16
    tiles_n, tiles_v = -(-n // tile), -(-v // tile)
    gen = torch.Generator().manual_seed(3)
    dz = (torch.randn(n, backward_buffered.buffer_row_stride(v), generator=gen) * 0.1).half()[:, :v]  # as the buffer's
    e = torch.randn(n, d, generator=gen).half()
    c = torch.randn(v + 9, d, generator=gen).half()  # the chunk starts at row 9 of C
    keep = (torch.rand(tiles_n, tiles_v, generator=gen) < torch.linspace(0.2, 0.9, tiles_n)[:, None]).to(torch.int8)
    keep[1], keep[3], keep[:, 5] = 0, 1, 0
    col_sums = torch.randn(tiles_n, v, generator=gen) * (keep == 0).repeat_interleave(tile, 1)[:, :v]
    means = backward_filtered_dc._tile_means(e, tile)
    dc_old = torch.randn(v, d, generator=gen).half()
    cfg, dc_cfg = common._INTERPRETER, _dc_gemm_config(dc_tiles)
    if loads == "pointers":
        descs = {}
    else:
        descs = dict(dz_de=common.tma_descriptor(dz, [cfg.block_n, cfg.block_v], cfg),
                     c_de=common.tma_descriptor(c, [cfg.block_v, cfg.block_d], cfg),
                     dz_dc=common.tma_descriptor(dz, [dc_cfg.block_n, dc_cfg.block_v], dc_cfg),
                     e_dc=common.tma_descriptor(e, [dc_cfg.block_n, dc_cfg.block_d], dc_cfg))
        assert None not in descs.values()
    mask = keep.bool().repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:n, :v]
    dz_kept = torch.where(mask, dz.double(), 0.0)
    de_want = 1.0 + dz_kept @ c[9:].double()
    dc_want = dc_old.double() + dz_kept.T @ e.double() + col_sums.half().double().T @ means.half().double()
    results = []
    for balanced in (True, False):
        acc = torch.ones(n, d)
        acc_desc = epilogue_descriptor(acc, cfg, cfg.block_n, 2) if descs else None
        backward_filtered_de.filtered_de_gemm(acc, dz, c, keep.view(-1), 9, cfg, tile, 4, dz_desc=descs.get("dz_de"),
                                              c_desc=descs.get("c_de"), acc_desc=acc_desc, balanced=balanced,
                                              split_last_wave=False)
        dc = dc_old.clone()
        dc_desc = epilogue_descriptor(dc, dc_cfg, dc_cfg.block_v, 1) if descs else None
        backward_filtered_dc.filtered_dc_gemm(dc, dz, e, keep.view(-1), col_sums, means, True, dc_cfg, tile, tile, 4,
                                              dz_desc=descs.get("dz_dc"), e_desc=descs.get("e_dc"), dc_desc=dc_desc,
                                              balanced=balanced)
        assert _rel(acc, de_want) < 1e-6
        assert _rel(dc, dc_want) < 1e-3  # dC rounds to fp16 once
        results.append((acc, dc))
    assert all(torch.equal(a, b) for a, b in zip(*results))


# (programs, in order of work, a row all skipped, loads): each program count in both orders, each
# order and loads with and without the empty row
LAST_WAVE_CASES = [(6, True, True, "tma"), (6, False, False, "pointers"), (7, True, False, "pointers"),
                   (7, False, True, "tma"), (32, True, True, "pointers"), (32, False, False, "tma"),
                   (4, True, False, "tma"), (4, False, True, "pointers")]


@pytest.mark.parametrize("programs, balanced, empty_row, loads", LAST_WAVE_CASES)
def test_filtered_de_last_wave_in_pieces_matches_float64(programs, balanced, empty_row, loads):
    """The filtered dE GEMM with its last partial wave of tiles cut into pieces along their kept K
    steps, against float64 sums over the kept tiles and against whole tiles: 72 tokens (5 token
    tiles, the last partial) x 100 entries (7 vocab tiles) x D = 40 (3 D tiles): 15 output tiles; on
    6 programs 12 whole and 3 tiles in 2 pieces, on 7 14 whole and 1 in 7 pieces (more pieces than
    the row has kept steps: empty pieces), on 32 none whole and 15 in 2 pieces, on 4 no split (3
    tiles left, 1 piece each). One row all kept (3), the others partly kept, and with empty_row one
    all skipped (1: the last wave in order of work is then its tiles); in order of work and in index
    order. A piece taken twice or dropped is off by its product; pieces summed in another order
    differ from whole tiles by rounding only."""
    n, d, v, tile = 72, 40, 100, 16
    tiles_n, tiles_v = -(-n // tile), -(-v // tile)
    gen = torch.Generator().manual_seed(5)
    dz = (torch.randn(n, backward_buffered.buffer_row_stride(v), generator=gen) * 0.1).bfloat16()[:, :v]
    c = torch.randn(v + 9, d, generator=gen).bfloat16()  # the chunk starts at row 9 of C
    keep = (torch.rand(tiles_n, tiles_v, generator=gen) < 0.6).to(torch.int8)
    keep[3] = 1
    keep[:, 0] = 1  # at least one kept step in each partly kept row
    if empty_row:
        keep[1] = 0
    cfg = common._INTERPRETER
    descs = {} if loads == "pointers" else dict(
        dz_desc=common.tma_descriptor(dz, [cfg.block_n, cfg.block_v], cfg),
        c_desc=common.tma_descriptor(c, [cfg.block_v, cfg.block_d], cfg))
    mask = keep.bool().repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:n, :v]
    de_want = 1.0 + torch.where(mask, dz.double(), 0.0) @ c[9:].double()
    results = {}
    for split in (True, False):
        acc = torch.ones(n, d)
        acc_desc = epilogue_descriptor(acc, cfg, cfg.block_n, 2) if descs else None
        backward_filtered_de.filtered_de_gemm(acc, dz, c, keep.view(-1), 9, cfg, tile, programs, balanced=balanced,
                                  split_last_wave=split, acc_desc=acc_desc, **descs)
        assert _rel(acc, de_want) < 1e-6, split
        results[split] = acc
    assert _rel(results[True], results[False]) < 1e-6


def test_split_last_wave_follows_torch_determinism_and_frees_the_windows():
    """The last wave in pieces (a run-dependent order of float32 sums) is off while torch's
    deterministic algorithms are on, and the filtered path's windows then count the dE GEMM's waves
    again; with it on they are the exact path's (where dC is not filtered). At the Gemma shape (132
    SMs): 1792 x 11776 against 2048 x 8448."""
    from cce_inductor.kernels.backward_buffered import BUFFER_BYTES, buffered_shape
    from cce_inductor.kernels.backward_filtered_de import split_last_wave_applies

    assert split_last_wave_applies()
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert not split_last_wave_applies()
    finally:
        torch.use_deterministic_algorithms(before)
    shape = (8192, 2304, 256000, 2, BUFFER_BYTES, 128, 256)
    exact = buffered_shape(*shape, sms=132, max_chunk_tiles=None)
    assert exact == (2048, 33 * 256)
    assert buffered_shape(*shape, sms=132, de_d_tiles=0) == exact
    assert buffered_shape(*shape, sms=132, de_d_tiles=9) == (1792, 46 * 256)
    # and buffered_window asks buffered_shape for exactly that: no dE waves while the split applies,
    # unless dC is filtered too (filter_dc: measured faster with the waves counted)
    e = torch.empty(100, 48, dtype=torch.bfloat16)
    asked = {}
    for deterministic in (False, True):
        for filtered_dc in (False, True):
            try:
                torch.use_deterministic_algorithms(deterministic, warn_only=True)
                shape = backward_buffered.buffered_shape
                with mock.patch.object(backward_buffered, "buffered_shape", wraps=shape) as spy:
                    backward_buffered.buffered_window(e, 1000, filtered=True, filtered_dc=filtered_dc)
                asked[deterministic, filtered_dc] = spy.call_args.kwargs["de_d_tiles"]
            finally:
                torch.use_deterministic_algorithms(before)
    assert asked == {(False, False): 0, (False, True): 3, (True, False): 3, (True, True): 3}  # D = 48: 3 tiles


def test_filtered_path_refuses_a_chunk_wider_than_its_lists():
    """The filtered dE GEMM lists at most MAX_CHUNK_TILES = 64 kept tiles per token tile; a chunk of 65
    (a patched shape: buffered_shape never makes one) is refused instead of dropping the 65th."""
    e, c, _, y = _inputs(n=16, d=8, v=65 * 16 + 7, dtype=torch.bfloat16)
    with mock.patch.object(backward_buffered, "buffered_window", lambda *args, **kwargs: (16, 65 * 16)), \
            pytest.raises(AssertionError, match="lists"):
        lce_backward(e, c, None, y, _float64_lse(e, c), torch.rand(16), torch.zeros(16), -100, 0.0, 0.0, True, True,
                     True, False)


def test_corrected_dc_filter_keeps_windows_within_its_lists():
    """The filtered dC GEMM lists at most MAX_WINDOW_TILES = 64 kept token tiles per vocab tile:
    buffered_shape holds windows to that where asked (8192 tokens, against more without at a small D
    and V), and a longer window (a patched shape; dC only, so that the dC GEMM is the first to see it)
    is refused instead of dropping the 65th tile."""
    shape, longest = backward_buffered.buffered_shape, backward_filtered_dc.MAX_WINDOW_TILES
    args = (65536, 64, 2048, 2, backward_buffered.BUFFER_BYTES, 128, 256, 132)
    assert shape(*args)[0] > 64 * 128
    assert shape(*args, max_window_tiles=longest)[0] <= 64 * 128
    assert shape(*args[:7], max_window_tiles=longest)[0] <= 64 * 128  # no sms
    n = 65 * 16
    e, c, _, y = _inputs(n=n, d=8, v=16, dtype=torch.bfloat16)
    with mock.patch.object(backward_buffered, "buffered_window", lambda *args, **kwargs: (n, 16)), \
            pytest.raises(AssertionError, match="lists"):
        lce_backward(e, c, None, y, _float64_lse(e, c), torch.rand(n), torch.zeros(n), -100, 0.0, 0.0, True, False,
                     True, False, dc_filter="corrected")

def test_bf16_filter_takes_the_buffered_path():
    """bf16 filtering goes through the buffered path by default (TMA descriptors in the interpreter,
    as on Hopper) and skips the tiles the atomic kernel skips; dC is exact in both by default, and
    corrected on request (the stand-ins move it by 2.0e-2 here, the kernel's bf16 dC is 6.6e-3 off the
    float64 corrected one). The upstream gradients come from the test's own generator: drawn from the
    global one they depended on the tests run before, and 1 draw in 40 moved dC by only 9e-3 (below
    the 1e-2 this test tells the two apart by)."""
    e, c, _, y = _inputs(n=40, v=160, dtype=torch.bfloat16, scale=30.0)
    y = (e.float() @ c.float().T).argmax(1)
    lse = _float64_lse(e, c)
    gl, gs = torch.rand(40, generator=torch.Generator().manual_seed(0)), torch.zeros(40)
    args = (e, c, None, y, lse, gl, gs, -100, 0.0, 0.0, True, True, True, False)
    counts = torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    with mock.patch.object(backward, "atomic_backward", side_effect=AssertionError("atomic path taken")):
        buffered = lce_backward(*args, tile_counts=counts[0])
    atomic = lce_backward(*args, buffered=False, tile_counts=counts[1])
    assert counts[0].tolist() == counts[1].tolist() and counts[0][1] > 0
    for got, want in zip(buffered[:2], atomic[:2]):
        assert got.dtype == torch.bfloat16 and _rel(got, want) < 1e-2
    corrected_dc = lce_backward(*args, dc_filter="corrected")[1]
    want = reference.filtered_backward(e.double(), c.double(), None, y, lse.double(), gl.double(), gs.double(),
                                       -100, 0.0, 0.0, kernels.FILTER_EPS, 16, 16, "corrected")[1]
    assert _rel(corrected_dc, want) < 1e-2 < _rel(atomic[1], want)
    with pytest.raises(ValueError, match="buffered path only"):
        lce_backward(*args, buffered=False, dc_filter="corrected")
    with pytest.raises(ValueError, match="dc_filter"):
        lce_backward(*args, dc_filter="approximate")


def test_buffered_path_refuses_a_filtered_dc_and_an_order():
    e, c, _, y = _inputs(dtype=torch.bfloat16)
    lse = torch.zeros(37)  # refused before any kernel runs
    gl, gs = torch.rand(37), torch.zeros(37)
    with pytest.raises(ValueError, match="buffered"):
        lce_backward(e, c, None, y, lse, gl, gs, -100, 0.0, 0.0, True, True, True, False, buffered=True,
                     dc_filter="dropped")
    with pytest.raises(ValueError, match="buffered"):
        lce_backward(e, c, None, y, lse, gl, gs, -100, 0.0, 0.0, False, True, True, False, buffered=True,
                     vocab_order=torch.arange(101))


def test_buffered_shape_stays_within_budget():
    from cce_inductor.kernels.backward_buffered import BUFFER_BYTES, MAX_CHUNK_TILES, buffered_shape

    for n, d, v in [(8192, 2304, 256000), (8192, 4096, 128256), (16384, 4096, 32768), (65536, 4096, 128256),
                    (100, 64, 50000), (3000, 8192, 262144)]:
        rows, cols = buffered_shape(n, d, v, 2, BUFFER_BYTES, 128, 256)
        assert 0 < rows <= n and 0 < cols <= v
        assert 2 * rows * cols + 4 * rows * d <= BUFFER_BYTES
        assert rows == n or rows % 128 == 0
    # few, even windows at the benchmark shapes
    assert buffered_shape(8192, 2304, 256000, 2, BUFFER_BYTES, 128, 256) == (2816, 4096)
    assert buffered_shape(8192, 4096, 128256, 2, BUFFER_BYTES, 128, 256) == (2048, 4096)
    # at most MAX_CHUNK_TILES vocab tiles per chunk (the filtered dE GEMM's lists of kept tiles)
    assert MAX_CHUNK_TILES == 64
    assert buffered_shape(100, 64, 3000, 2, BUFFER_BYTES, 16, 16, chunk_v=4096) == (100, 64 * 16)
    for n, d, v in [(8192, 2304, 256000), (8192, 4096, 128256), (8192, 512, 32768), (3000, 8192, 262144),
                    (100, 64, 50000), (1000, 4096, 128256)]:
        for max_chunk_tiles in (MAX_CHUNK_TILES, None):  # filtered, exact
            rows, cols = buffered_shape(n, d, v, 2, BUFFER_BYTES, 128, 256, sms=132, max_chunk_tiles=max_chunk_tiles)
            assert 0 < rows <= n and (rows == n or rows % 128 == 0)
            assert 2 * rows * cols + 4 * rows * d <= BUFFER_BYTES
            assert cols == v or cols % 256 == 0
            assert cols >= min(v, 4096) and (max_chunk_tiles is None or cols <= MAX_CHUNK_TILES * 256)


def test_windows_fill_whole_waves():
    """With the SM count given, the window size is the one whose dz launches leave the fewest idle
    SMs: at the Gemma shape 4 windows of 16 token tiles (16 x 16 = 256 tiles: 2 waves on 132 SMs)
    rather than the budget's 3 of 22 (352 tiles: 3 waves each); where one window fits, one window;
    never more than the budget. Chunks held at 16 vocab tiles here (the window is chosen at 4096-wide
    chunks either way); the filtered path then widens them as the exact path does."""
    from cce_inductor.kernels.backward_buffered import BUFFER_BYTES, buffered_shape

    narrow = dict(sms=132, max_chunk_tiles=16)
    assert buffered_shape(8192, 2304, 256000, 2, BUFFER_BYTES, 128, 256, **narrow) == (2048, 4096)
    assert buffered_shape(8192, 4096, 128256, 2, BUFFER_BYTES, 128, 256, **narrow) == (2048, 4096)
    assert buffered_shape(1000, 4096, 128256, 2, BUFFER_BYTES, 128, 256, **narrow) == (1000, 4096)
    # the filtered dE GEMM's own launches count: at Gemma 18 tiles of 128 x 128 per token tile; 4
    # windows of 16 token tiles give (2 + 3) waves per chunk each, 20 in all; 3 windows of 22 (the
    # last of 20) give (3 + 3) each, 18 in all
    assert buffered_shape(8192, 2304, 256000, 2, BUFFER_BYTES, 128, 256, de_d_tiles=18, **narrow) == (2816, 4096)
    # with the filtered path's own cap (64 tiles), the chunk widens into the budget: 22 tiles of 256 (2816
    # x 5632 x 2 B + 2816 x 2304 x 4 B <= 56 MiB), 484 dz tiles (4 waves) and 396 dE tiles (3) per launch
    assert buffered_shape(8192, 2304, 256000, 2, BUFFER_BYTES, 128, 256, sms=132, de_d_tiles=18) == (2816, 22 * 256)
    # the dE GEMM's 128 x 256 tiles (9 per token tile at D = 2304): windows of 14 token tiles (126 dE
    # tiles, one wave), then chunks of 46 tiles (1792 x 11776 x 2 B + 1792 x 2304 x 4 B = 58.7 MB)
    assert buffered_shape(8192, 2304, 256000, 2, BUFFER_BYTES, 128, 256, sms=132, de_d_tiles=9) == (1792, 46 * 256)
    # 10 token tiles, a budget of 5, 3 vocab tiles per chunk, 6 SMs: windows of 4 tiles (4, 4, 2:
    # 2 + 2 + 1 waves) beat the budget's even 5 + 5 (3 + 3 waves) and tie with 5 windows of 2 (1 each)
    budget = 5 * 16 * (2 * 48 + 4 * 8)
    assert buffered_shape(10 * 16, 8, 48, 2, budget, 16, 16) == (80, 48)
    assert buffered_shape(10 * 16, 8, 48, 2, budget, 16, 16, sms=6) == (64, 48)


def test_buffered_window_reads_the_module_constants_at_each_call():
    """buffered_shape is cached; buffered_window hands it CHUNK_V and MAX_CHUNK_TILES as arguments, so
    a patched constant (as the tests patch them) is never served a shape cached under another value.
    64 tokens x D = 16, a budget of 64 x (2 x 32 + 4 x 16) B."""
    e = torch.empty(64, 16, dtype=torch.bfloat16)
    budget = 64 * (2 * 32 + 4 * 16)
    for chunk, expected in ((32, (64, 32)), (48, (48, 48)), (32, (64, 32))):
        with mock.patch.object(backward_buffered, "CHUNK_V", chunk):
            assert backward_buffered.buffered_window(e, 1000, budget) == expected
            assert backward_buffered.buffered_window(e, 1000, budget, filtered=True) == expected


def test_exact_chunks_widen_into_the_budget():
    """The exact path (no tile limit) keeps the window and widens the chunk within the budget: the
    fewest dz waves, then the fewest accumulator bytes. Gemma, windows of 16 token tiles over 1000
    vocab tiles: at most 38 tiles fit (2048 x 9728 x 2 B + 2048 x 2304 x 4 B <= 56 MiB); 33 tiles
    make 528 tiles = 4 full waves per launch, 30 launches + one of 10 tiles (2 waves) = 122 waves per
    window against 125 at 16 tiles. Llama: at most 24 tiles (6144 entries) fit; 384 tiles = 3 waves
    per launch, 63 per window as at 16 tiles, and fewer chunks (fewer passes over dE's float32
    window)."""
    from cce_inductor.kernels.backward_buffered import BUFFER_BYTES, buffered_shape

    assert BUFFER_BYTES == 56 * 2**20
    exact = dict(sms=132, max_chunk_tiles=None)
    assert buffered_shape(8192, 2304, 256000, 2, BUFFER_BYTES, 128, 256, **exact) == (2048, 33 * 256)
    assert buffered_shape(8192, 4096, 128256, 2, BUFFER_BYTES, 128, 256, **exact) == (2048, 24 * 256)
    # a small budget: no wider than CHUNK_V-wide chunks allow; a vocabulary narrower than a chunk: all of it
    assert buffered_shape(8192, 4096, 128256, 2, 48 * 2**20, 128, 256, **exact) == (2048, 4096)
    assert buffered_shape(100, 64, 3000, 2, BUFFER_BYTES, 128, 256, **exact) == (100, 3000)


def test_strided_rows_and_transposed_inputs():
    """e with a row stride > D (a slice of a wider tensor) and c given as a transposed view."""
    e, c, b, y = _inputs()
    wide = torch.randn(37, 60)
    wide[:, 5:50] = e
    e_view = wide[:, 5:50]
    c_t = c.T.contiguous().T  # stride (1, V): not unit along D
    loss, lse = lce_forward(e_view, c_t, None, y, -100, 0.0, 0.0)
    ref_loss, ref_lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(lse, ref_lse)
    gl, gs = torch.rand(37), torch.zeros(37)
    de, dc, _ = lce_backward(e_view, c_t, None, y, lse, gl, gs, -100, 0.0, 0.0, False, True, True, False)
    ref = lce_backward(e, c, None, y, lse, gl, gs, -100, 0.0, 0.0, False, True, True, False)
    torch.testing.assert_close(de, ref[0])
    torch.testing.assert_close(dc, ref[1])


def test_out_of_range_target_is_nan_and_ignored_is_zero():
    e, c, _, y = _inputs()
    y[0], y[1], y[2] = 101, -3, -100
    loss, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    assert torch.isnan(loss[0]) and torch.isnan(loss[1]) and loss[2] == 0
    ref_loss, ref_lse = reference.chunked_forward(e.double(), c.double(), None, y, -100, 0.0, 0.0)
    assert torch.isfinite(lse).all()
    assert _rel(loss[3:], ref_loss[3:]) < 1e-6 and _rel(lse, ref_lse) < 1e-6


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["e_only", "c_only", "bias_only"])
def test_gradient_subsets(needs):
    e, c, b, y = _inputs(d=20, bias=True)
    lse = _float64_lse(e, c, b)
    gl, gs = torch.rand(37), torch.rand(37)
    grads = lce_backward(e, c, b, y, lse, gl, gs, -100, 0.0, 0.0, False, *needs)
    gold = _reference_grads(e, c, b, y, lse, gl, gs)
    for got, want, needed in zip(grads, gold, needs):
        if needed:
            assert _rel(got, want) < 1e-5
        else:
            assert got is None


def test_empty_batch():
    e, c, _, y = _inputs(n=0)
    loss, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    assert loss.shape == lse.shape == (0,)
    de, dc, _ = lce_backward(e, c, None, y, lse, loss, lse, -100, 0.0, 0.0, True, True, True, False)
    assert de.shape == e.shape and dc.shape == c.shape and not dc.any()


def test_filter_never_skips_a_uniform_softmax():
    e, c, _, y = _inputs(n=40, v=160, scale=0.1)
    lse = _float64_lse(e, c)
    counts = torch.zeros(2, dtype=torch.int32)
    lce_backward(e, c, None, y, lse, torch.full((40,), 1 / 40), torch.zeros(40), -100, 0.0, 0.0,
                 True, True, True, False, tile_counts=counts)
    assert counts.tolist() == [3 * 10, 0]


@pytest.mark.parametrize("dc_filter", [None, "dropped"], ids=["de_only", "de_and_dc"])
def test_filter_skips_peaked_tiles_within_its_bound(dc_filter):
    """Peaked softmax: tiles get skipped, and per token the gradient error stays within the rule's
    bound: |dE_i error| <= eps * w_i * max_j |C_j|; dC is exact (the atomic path's default) unless dropped, and then
    sum_j |dC_j error| <= eps * sum_i w_i |E_i|."""
    n, v = 40, 160
    # logits with std 30: confident and right, few tiles hold any mass (at eps = 1/8 and 16 x 16
    # tiles, 5 of the 30 blocks are skipped; at std 6 none or one, depending on the data)
    e, c, _, y = _inputs(n=n, v=v, scale=30.0)
    y = (e @ c.T).argmax(1)
    lse = _float64_lse(e, c)
    gen = torch.Generator().manual_seed(5)
    gl, gs = torch.rand(n, generator=gen), torch.rand(n, generator=gen) * 0.1
    args = (e, c, None, y, lse, gl, gs, -100, 0.0, 0.0)
    counts = torch.zeros(2, dtype=torch.int32)
    eps = kernels.FILTER_EPS
    de_f, dc_f, _ = lce_backward(*args, True, True, True, False, tile_counts=counts, dc_filter=dc_filter)
    de_x, dc_x, _ = lce_backward(*args, False, True, True, False)
    computed, skipped = counts.tolist()
    assert computed + skipped == 3 * 10 and skipped > 0
    w = (gl + gs).abs() + gl.abs()
    de_err = (de_f - de_x).norm(dim=1)
    assert de_err.max() > 0 and (de_err <= eps * w * c.norm(dim=1).max() + 1e-6).all()
    dc_err = (dc_f - dc_x).norm(dim=1).sum()
    if dc_filter == "dropped":
        assert 0 < dc_err <= eps * (w * e.norm(dim=1)).sum() + 1e-6
    else:
        assert dc_err <= 1e-5 * dc_x.norm(dim=1).sum()


def test_vocab_splits_fill_the_waves():
    per_split, splits = vocab_splits(64, 1000, 132, 64)  # N = 8192 at 128 tokens, V = 256000 at 256
    assert per_split * splits >= 1000 > per_split * (splits - 1)
    waves = math.ceil(64 * splits / 132)
    assert waves * per_split <= 1.05 * 64 * 1000 / 132  # within 5% of a perfect fill
    assert vocab_splits(1, 7, 4, 1024) == (2, 4)


def test_forward_program_groups_cover_every_tile_once():
    """The forward's programs walk groups of group_n token tiles x all splits (the last group
    narrower); any group size covers every (token tile, split) exactly once, so loss and lse are
    the same bits whatever the grouping -- and match float64. N = 90: 6 token tiles of 16 (groups of
    4: one of 4 and a narrower last one of 2; of 100: one narrower group); V = 101: 7 vocab tiles in
    4 splits of 2."""
    e, c, b, y = _inputs(n=90, d=20, v=101, dtype=torch.float32, bias=True, scale=2.0)
    y[7] = -100
    with mock.patch.object(forward, "vocab_splits", lambda *args: (2, 4)):
        runs = {group_n: lce_forward(e, c, b, y, -100, 0.0, 0.0,
                                     config=dataclasses.replace(common._INTERPRETER, group_n=group_n))
                for group_n in (1, 2, 4, 100)}
    for group_n, got in runs.items():
        for a, want in zip(got, runs[1]):
            assert torch.equal(a, want), group_n
    gold_loss, gold_lse = reference.chunked_forward(e.double(), c.double(), b.double(), y, -100, 0.0, 0.0)
    assert torch.allclose(runs[1][0].double(), gold_loss.double(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(runs[1][1].double(), gold_lse.double(), rtol=1e-5, atol=1e-5)


LEAN_CASES = {  # path: (dtype, D, launcher options); D = 24 gives TMA rows (16-byte aligned) in 16-bit
    "buffered_tma_windows_chunks": (torch.bfloat16, 24, dict(buffered=True, buffer_bytes=2 * 16 * 40 + 4 * 16 * 24)),
    "buffered_pointers": (torch.bfloat16, 21, dict(buffered=True)),
    "atomic_bf16": (torch.bfloat16, 21, dict(buffered=False)),
    "atomic_float32": (torch.float32, 21, dict(buffered=False)),
    "atomic_ordered": (torch.bfloat16, 21, dict(buffered=False, vocab_order=True)),
}


@pytest.mark.parametrize("shift", [-200.0, 200.0])
@pytest.mark.parametrize("path", list(LEAN_CASES))
def test_lean_dz_epilogue_matches_the_masked_one(path, shift):
    """The dz epilogue without row and column masks (lse = +inf past N; the columns past the
    launch's vocabulary left to the consumers: clipped or masked stores, dbias and the filter's mass
    masked, the atomic kernel's GEMMs fed a column-masked dz) gives the masked epilogue's gradients
    and filters the same tiles. The bias sits near -200, so lse is too: exp(-lse) in a column past
    the vocabulary overflows, and garbage there that reaches a GEMM turns dE into NaN; or near +200,
    where a row past N given lse = 0 instead of +inf would have p = exp(200) = inf and 0 * inf = NaN
    in dbias. With smoothing (the uniform term fills every column), partial tiles both ways (20
    tokens, 45 entries), an ignored token, and on the TMA path two windows and two chunks (the second
    narrower than a tile). The atomic kernel always runs the masked epilogue (it multiplies dz by C's
    zero rows past the vocabulary), so it runs once: its cases check that it stays finite at these
    extremes. The epilogue is the same code in float16 as in bf16."""
    dtype, d, options = LEAN_CASES[path]
    n, v = 20, 45
    e, c, _, y = _inputs(n=n, d=d, v=v, dtype=dtype, scale=2.0)
    b = torch.randn(v, generator=torch.Generator().manual_seed(1)) + shift  # float32 bias
    y[3] = -100
    gl, gs = torch.rand(n), torch.rand(n)
    _, lse = lce_forward(e, c, b, y, -100, 0.0, 0.1)
    assert (lse - shift).abs().max() < 50
    leans = (True, False) if options["buffered"] else (False,)  # the atomic kernel ignores the flag
    results, counts = {}, {}
    for lean in leans:
        with mock.patch.object(backward_buffered, "LEAN_DZ_EPILOGUE", lean), \
                mock.patch.object(backward_buffered, "CHUNK_V", 40):
            grads = list(lce_backward(e, c, b, y, lse, gl, gs, -100, 0.0, 0.1, False, True, True, True, **options))
            for eps in (2.0**-2, 2.0):  # no smoothing, so that tiles (edge tiles among them) are skipped
                counts[lean, eps] = torch.zeros(2, dtype=torch.int32)
                grads += lce_backward(e, c, b, y, lse, gl, gs, -100, 0.0, 0.0, True, True, True, True,
                                      filter_eps=eps, tile_counts=counts[lean, eps], **options)
        results[lean] = grads
    for got in results[False]:
        assert torch.isfinite(got).all()
    if True in results:
        for got, want in zip(results[True], results[False]):
            assert torch.isfinite(got).all()
            assert _rel(got, want) < 2e-3  # exp2 against exp: float32 rounding, then the inputs' dtype
        for eps in (2.0**-2, 2.0):
            assert torch.equal(counts[True, eps], counts[False, eps])  # the same tiles filtered
    assert counts[False, 2.0][1] > 0


# ----------------------------------------------------------------------------- property test

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernel_cases import Case  # noqa: E402

random_cases = st.builds(
    Case,
    name=st.just("random"),
    n=st.integers(2, 40),
    d=st.integers(1, 70),
    v=st.integers(2, 70),
    batch=st.sampled_from([0, 2]),
    bias=st.booleans(),
    softcap=st.sampled_from([None, 1.5]),
    ignore_index=st.sampled_from([-100, 1]),
    n_ignored=st.integers(0, 2),
    label_smoothing=st.sampled_from([0.0, 0.15]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    shift=st.sampled_from([0, 1]),
    return_lse=st.booleans(),
    exact=st.just(True),
    scale=st.sampled_from([0.5, 2.0]),
)


# Derandomized, with no example database: the same ten examples on every run, so that the suite does not
# depend on the draw. A random draw can find inputs (D = 1, V = 2) whose dC cancels to where float32
# misses the 1e-5 bound: a limit of the check's conditioning, not of the kernels.
@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=random_cases, seed=st.integers(0, 2**16))
def test_float32_random_cases(case, seed):
    assume(case.batch or not case.shift)  # the label shift needs a token dim
    check_case(case, torch.float32, "cpu", seed=seed)

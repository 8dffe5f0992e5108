"""The vocab-parallel op in one process: the vocabulary split into ranges, each shard's pieces run
and combined as the ranks would, against the float64 definition and the single-device op; the
public function with one process (group=None) end to end; its errors. Multi-process runs (gloo)
are in tests/passes/test_tensor_parallel.py."""

import math

import pytest
import torch

from cce_inductor import linear_cross_entropy, vocab_parallel_cross_entropy
from cce_inductor import vocab_parallel as vp
from cce_inductor.ops import TargetOutOfRangeError
from cce_inductor.reference import naive_linear_cross_entropy


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_case(n, d, v, *, dtype=torch.float32, peaked=False, bias=False, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64) * (6.0 if peaked else 1.0)
    c = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[:: 4] = ignore_index  # every fourth ignored
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(e), cast(c), y, cast(b)


def ranges_of(v, sizes):
    """Contiguous [v0, v1) ranges of the given sizes (summing to v; a 0 is an empty shard)."""
    assert sum(sizes) == v
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(s, s + k) for s, k in zip(starts, sizes)]


def split_run(e, c, y, b, ranges, *, grad_loss, grad_lse, impl="torch", **opts):
    """What the ranks compute, in one process: each shard's statistics, the combination, each
    shard's backward; dE summed over shards, dC and dbias concatenated."""
    v = c.shape[0]
    kw = dict(ignore_index=opts.get("ignore_index", -100), softcap=float(opts.get("softcap") or 0.0),
              label_smoothing=opts.get("label_smoothing", 0.0), impl=impl)
    stats = torch.stack([vp.shard_statistics(e, c[v0:v1], y, None if b is None else b[v0:v1], vocab_start=v0, **kw)
                         for v0, v1 in ranges])
    loss, lse = vp.combine(stats, y, vocab_size=v, ignore_index=kw["ignore_index"],
                           label_smoothing=kw["label_smoothing"])
    de, dcs, dbs = 0, [], []
    for v0, v1 in ranges:
        de_r, dc_r, db_r = vp.shard_backward(
            e, c[v0:v1], y, None if b is None else b[v0:v1], lse, grad_loss, grad_lse, vocab_start=v0, vocab_size=v,
            filter_grad=False, needs_e=True, needs_c=True, needs_bias=b is not None, **kw,
        )
        de = de + de_r.double()
        dcs.append(dc_r)
        dbs.append(db_r)
    return loss, lse, de, torch.cat(dcs), (torch.cat(dbs) if b is not None else None)


def gold(e, c, y, b, *, grad_loss, grad_lse, **opts):
    """float64 definition: per-token loss and lse, and the gradients of sum(g * loss + g_lse * lse)."""
    leaves = [t.detach().double().requires_grad_() for t in (e, c)] + ([b.detach().double().requires_grad_()] if b is not None else [])
    loss, lse = naive_linear_cross_entropy(leaves[0], leaves[1], y, leaves[2] if b is not None else None,
                                           reduction="none", return_lse=True, **opts)
    grads = torch.autograd.grad((loss * grad_loss.double()).sum() + (lse * grad_lse.double()).sum(), leaves)
    return loss, lse, grads


CASES = {
    "plain": dict(n=13, d=7, v=37, sizes=[19, 18]),
    "uneven-4": dict(n=11, d=5, v=37, sizes=[10, 10, 10, 7]),
    "empty-shard": dict(n=9, d=6, v=5, sizes=[2, 2, 1, 0]),
    "bias": dict(n=13, d=7, v=37, sizes=[19, 18], bias=True),
    "softcap": dict(n=13, d=7, v=37, sizes=[10, 27], opts=dict(softcap=1.5), peaked=True),
    "smoothing-bias": dict(n=13, d=7, v=37, sizes=[5, 20, 12], bias=True, opts=dict(label_smoothing=0.2)),
    "peaked": dict(n=17, d=9, v=41, sizes=[21, 20], peaked=True),
    "ignore-index-valid-id": dict(n=13, d=7, v=37, sizes=[19, 18], ignore_index=3, opts=dict(ignore_index=3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_split_pieces_match_float64_and_single_device(name):
    case = CASES[name]
    opts = dict(case.get("opts", {}))
    e, c, y, b = make_case(case["n"], case["d"], case["v"], peaked=case.get("peaked", False), bias=case.get("bias", False),
                           ignore_index=case.get("ignore_index", -100))
    g = torch.Generator().manual_seed(1)
    grad_loss, grad_lse = torch.rand(case["n"], generator=g), 0.1 * torch.randn(case["n"], generator=g)
    ranges = ranges_of(case["v"], case["sizes"])
    loss, lse, de, dc, db = split_run(e, c, y, b, ranges, grad_loss=grad_loss, grad_lse=grad_lse, **opts)
    ref_loss, ref_lse, ref_grads = gold(e, c, y, b, grad_loss=grad_loss, grad_lse=grad_lse, **opts)
    assert loss.dtype == torch.float32
    assert rel(loss, ref_loss) < 1e-6 and rel(lse, ref_lse) < 1e-7
    ignored = y == opts.get("ignore_index", -100)
    assert (loss[ignored] == 0).all()
    for got, want, what in zip((de, dc, db), ref_grads, ("dE", "dC", "dbias")):
        assert rel(got, want) < 1e-6, what
    # the single-device op, as a second opinion in the same dtype
    one = linear_cross_entropy(e, c, y, b, reduction="none", **opts)
    assert rel(loss, one) < 1e-6


def test_split_pieces_bfloat16_within_single_device_error():
    e, c, y, _ = make_case(16, 12, 45, dtype=torch.bfloat16, peaked=True)
    g = torch.ones(16)
    ranges = ranges_of(45, [23, 22])
    loss, _, de, dc, _ = split_run(e, c, y, None, ranges, grad_loss=g, grad_lse=torch.zeros(16))
    ref_loss, _, (ref_de, ref_dc) = gold(e, c, y, None, grad_loss=g, grad_lse=torch.zeros(16))
    ec, cc = e.detach().requires_grad_(), c.detach().requires_grad_()
    one = linear_cross_entropy(ec, cc, y, reduction="none")
    one_de, one_dc = torch.autograd.grad(one.sum(), (ec, cc))
    assert rel(loss, ref_loss) <= 2 * rel(one, ref_loss) + 1e-6
    # dE summed over shards in float64 here; each shard's share rounded to bfloat16 once
    assert rel(de, ref_de) <= 2 * rel(one_de, ref_de) + 1e-6
    assert rel(dc, ref_dc) <= 2 * rel(one_dc, ref_dc) + 1e-6


def test_split_pieces_triton_interpreted():
    """The Triton path's kernels (TRITON_INTERPRET=1 on the CPU) under the same split."""
    pytest.importorskip("triton")
    from cce_inductor import ops

    if not ops._triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton kernels cannot run here")
    e, c, y, b = make_case(7, 5, 23, bias=True)
    g = torch.rand(7, generator=torch.Generator().manual_seed(2))
    ranges = ranges_of(23, [12, 11])
    loss, lse, de, dc, db = split_run(e, c, y, b, ranges, grad_loss=g, grad_lse=torch.zeros(7), impl="triton")
    ref_loss, ref_lse, ref_grads = gold(e, c, y, b, grad_loss=g, grad_lse=torch.zeros(7))
    assert rel(loss, ref_loss) < 1e-5 and rel(lse, ref_lse) < 1e-6
    for got, want, what in zip((de, dc, db), ref_grads, ("dE", "dC", "dbias")):
        assert rel(got, want) < 1e-5, what


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [0, 1])
def test_one_process_public_function(reduction, shift):
    """group=None: the whole vocabulary in one shard, through the custom ops and their autograd."""
    g = torch.Generator().manual_seed(3)
    e = torch.randn(2, 7, 6, generator=g, requires_grad=True)
    c = torch.randn(29, 6, generator=g, requires_grad=True)
    b = torch.randn(29, generator=g, requires_grad=True)
    y = torch.randint(0, 29, (2, 7), generator=g)
    y[0, 2] = -100
    opts = dict(reduction=reduction, shift=shift, label_smoothing=0.1)
    loss, lse = vocab_parallel_cross_entropy(e, c, y, b, vocab_start=0, vocab_size=29, return_lse=True, **opts)
    leaves = [t.detach().double().requires_grad_() for t in (e, c, b)]
    ref = naive_linear_cross_entropy(*leaves[:2], y, leaves[2], **opts)
    ref_lse = naive_linear_cross_entropy(*leaves[:2], y, leaves[2], return_lse=True, reduction="none")[1]
    assert loss.shape == ref.shape and rel(loss, ref) < 1e-6
    assert rel(lse, ref_lse[..., : 7 - shift]) < 1e-6
    w = torch.rand(loss.shape, generator=g)
    grads = torch.autograd.grad((loss * w).sum() + 0.1 * lse.sum(), (e, c, b))
    ref_grads = torch.autograd.grad((ref * w.double()).sum() + 0.1 * ref_lse[..., : 7 - shift].sum(), leaves)
    for got, want in zip(grads, ref_grads):
        assert rel(got, want) < 1e-6


def test_custom_ops_opcheck():
    g = torch.Generator().manual_seed(4)
    e = torch.randn(6, 5, generator=g, requires_grad=True)
    c = torch.randn(11, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (6,), generator=g)
    y[2] = -100
    args = (e, c, y, None, -100, 0.0, 0.1, "torch", 0, 11, "", False, True)
    torch.library.opcheck(torch.ops.cce_inductor.vp_lce_forward.default, args)
    loss, lse = torch.ops.cce_inductor.vp_lce_forward(*args)
    bw = (e.detach(), c.detach(), y, None, lse.detach(), torch.ones(6), torch.zeros(6), -100, 0.0, 0.1, "torch", False, 0, 11, "", True,
          True, True, False)
    torch.library.opcheck(torch.ops.cce_inductor.vp_lce_backward.default, bw)


def test_errors():
    e, c, y = torch.randn(4, 3), torch.randn(10, 3), torch.tensor([0, 1, 2, 9])
    with pytest.raises(ValueError, match="softcap together with label_smoothing"):
        vocab_parallel_cross_entropy(e, c, y, vocab_start=0, vocab_size=10, softcap=2.0, label_smoothing=0.1)
    with pytest.raises(TargetOutOfRangeError):  # a global id beyond V, as the single-device op
        vocab_parallel_cross_entropy(e, c, torch.tensor([0, 1, 2, 10]), vocab_start=0, vocab_size=10)
    with pytest.raises(ValueError, match="whole classifier"):
        vocab_parallel_cross_entropy(e, c[:5], y, vocab_start=0, vocab_size=10)
    with pytest.raises(ValueError, match="not within"):
        vocab_parallel_cross_entropy(e, c, y, vocab_start=3, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_cross_entropy(e, c, y, vocab_size=10)
    with pytest.raises(TypeError, match="ProcessGroup"):
        vocab_parallel_cross_entropy(e, c, y, group="tp", vocab_start=0, vocab_size=10)


def test_chunk_start_matches_torch_chunk():
    for v, ranks in [(37, 4), (5, 4), (3, 4), (128, 8), (10, 3)]:
        sizes = [t.shape[0] for t in torch.arange(v).chunk(ranks)]
        sizes += [0] * (ranks - len(sizes))
        starts = [vp.chunk_start(v, ranks, r) for r in range(ranks)]
        assert starts == [sum(sizes[:r]) for r in range(ranks)], (v, ranks)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [[1], [2], [8]], ids=["world1", "split2", "split8"])
def test_gpu_split_matches_single_device_op(dtype, sizes):
    """Triton kernels on a GPU: the vocabulary in 1, 2 or 8 ranges of one process, against the
    single-device op (the same kernels over the whole vocabulary) and float64."""
    n, d, v = 1000, 256, 5003
    parts = sizes[0]
    chunk = -(-v // parts)
    ranges = [(r * chunk, min(v, (r + 1) * chunk)) for r in range(parts)]
    e, c, y, b = make_case(n, d, v, dtype=dtype, bias=True)
    e, c, y, b = e.cuda(), c.cuda(), y.cuda(), b.cuda()
    g = torch.rand(n, device="cuda")
    loss, lse, de, dc, db = split_run(e, c, y, b, ranges, grad_loss=g, grad_lse=torch.zeros(n, device="cuda"),
                                      impl="triton", label_smoothing=0.1)
    ref_loss, _, ref_grads = gold(e, c, y, b, grad_loss=g, grad_lse=torch.zeros(n, device="cuda"), label_smoothing=0.1)
    ec, cc, bc = (t.detach().requires_grad_() for t in (e, c, b))
    one = linear_cross_entropy(ec, cc, y, bc, reduction="none", label_smoothing=0.1, impl="triton")
    one_grads = torch.autograd.grad((one * g).sum(), (ec, cc, bc))
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    assert rel(loss, ref_loss) <= 2 * rel(one, ref_loss) + slack
    for got, mine, want, what in zip((de, dc, db), one_grads, ref_grads, ("dE", "dC", "dbias")):
        assert rel(got, want) <= 2 * rel(mine, want) + slack, what


def test_benchmark_smoke(tmp_path):
    """benchmarks/vocab_parallel_bench.py in its CPU mode: every split, its JSON."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import vocab_parallel_bench

    out = tmp_path / "vp.json"
    data = vocab_parallel_bench.main(["--smoke", "--splits", "1", "8", "--dtype", "float32", "--out", str(out)])
    assert json.loads(out.read_text()) == data
    assert [r["v_shard"] for r in data["rows"]] == [501, 63]
    assert all(r["fwdbwd_ms"] > 0 and r["t_ms"] > 0 for r in data["rows"])

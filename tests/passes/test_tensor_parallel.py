"""Tensor-parallel heads on a CPU mesh (gloo): unmodified TP code compiled with backend="cce".

One spawned run of two processes holds every case (process-group start-up is the slow part):
a head under ``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)`` and the loss
under ``loss_parallel()`` (torchtitan's layout), with the input replicated, under sequence
parallelism, with a bias and a softcap; the logits all-gathered (``output_layouts=Replicate()``) and a plain
loss; and on a (dp, tp) mesh under FSDP2 (resharding on
and off, and bfloat16 mixed precision). Each case checks: explain() reports the site rewritten
with its layout; the generated code calls the vocab-parallel op and allocates no N x V/tp buffer
(the same check finds them in plain torch.compile's code); loss and gradients equal a
single-process eager run. Also: a head split another way is left alone with the reason and
still runs as eager; the explicit API with plain tensors and with DTensors. A second spawn of four
processes runs a 2 x 2 (dp, tp) mesh (set CCE_SKIP_WORLD4=1 to skip it).
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

dist = pytest.importorskip("torch.distributed")

WORLD = 2
D, V, VOCAB_OP = 16, 41, "cce_inductor.vp_lce_forward"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head(nn.Module):
    """An embedding projection, a norm and a classifier; the loss inside forward."""

    def __init__(self, bias=False, smoothing=0.0, reduction="mean", softcap=None):
        super().__init__()
        self.inp = nn.Linear(8, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=bias)
        self.smoothing, self.reduction, self.softcap = smoothing, reduction, softcap

    def forward(self, x, y):
        logits = self.head(self.norm(self.inp(x)))
        if self.softcap is not None:  # Gemma 2's final logit softcapping
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), label_smoothing=self.smoothing,
                               reduction=self.reduction)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _sp_grad(name, grad, sp):
    """Under sequence parallelism the layer before the norm sees this rank's tokens only, its
    gradient a partial sum (a training loop sums it over the group, as here)."""
    if sp and name.startswith("inp."):
        grad = grad.clone()
        dist.all_reduce(grad)
    return grad


def _check(got: float, bound: float, what: str) -> None:
    assert got <= bound, f"{what}: relative error {got:.2e} > {bound:.0e}"


def _batch(seed=0, batch=2, seq=12):  # N = 24 tokens > D: C-sized buffers are smaller than N x V/tp
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, 8, generator=g)
    y = torch.randint(0, V, (batch, seq), generator=g)
    y[0, 1] = -100
    return x, y


def _compiled_step(model, x, y, rank):
    """One compiled forward + backward under loss_parallel(); the loss and the generated code."""
    from torch._inductor.utils import run_and_get_code
    from torch.distributed.tensor.parallel import loss_parallel

    compiled = torch.compile(model, backend="cce")

    def step():
        with loss_parallel():
            loss = compiled(x, y)
            loss.backward()
        return loss

    loss, code = run_and_get_code(step)
    return loss, "\n".join(code)


def _nxv(code: str, tokens: int, vocab: int):
    sys.path.insert(0, os.path.dirname(__file__))
    from passes_helpers import nxv_buffers

    return nxv_buffers(code, tokens, vocab, fallbacks=True)


def _case_tp(rank, mesh, sp, bias=False, smoothing=0.0, reduction="mean", check_plain=False, replicated_out=False,
             softcap=None):
    import cce_inductor
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, SequenceParallel, loss_parallel, parallelize_module

    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = Head(bias, smoothing, reduction, softcap)
    model = Head(bias, smoothing, reduction, softcap)
    model.load_state_dict(ref.state_dict())
    x, y = _batch()
    expected = ref(x, y)
    expected.backward()
    plan = {"head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    if replicated_out:  # the logits all-gathered, a plain tensor: no loss_parallel() needed
        plan = {"head": ColwiseParallel(output_layouts=Replicate())}
    if sp:
        plan = {"norm": SequenceParallel(),
                "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)}
    parallelize_module(model, mesh, plan)
    xin = x.chunk(WORLD, dim=1)[rank] if sp else x
    with loss_parallel():
        report = cce_inductor.explain(model, xin, y)
    (site,) = report.sites
    assert site.status == "rewritten", site.summary()
    layout = site.details["parallel"]
    assert "over mesh dim 'tp' (2 ranks)" in layout and "Shard(dim=0)" in layout, layout
    assert ("sequence parallel" in layout) == sp and ("input replicated" in layout) != sp, layout
    assert site.details["mode"].startswith("vocab-parallel"), site.details["mode"]

    loss, code = _compiled_step(model, xin, y, rank)
    assert VOCAB_OP in code
    tokens, local_v = x.shape[0] * x.shape[1], len(torch.arange(V).chunk(WORLD)[rank])
    assert not _nxv(code, tokens, local_v), _nxv(code, tokens, local_v)
    _check(_rel(_full(loss), expected), 1e-6, "loss")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        _check(_rel(_sp_grad(name, _full(p.grad), sp), q.grad), 1e-5, f"grad of {name}")
    if check_plain:  # the detector above finds the logits in plain torch.compile's code
        torch._dynamo.reset()
        from torch._inductor.utils import run_and_get_code

        plain = torch.compile(model, backend="inductor")
        with loss_parallel():
            _, plain_code = run_and_get_code(lambda: plain(xin, y).backward())
        assert _nxv("\n".join(plain_code), tokens, local_v), "the N x V/tp check found nothing in plain compile"


def _case_fsdp2(rank, mesh, reshard, bf16, steps=2):
    """A (dp, tp) mesh: FSDP2 on the model over dp (the head's weight gathered in its forward and
    freed after it with resharding), TP on the head over tp, a sequence-parallel norm. Two steps
    with an optimizer step between: the second reads the weight FSDP2 gathers again after the
    update (a stale copy would give the first step's values)."""
    import cce_inductor
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, SequenceParallel, loss_parallel, parallelize_module

    torch._dynamo.reset()
    dp, tp = mesh["dp"], mesh["tp"]
    tp_group = tp.get_group()
    torch.manual_seed(0)
    ref = Head()
    x, y = _batch(1, batch=2 * dp.size())
    kw = {"mesh": dp, "reshard_after_forward": reshard}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    plan = {"norm": SequenceParallel(),
            "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)}
    models = []
    for _ in range(2):  # compiled, and eager with the same layout (bf16: its rounding is the yardstick)
        m = Head()
        m.load_state_dict(ref.state_dict())
        parallelize_module(m, tp, plan)
        fully_shard(m, **kw)
        models.append(m)
    model, eager = models
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref, model, eager)]
    xs, ys = x.chunk(dp.size()), y.chunk(dp.size())
    xin, yin = xs[dp.get_local_rank()].chunk(tp.size(), dim=1)[tp.get_local_rank()], ys[dp.get_local_rank()]
    with loss_parallel():
        (site,) = cce_inductor.explain(model, xin, yin).sites
    # in the forward FSDP2 has gathered the weight over dp: a DTensor on the tp mesh
    assert site.status == "rewritten" and "over mesh dim 'tp'" in site.details["parallel"], site
    for step in range(steps):
        for opt in opts:
            opt.zero_grad()
        if bf16:  # the gold: float32 math on the parameters bfloat16 computes with
            gold = Head()
            gold.load_state_dict({k: v.bfloat16().float() for k, v in ref.state_dict().items()})
        else:
            gold = ref
        expected = [gold(xi, yi) for xi, yi in zip(xs, ys)]  # one loss per dp rank; FSDP2 averages
        sum(expected).div(dp.size()).backward()
        if bf16:
            for p, q in zip(ref.parameters(), gold.parameters()):
                p.grad = q.grad
        loss, code = _compiled_step(model, xin, yin, rank)
        assert VOCAB_OP in code
        local_v = len(torch.arange(V).chunk(tp.size())[tp.get_local_rank()])
        assert not _nxv(code, xs[0].shape[0] * xs[0].shape[1], local_v)
        with loss_parallel():
            eager_loss = eager(xin, yin)
            eager_loss.backward()
        for m in (model, eager):  # the layer before the norm: partial sums over tp (sequence parallel)
            for p in m.inp.parameters():
                dist.all_reduce(p.grad.to_local(), group=tp_group)
        want = expected[dp.get_local_rank()]
        bound = 1e-6 if not bf16 else 2 * _rel(_full(eager_loss), want) + 2**-8
        _check(_rel(_full(loss), want), bound, f"step {step} loss")
        for (name, p), q, r in zip(model.named_parameters(), gold.parameters(), eager.parameters()):
            grad = _full(p.grad)
            assert grad.dtype == torch.float32  # the sharded parameter's gradient (reduce_dtype)
            bound = 1e-5 if not bf16 else 2 * _rel(_full(r.grad), q.grad) + 1e-3
            _check(_rel(grad, q.grad), bound, f"step {step} grad of {name}")
        for opt in opts:
            opt.step()


def _case_fsdp2_on_the_head(rank, mesh):
    """fully_shard on the head alone: FSDP2's hooks break the graph between head and loss, the
    site is left alone, and explain() says why."""
    import cce_inductor
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    torch._dynamo.reset()
    model = Head()
    parallelize_module(model, mesh["tp"], {"head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    fully_shard(model.head, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    x, y = _batch(3)
    with loss_parallel():
        (site,) = cce_inductor.explain(model, x, y).sites
    assert site.status == "skipped" and "fully_shard on the head alone" in site.reason, site.summary()


def _case_left_alone(rank, mesh):
    """A head split over D (RowwiseParallel: weight Shard(1), partial logits) is left alone with
    its layout named, and still computes eager's loss."""
    import cce_inductor
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = Head()
    model = Head()
    model.load_state_dict(ref.state_dict())
    parallelize_module(model, mesh, {"head": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())})
    x, y = _batch(2)
    (site,) = cce_inductor.explain(model, x, y).sites  # local (replicated) logits: no loss_parallel()
    assert site.status == "skipped" and "Shard(dim=1)" in site.reason, site.summary()
    loss = torch.compile(model, backend="cce")(x, y)
    _check(_rel(_full(loss), ref(x, y)), 1e-6, "loss left alone")


def _case_explicit_api(rank, mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from cce_inductor import vocab_parallel_cross_entropy
    from cce_inductor.ops import TargetOutOfRangeError
    from cce_inductor.reference import naive_linear_cross_entropy

    g = torch.Generator().manual_seed(3)
    e, c, b = torch.randn(2, 9, 6, generator=g), torch.randn(V, 6, generator=g), torch.randn(V, generator=g)
    y = torch.randint(0, V, (2, 9), generator=g)
    y[1, 4] = -100
    leaves = [t.double().requires_grad_() for t in (e, c, b)]
    opts = dict(label_smoothing=0.1, shift=1, reduction="sum")
    expected = naive_linear_cross_entropy(*leaves[:2], y, leaves[2], **opts)
    expected.backward()
    # plain tensors: this rank's rows, split unevenly
    v0, v1 = (0, 30) if rank == 0 else (30, V)
    el, cl, bl = (t.clone().requires_grad_() for t in (e, c[v0:v1], b[v0:v1]))
    loss = vocab_parallel_cross_entropy(el, cl, y, bl, group=dist.group.WORLD, vocab_start=v0, vocab_size=V, **opts)
    loss.backward()
    _check(_rel(loss, expected), 1e-6, "explicit loss")
    _check(_rel(el.grad, leaves[0].grad), 1e-6, "explicit dE (all-reduced)")
    _check(_rel(cl.grad, leaves[1].grad[v0:v1]), 1e-6, "explicit dC")
    _check(_rel(bl.grad, leaves[2].grad[v0:v1]), 1e-6, "explicit dbias")
    # ... called inside a compiled function (one graph: the op and its collectives are opaque calls)
    torch._dynamo.reset()
    el.grad = cl.grad = bl.grad = None
    fn = torch.compile(lambda e_, c_, b_: vocab_parallel_cross_entropy(
        e_, c_, y, b_, group=dist.group.WORLD, vocab_start=v0, vocab_size=V, **opts), fullgraph=True)
    loss = fn(el, cl, bl)
    loss.backward()
    _check(_rel(loss, expected), 1e-6, "compiled explicit loss")
    _check(_rel(el.grad, leaves[0].grad), 1e-6, "compiled explicit dE")
    _check(_rel(cl.grad, leaves[1].grad[v0:v1]), 1e-6, "compiled explicit dC")
    # DTensors: the classifier split by DTensor, e replicated (its gradient comes back Partial)
    ed = distribute_tensor(e.clone(), mesh, [Replicate()]).requires_grad_()
    cd = distribute_tensor(c.clone(), mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(b.clone(), mesh, [Shard(0)]).requires_grad_()
    loss = vocab_parallel_cross_entropy(ed, cd, y, bd, **opts)
    loss.backward()
    _check(_rel(loss, expected), 1e-6, "DTensor loss")
    for t, ref, what in ((ed, leaves[0], "dE"), (cd, leaves[1], "dC"), (bd, leaves[2], "dbias")):
        _check(_rel(t.grad.full_tensor(), ref.grad), 1e-6, f"DTensor {what}")
    with pytest.raises(ValueError, match="Shard"):
        vocab_parallel_cross_entropy(ed, distribute_tensor(c.clone(), mesh, [Shard(1)]), y)
    bad = y.clone()
    bad[0, 0] = V  # in no shard, but outside [0, V): an error on every rank, as the single-device op
    with pytest.raises(TargetOutOfRangeError):
        vocab_parallel_cross_entropy(e, c[v0:v1], bad, group=dist.group.WORLD, vocab_start=v0, vocab_size=V)


def _worker(rank: int, port: int, world: int) -> None:
    import torch._inductor.config as inductor_config
    from torch.distributed.device_mesh import init_device_mesh

    # Inductor's ATen fallbacks instead of generated C++ kernels: what is checked is the rewrite
    # and the op, and C++ compiles would take most of the test's time.
    if hasattr(inductor_config, "fallback_by_default"):
        inductor_config.fallback_by_default = True
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if world == 4:  # a 2 x 2 (dp, tp) mesh: FSDP2 over dp composes with the vocab-parallel head
            mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
            _case_fsdp2(rank, mesh2d, reshard=True, bf16=False)  # (resharding off, bf16: the (1, 2) mesh's cases)
            return
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        _case_explicit_api(rank, mesh)
        _case_tp(rank, mesh, sp=False, check_plain=True)
        _case_tp(rank, mesh, sp=True)
        # (label smoothing under loss_parallel() fails in DTensor itself on torch 2.13: the explicit
        # API's case covers smoothing across ranks)
        _case_tp(rank, mesh, sp=False, bias=True, reduction="sum", softcap=2.0)
        _case_tp(rank, mesh, sp=False, replicated_out=True)
        _case_left_alone(rank, mesh)
        mesh2d = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
        _case_fsdp2(rank, mesh2d, reshard=True, bf16=False)
        _case_fsdp2(rank, mesh2d, reshard=False, bf16=True, steps=1)
        _case_fsdp2_on_the_head(rank, mesh2d)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_tensor_parallel_heads_on_a_cpu_mesh():
    torch.multiprocessing.spawn(_worker, args=(_free_port(), WORLD), nprocs=WORLD, join=True)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(os.environ.get("CCE_SKIP_WORLD4") == "1", reason="CCE_SKIP_WORLD4=1")
def test_fsdp2_by_tensor_parallel_on_a_2x2_mesh():
    torch.multiprocessing.spawn(_worker, args=(_free_port(), 4), nprocs=4, join=True)


def _gpu_worker(rank: int, port: int) -> None:
    """One process on one GPU (NCCL, world size 1): the compiled TP head runs the op's Triton path
    and its collectives; loss and gradients as the single-device eager run."""
    import cce_inductor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("tp",))
        torch.manual_seed(0)
        ref, model = Head(bias=True).cuda(), Head(bias=True).cuda()
        model.load_state_dict(ref.state_dict())
        x, y = (t.cuda() for t in _batch())
        expected = ref(x, y)
        expected.backward()
        parallelize_module(model, mesh, {"head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
        with loss_parallel():
            (site,) = cce_inductor.explain(model, x, y).sites
        assert site.status == "rewritten" and "triton path" in site.details["mode"], site
        loss, code = _compiled_step(model, x, y, rank)
        assert VOCAB_OP in code
        _check(_rel(_full(loss), expected), 1e-5, "loss")
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            _check(_rel(_full(p.grad), q.grad), 1e-5, f"grad of {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="needs NCCL")
def test_gpu_tensor_parallel_head_world_size_one():
    torch.multiprocessing.spawn(_gpu_worker, args=(_free_port(),), nprocs=1, join=True)


def test_redistribute_and_to_local_as_older_dynamo_records_them():
    """torch 2.11's Dynamo records DTensor.redistribute / to_local as calls of on-the-fly functions
    named prim_redistribute / prim_to_local; newer torch as method calls: both are recognized."""
    from torch.fx import Graph

    from cce_inductor.passes.tensor_parallel import _dtensor_method

    def prim_redistribute(x):
        return x

    def prim_to_local(x):
        return x

    g = Graph()
    x = g.placeholder("x")
    nodes = [g.call_function(prim_redistribute, (x,)), g.call_function(prim_to_local, (x,)),
             g.call_method("redistribute", (x,)), g.call_method("to_local", (x,)), g.call_function(torch.neg, (x,))]
    assert [_dtensor_method(n) for n in nodes] == ["redistribute", "to_local", "redistribute", "to_local", None]

"""linear_token_stats (per-token logprob, entropy, argmax, lse) on the torch path, its custom ops, and
the class weights and z-loss of linear_cross_entropy; the Triton kernels are tested in
tests/kernels/test_token_stats_kernels.py.

Values and gradients are held against the float64 definition (``token_stats.naive_token_stats``,
``F.cross_entropy`` on float64 logits) on odd shapes (N = 37, D = 13, V = 101), with ignored
targets, peaked and flat softmaxes, bias, softcap, temperature (a number and a learnable tensor),
shift and a transposed classifier.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cce_inductor import linear_cross_entropy, linear_token_stats, ops
from cce_inductor.token_stats import TokenStats, naive_token_stats

FIELDS = TokenStats._fields
FLOAT32_TOL = 1e-5  # norm-wise relative, as the kernels' cases (tests/kernels/kernel_cases.py)


@dataclass(frozen=True)
class Case:
    name: str
    n: int = 37
    d: int = 13
    v: int = 101
    batch: int = 0  # > 0: e is (batch, n, d)
    bias: bool = False
    softcap: float | None = None
    temperature: float | str | None = None  # "tensor": a learnable 0-dim tensor; "per_token": (..., 1)
    shift: int = 0
    ignore_index: int = -100
    n_ignored: int = 4
    scale: float = 1.0  # logit scale: large = peaked softmax, small = flat
    transpose_c: bool = False


CASES = [
    Case("plain"),
    Case("peaked", scale=8.0),
    Case("flat", scale=0.01),
    Case("bias", bias=True),
    Case("softcap", softcap=2.0, scale=3.0),
    Case("temperature", temperature=0.7, bias=True),
    Case("softcap_temperature", softcap=3.0, temperature=1.7, scale=2.0),
    Case("learnable_temperature", temperature="tensor", bias=True),
    Case("per_token_temperature", temperature="per_token", batch=2, n=11, shift=1),
    Case("shift_3d", batch=2, n=19, shift=1, bias=True),
    Case("ignore_is_a_class", ignore_index=7),
    Case("transposed_c", transpose_c=True, scale=2.0),
]


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """(e, c, targets, bias, temperature) in ``dtype``; c a transposed view where the case says."""
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.n) if case.batch else (case.n,)
    e = torch.randn(*shape, case.d, generator=g, dtype=torch.float64) * case.scale
    c = torch.randn(case.v, case.d, generator=g, dtype=torch.float64) / math.sqrt(case.d)
    b = torch.randn(case.v, generator=g, dtype=torch.float64) if case.bias else None
    y = torch.randint(0, case.v, shape, generator=g).view(-1)
    y[torch.randperm(y.numel(), generator=g)[: case.n_ignored]] = case.ignore_index
    y = y.view(shape).to(device)
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    e, c, b = cast(e), cast(c), cast(b)
    if case.transpose_c:
        c = c.t().contiguous().t()
    temperature = case.temperature
    if temperature == "tensor":
        temperature = torch.tensor(1.3, device=device)
    elif temperature == "per_token":
        temperature = (torch.rand(*shape, 1, generator=g) + 0.5).to(device)
    return e, c, y, b, temperature


def run(fn, e, c, y, b, temperature, seed=1):
    """All four fields of fn(...) and the gradients of a random weighting of the differentiable ones
    w.r.t. e, c, bias and a tensor temperature."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (e, c, b)]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().clone().requires_grad_()
        leaves.append(temperature)
    out = fn(leaves[0], leaves[1], y, leaves[2], temperature)
    g = torch.Generator().manual_seed(seed)
    scalar = sum((getattr(out, f).double() * torch.randn(getattr(out, f).shape, generator=g,
                                                         dtype=torch.float64).to(e.device)).sum()
                 for f in ("logprob", "entropy", "lse"))
    scalar.backward()
    return out, [t.grad for t in leaves if t is not None]


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if b.numel() == 0:
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def ours_fn(case: Case, impl: str, **kw):
    return lambda e, c, y, b, t: linear_token_stats(
        e, c, y, b, ignore_index=case.ignore_index, softcap=case.softcap, temperature=t, shift=case.shift,
        entropy=True, argmax=True, lse=True, impl=impl, **kw)


def gold_fn(case: Case, compute_dtype=torch.float64):
    def fn(e, c, y, b, t):
        up = lambda x: None if x is None else x.to(compute_dtype)  # noqa: E731
        return naive_token_stats(up(e), up(c), y, up(b), ignore_index=case.ignore_index, softcap=case.softcap,
                                 temperature=up(t) if isinstance(t, torch.Tensor) else t, shift=case.shift,
                                 compute_dtype=compute_dtype)
    return fn


def gold_logits(case: Case, e, c, b, t):
    if case.shift:
        e = e[..., : -case.shift, :]
        t = t[..., : -case.shift, :] if isinstance(t, torch.Tensor) and t.dim() > 1 else t
    z = e.double() @ c.double().T + (0 if b is None else b.double())
    if case.softcap is not None:
        z = case.softcap * torch.tanh(z / case.softcap)
    if t is not None:
        z = z / (t.double() if isinstance(t, torch.Tensor) else t)
    return z


def check_argmax(case: Case, argmax, e, c, b, t, dtype):
    """The arg-max is a largest logit of the float64 logits, up to the rounding of the logits the
    op compares (its compute dtype; 16-bit inputs: the input dtype)."""
    z = gold_logits(case, e, c, b, t)
    top = z.amax(-1)
    picked = z.gather(-1, argmax.to(z.device)[..., None])[..., 0]
    ulp = 1e-6 if dtype == torch.float32 else 2.0**-7
    assert (top - picked <= ulp * top.abs().clamp_min(1.0)).all()


def check(case: Case, impl: str, dtype=torch.float32, device="cpu", **kw):
    e, c, y, b, t = make_inputs(case, dtype, device)
    out, grads = run(ours_fn(case, impl, **kw), e, c, y, b, t)
    up = lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    gold, gold_grads = run(gold_fn(case), *map(up, (e, c, y, b, t)))
    shape = y[..., case.shift:].shape
    assert out.logprob.dtype == out.entropy.dtype == out.lse.dtype == torch.float32 and out.argmax.dtype == torch.int64
    assert all(getattr(out, f).shape == shape for f in FIELDS)
    valid = y[..., case.shift:] != case.ignore_index
    assert torch.equal(out.logprob[~valid], torch.zeros_like(out.logprob[~valid]))
    check_argmax(case, out.argmax, e, c, b, t, dtype)
    names = ["logprob", "entropy", "lse", "de", "dc"] + (["dbias"] if b is not None else []) \
        + (["dtemp"] if isinstance(t, torch.Tensor) else [])
    ours = [out.logprob, out.entropy, out.lse, *grads]
    golds = [gold.logprob, gold.entropy, gold.lse, *gold_grads]
    errs = {n: rel(a, g) for n, a, g in zip(names, ours, golds)}
    if dtype == torch.float32:
        bad = {n: x for n, x in errs.items() if not x <= FLOAT32_TOL}
        assert not bad, f"{case.name}: {errs}"
    else:  # no worse than the same definition computed in the input dtype
        theirs_out, theirs_grads = run(gold_fn(case, compute_dtype=dtype), e, c, y, b, t)
        theirs = [theirs_out.logprob, theirs_out.entropy, theirs_out.lse, *theirs_grads]
        bars = {n: rel(a, g) for n, a, g in zip(names, theirs, golds)}
        bad = {n: (errs[n], bars[n]) for n in names if not errs[n] <= 1.25 * bars[n] + 1e-6}
        assert not bad, f"{case.name} {dtype}: {bad}"
    return errs


# ----------------------------------------------------------------------------- the torch path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_path_matches_float64(case):
    check(case, "torch")


BF16_CASES = [c for c in CASES if c.name in ("plain", "softcap_temperature", "learnable_temperature")]


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_torch_path_bfloat16_no_worse_than_torch(case):
    check(case, "torch", torch.bfloat16)


def test_logprob_is_minus_the_unreduced_cross_entropy():
    e, c, y, b, _ = make_inputs(Case("x", bias=True, softcap=4.0, batch=2, n=9, shift=1))
    ours = linear_token_stats(e, c, y, b, softcap=4.0, shift=1).logprob
    loss = linear_cross_entropy(e, c, y, b, softcap=4.0, shift=1, reduction="none")
    torch.testing.assert_close(ours, -loss, rtol=1e-6, atol=1e-6)


def test_argmax_ties_go_to_the_first_index():
    """Duplicate classifier rows give exact ties, in every precision and across vocabulary chunks."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5, 8, generator=g)
    c = torch.randn(300, 8, generator=g) * 0.1
    c[17] = c[250] = e[0] * 3
    c[4] = c[5] = e[1] * 3
    for dtype in (torch.float32, torch.bfloat16):
        am = linear_token_stats(e.to(dtype), c.to(dtype), logprob=False, argmax=True, impl="torch").argmax
        assert am[0] == 17 and am[1] == 4
        torch.testing.assert_close(am, (e.to(dtype) @ c.to(dtype).T).argmax(-1))


def test_fields_not_asked_for_are_none_and_targets_may_be_none():
    e, c, y, _, _ = make_inputs(Case("x"))
    out = linear_token_stats(e, c, entropy=True, logprob=False)
    assert out.logprob is None and out.argmax is None and out.lse is None
    gold = naive_token_stats(e.double(), c.double())
    torch.testing.assert_close(out.entropy.double(), gold.entropy, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("field", ["logprob", "entropy", "lse"])
def test_each_field_alone_has_its_gradient(field):
    """One output requested and differentiated: the backward forms only its term."""
    e, c, y, b, _ = make_inputs(Case("x", bias=True, scale=2.0))
    leaves = [t.clone().requires_grad_() for t in (e, c, b)]
    kw = dict(logprob=field == "logprob", entropy=field == "entropy", lse=field == "lse")
    getattr(linear_token_stats(*leaves[:2], y, leaves[2], **kw), field).sum().backward()
    gold_leaves = [t.double().requires_grad_() for t in (e, c, b)]
    getattr(naive_token_stats(*gold_leaves[:2], y, gold_leaves[2]), field).sum().backward()
    for ours, gold in zip(leaves, gold_leaves):
        assert rel(ours.grad, gold.grad) <= FLOAT32_TOL


def test_unused_outputs_and_argmax_get_no_gradient():
    e, c, y, _, _ = make_inputs(Case("x"))
    e.requires_grad_()
    out = linear_token_stats(e, c, y, entropy=True, argmax=True)
    assert not out.argmax.requires_grad
    out.logprob.sum().backward()  # entropy computed, not used
    e2 = e.detach().clone().requires_grad_()
    linear_token_stats(e2, c, y).logprob.sum().backward()
    torch.testing.assert_close(e.grad, e2.grad)


def test_opcheck():
    e, c, y, b, _ = make_inputs(Case("x", n=9, v=13, bias=True))
    e.requires_grad_(), c.requires_grad_(), b.requires_grad_()
    for args in ((e, c, y, b, -100, 2.0, 0.5, True, True, True, True, "torch"),
                 (e, c, None, None, -100, 0.0, 1.0, False, True, False, False, "torch")):
        torch.library.opcheck(torch.ops.cce_inductor.token_stats_forward.default, args)
    lp, h, am, lse, _, kept = torch.ops.cce_inductor.token_stats_forward(e, c, y, b, -100, 2.0, 0.5, True, True,
                                                                         True, False, "torch", -1)
    assert kept.shape == (0, 13)  # the torch path keeps no logits
    grads = [torch.randn(9, dtype=t.dtype) for t in (lp, h, lse)]
    bw = (e.detach(), c.detach(), y, b.detach(), lse.detach(), h.detach(), *grads, -100, 2.0, 0.5, "torch",
          True, True, True)
    torch.library.opcheck(torch.ops.cce_inductor.token_stats_backward.default, bw)
    bw_some = (e.detach(), c.detach(), None, None, lse.detach(), None, None, None, grads[2], -100, 0.0, 1.0, "torch",
               True, False, False)
    torch.library.opcheck(torch.ops.cce_inductor.token_stats_backward.default, bw_some)


def test_compiled_matches_eager():
    """Under torch.compile (fullgraph, AOTAutograd through the ops' fakes and autograd), an RL-style
    loss gives eager's values and gradients."""
    case = Case("x", batch=2, n=9, bias=True, shift=1)
    e, c, y, b, _ = make_inputs(case)
    adv = torch.randn(2, 8)

    def loss_fn(e, c, b, t):
        out = linear_token_stats(e, c, y, b, shift=1, temperature=t, entropy=True)
        mask = (y[:, 1:] != -100).float()
        return -((adv * out.logprob * mask).sum() / mask.sum()) - 0.01 * out.entropy.mean()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (e, c, b, torch.tensor(0.9))]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for ours, eager in zip(*results):
        torch.testing.assert_close(ours, eager)


def test_autocast_computes_in_the_autocast_dtype():
    e, c, y, _, _ = make_inputs(Case("x"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_token_stats(e, c, y, entropy=True)
    plain = linear_token_stats(e.bfloat16(), c.bfloat16(), y, entropy=True)
    assert torch.equal(ours.logprob, plain.logprob) and torch.equal(ours.entropy, plain.entropy)


def test_bad_inputs_raise_clearly():
    e, c, y, b, _ = make_inputs(Case("x"))
    with pytest.raises(ValueError, match="needs targets"):
        linear_token_stats(e, c)
    with pytest.raises(ValueError, match="at least one"):
        linear_token_stats(e, c, y, logprob=False)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_stats(e, c, y, temperature=0.0)
    with pytest.raises(NotImplementedError, match="softcap"):
        linear_token_stats(e, c, y, softcap=3.0, temperature=torch.tensor(2.0))
    with pytest.raises(ValueError, match="one per token"):
        linear_token_stats(e, c, y, temperature=torch.ones(c.shape[0]))
    with pytest.raises(ValueError, match="shape"):
        linear_token_stats(e, c, y[:-1])
    y_bad = y.clone()
    y_bad[0] = c.shape[0]
    with pytest.raises(ops.TargetOutOfRangeError):
        linear_token_stats(e, c, y_bad)


# ----------------------------------------------------------------------------- class weights and z-loss


WEIGHT_CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", bias=True),
    dict(reduction="none", label_smoothing=0.2),
    dict(reduction="mean", label_smoothing=0.1, bias=True, shift=1),
    dict(reduction="mean", softcap=3.0),
    dict(reduction="mean", ignore_index=7),
]


@pytest.mark.parametrize("kw", WEIGHT_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_class_weights_match_torch(kw):
    """F.cross_entropy(weight=w) of the float64 logits: per-token losses, sums, and "mean" over
    sum_i w[y_i] of the non-ignored tokens, label smoothing with weights included; gradients w.r.t.
    e, c and bias."""
    kw = dict(kw)
    with_bias, shift = kw.pop("bias", False), kw.pop("shift", 0)
    ignore_index = kw.get("ignore_index", -100)
    case = Case("w", batch=2, n=11, bias=with_bias, ignore_index=ignore_index, scale=2.0)
    e, c, y, b, _ = make_inputs(case)
    w = torch.rand(case.v, generator=torch.Generator().manual_seed(3)) + 0.1

    def gold(e, c, b):
        ee, yy = (e[:, :-shift], y[:, shift:]) if shift else (e, y)
        z = ee @ c.T + (0 if b is None else b)
        if kw.get("softcap"):
            z = kw["softcap"] * torch.tanh(z / kw["softcap"])
        args = {k: v for k, v in kw.items() if k != "softcap"}
        out = F.cross_entropy(z.flatten(0, 1), yy.flatten(), weight=w.double(), **args)
        return out.view(yy.shape) if kw["reduction"] == "none" else out

    leaves = [None if t is None else t.clone().requires_grad_() for t in (e, c, b)]
    ours = linear_cross_entropy(leaves[0], leaves[1], y, leaves[2], weight=w, shift=shift, **kw)
    gold_leaves = [None if t is None else t.double().requires_grad_() for t in (e, c, b)]
    ref = gold(*gold_leaves)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(ours.shape, dtype=torch.float64)
    (ours.double() * g).sum().backward()
    (ref * g).sum().backward()
    for a, r in zip(leaves, gold_leaves):
        if a is not None:
            assert rel(a.grad, r.grad) <= FLOAT32_TOL


def test_class_weights_errors():
    e, c, y, _, _ = make_inputs(Case("x"))
    with pytest.raises(NotImplementedError, match="softcap"):
        linear_cross_entropy(e, c, y, weight=torch.ones(c.shape[0]), softcap=3.0, label_smoothing=0.1)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(e, c, y, weight=torch.ones(c.shape[0] + 1))


def test_cross_entropy_plus_z_loss_matches_eager():
    """CE + z-loss (return_lse) and CE + accuracy, as eager code writes them from the logits."""
    e, c, y, b, _ = make_inputs(Case("z", batch=2, n=11, bias=True, scale=2.0))
    leaves = [t.clone().requires_grad_() for t in (e, c, b)]
    loss, lse = linear_cross_entropy(*leaves[:2], y, leaves[2], shift=1, return_lse=True)
    valid = y[:, 1:] != -100
    total = loss + 1e-4 * (lse[valid] ** 2).mean()
    total.backward()
    acc = (linear_token_stats(*leaves[:2], y, leaves[2], shift=1, logprob=False, argmax=True).argmax
           == y[:, 1:])[valid].float().mean()

    gold_leaves = [t.double().requires_grad_() for t in (e, c, b)]
    z = gold_leaves[0][:, :-1] @ gold_leaves[1].T + gold_leaves[2]
    ref = F.cross_entropy(z.flatten(0, 1), y[:, 1:].flatten()) + 1e-4 * (z.logsumexp(-1)[valid] ** 2).mean()
    ref.backward()
    torch.testing.assert_close(total.double(), ref, rtol=1e-6, atol=1e-7)
    for a, r in zip(leaves, gold_leaves):
        assert rel(a.grad, r.grad) <= FLOAT32_TOL
    assert acc == (z.argmax(-1) == y[:, 1:])[valid].float().mean()


# ----------------------------------------------------------------------------- the benchmark


def test_rl_bench_small_runs_on_cpu(tmp_path, monkeypatch):
    # benchmarks/ is a top-level folder of the repository, not part of the installed package
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import rl_bench

    out = tmp_path / "rl.json"
    rl_bench.main(["--small", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["device"] and data["versions"]["torch"] and data["date"]
    methods = {r["method"]: r for r in data["results"]}
    assert set(methods) == {"cce_inductor", "cce_inductor_quarter", "cce_inductor_exact", "torch.compile"}
    assert all(r["status"] == "ok" and r["fwdbwd_ms"] > 0 for r in methods.values())
    # the two methods compute the same loss and gradients
    assert methods["cce_inductor"]["max_rel_err_vs_torch"] < 1e-4

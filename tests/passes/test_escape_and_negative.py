"""Where the rewrite must keep semantics it cannot drop, and where it must not fire.

* Logits that escape -- returned from the compiled region, used for argmax, or by another loss
  term -- keep their values and their gradients; the loss still goes through the op.
  ``detach_logits=True`` returns them detached (same values, no grad).
* Negative cases (class weights with a softcap and label smoothing, probability targets, an unknown op in between, a per-token
  addition, an einsum head, an in-place write, a lossy cast, two softcaps, float64) are left
  alone: the op is absent, results equal eager's, explain() says why.
* Reduced-precision inputs (bfloat16 weights, autocast) are checked against a float64 gold from
  the same rounded inputs: the rewrite's error must not exceed eager's by more than bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch._inductor.utils import run_and_get_code

import cce_inductor
from passes_helpers import (  # fresh_dynamo: an autouse fixture
    fresh_dynamo,
    assert_close,
    assert_grads_close,
    assert_outputs_close,
    compiled_step,
    nxv_buffers,
    run_step,
    uses_op,
)

B, T, D, V = 2, 7, 8, 97


def _setup(bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(D, V, bias=bias)
    h = torch.randn(B, T, D, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    return lin, h, y


# ----------------------------------------------------------------------------- escaping logits


def test_returned_logits_keep_values_and_gradients():
    lin, h, y = _setup()

    def fn(h, y):
        z = lin(h)
        return F.cross_entropy(z.view(-1, V), y.view(-1)), z

    params = [h, *lin.parameters()]

    def step(fn):
        # backpropagate through both the loss and the returned logits
        loss, z = fn(h, y)
        return (loss, z), torch.autograd.grad(loss + 0.1 * z.square().sum(), params)

    expected, expected_grads = step(fn)
    compiled = torch.compile(fn, backend="cce", fullgraph=True)
    (out, grads), code = run_and_get_code(lambda: step(compiled))
    assert uses_op("\n".join(code))
    assert_outputs_close(out, expected)
    assert out[1].requires_grad
    assert_grads_close(grads, expected_grads, ["h", "weight", "bias"])

    (site,) = cce_inductor.explain(fn, h, y).sites  # formed only if read
    assert site.status == "rewritten" and site.deferred == ["z"] and not site.remaining
    with cce_inductor.enable(defer_logits=False):  # they stay, and explain() says what they cost
        (site,) = cce_inductor.explain(fn, h, y).sites
    assert [r.node for r in site.remaining] == ["z"]
    assert "requires_grad" in site.remaining[0].why and "detach_logits" in site.remaining[0].why


def test_detach_logits_returns_detached_logits():
    lin, h, y = _setup()

    def fn(h, y):
        z = lin(h)
        return F.cross_entropy(z.view(-1, V), y.view(-1)), z

    params = [h, *lin.parameters()]
    expected, expected_grads = run_step(fn, params, (h, y))
    for kwargs in (dict(options={"detach_logits": True}), dict(enable={"detach_logits": True})):
        torch._dynamo.reset()
        out, grads, code = compiled_step(fn, params, (h, y), **kwargs)
        assert uses_op(code)
        assert not out[1].requires_grad and out[1].grad_fn is None
        assert_outputs_close(out, expected)
        assert_grads_close(grads, expected_grads, ["h", "weight", "bias"])
    with cce_inductor.enable(detach_logits=True, defer_logits=False):
        report = cce_inductor.explain(fn, h, y)
    assert "detached" in report.sites[0].remaining[0].why


def test_argmax_and_z_loss_users_keep_working():
    lin, h, y = _setup()

    def fn(h, y):
        z = lin(h)
        ce = F.cross_entropy(z.view(-1, V), y.view(-1))
        z_loss = torch.logsumexp(z, dim=-1).square().mean()
        accuracy = (z.argmax(-1) == y).float().mean()
        return ce + 1e-3 * z_loss, accuracy

    params = [h, *lin.parameters()]
    expected, expected_grads = run_step(fn, params, (h, y))
    out, grads, code = compiled_step(fn, params, (h, y))
    # issue 30: the loss, the z-loss and the accuracy come from one linear_token_stats call
    assert "cce_inductor.token_stats_forward" in code and "cce_inductor.token_stats_backward" in code
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, ["h", "weight", "bias"])
    [site] = cce_inductor.explain(fn, h, y).sites
    assert (site.kind, site.status, site.remaining) == ("token_stats", "rewritten", [])


def test_logits_not_returned_leave_no_nxv_buffer_in_backward():
    """The point of the rewrite: neither forward nor backward allocates N x V."""
    lin, h, y = _setup()

    def fn(h, y):
        return F.cross_entropy(lin(h).float().view(-1, V), y.view(-1))

    _, _, code = compiled_step(fn, [h, *lin.parameters()], (h, y))
    assert nxv_buffers(code, B * T, V) == []
    torch._dynamo.reset()
    _, _, plain = compiled_step(fn, [h, *lin.parameters()], (h, y), backend="inductor")
    assert nxv_buffers(plain, B * T, V), "the check must see the logits of the plain compile"


# ----------------------------------------------------------------------------- negative cases


def _negative_weight_with_softcap_and_smoothing(lin, h, y):
    """Class weights are rewritten (test_class_weights.py), but not with a softcap and label
    smoothing together: the op has no closed form for that smoothing term."""
    w = torch.rand(V) + 0.5

    def fn(h, y):
        z = 5.0 * torch.tanh(lin(h) / 5.0)
        return F.cross_entropy(z.view(-1, V), y.view(-1), weight=w, label_smoothing=0.1)

    return fn, "label smoothing and a softcap"


def _negative_probability_targets(lin, h, y):
    p = torch.softmax(torch.randn(B * T, V), -1)
    return lambda h, y: F.cross_entropy(lin(h).view(-1, V), p), "probability"


def _negative_unknown_op(lin, h, y):
    return lambda h, y: F.cross_entropy(torch.relu(lin(h)).view(-1, V), y.view(-1)), "relu"


def _negative_per_token_addition(lin, h, y):
    noise = torch.randn(B, T, V)  # one value per token and class: not a bias
    return lambda h, y: F.cross_entropy((lin(h) + noise).view(-1, V), y.view(-1)), "not a bias"


def _negative_einsum_head(lin, h, y):
    def fn(h, y):
        z = torch.einsum("btd,vd->btv", h, lin.weight) + lin.bias
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    return fn, "einsum projection"


def _negative_in_place_write(lin, h, y):
    def fn(h, y):
        z = lin(h)
        z.div_(2.0)
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    return fn, "writes in place"


def _negative_lossy_cast(lin, h, y):
    return lambda h, y: F.cross_entropy(lin(h).half().view(-1, V), y.view(-1)), "loses precision"


def _negative_two_softcaps(lin, h, y):
    def fn(h, y):
        z = 5 * torch.tanh(lin(h) / 5)
        z = 3 * torch.tanh(z / 3)
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    return fn, "more than one tanh"


def _negative_float64(lin, h, y):
    lin64 = nn.Linear(D, V).double()
    return lambda h, y: F.cross_entropy(lin64(h.double()).view(-1, V), y.view(-1)), "float64"


NEGATIVE = {
    name[len("_negative_") :]: fn for name, fn in globals().items() if name.startswith("_negative_")
}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_negative_case_is_left_alone(name):
    lin, h, y = _setup()
    fn, reason = NEGATIVE[name](lin, h, y)
    params = [h, *lin.parameters()] if name != "float64" else [h]
    expected, expected_grads = run_step(fn, params, (h, y))
    out, grads, code = compiled_step(fn, params, (h, y))
    assert "lce_forward" not in code
    rtol = 1e-3 if name == "lossy_cast" else 1e-5  # Inductor's float16 softmax differs from eager's
    assert_outputs_close(out, expected, rtol=rtol)
    assert_grads_close(grads, expected_grads, [f"param {i}" for i in range(len(params))], rtol=rtol)
    (site,) = cce_inductor.explain(fn, h, y).sites
    assert site.status == "skipped" and reason in site.reason


def test_skipped_site_keeps_projection_for_rewritten_neighbour():
    """Two losses on one projection, one rewritable: the other keeps the logits alive."""
    lin, h, y = _setup()
    p = torch.softmax(torch.randn(B * T, V), -1)

    def fn(h, y):
        z = lin(h).view(-1, V)
        return F.cross_entropy(z, y.view(-1)) + F.cross_entropy(z, p)

    params = [h, *lin.parameters()]
    expected, expected_grads = run_step(fn, params, (h, y))
    out, grads, code = compiled_step(fn, params, (h, y))
    assert uses_op(code)
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, ["h", "weight", "bias"])
    rewritten, skipped = cce_inductor.explain(fn, h, y).sites
    assert rewritten.status == "rewritten" and skipped.status == "skipped"
    assert any("cross_entropy" in r.why for r in rewritten.remaining)


# ----------------------------------------------------------------------------- reduced precision


def _gold_error(loss, grads, gold_loss, gold_grads):
    errs = [abs(loss.double() - gold_loss).item() / abs(gold_loss).item()]
    for g, gg in zip(grads, gold_grads):
        errs.append(((g.double() - gg).norm() / gg.norm()).item())
    return errs


def _gold(lin_w, lin_b, h, y, rounding):
    """float64 loss and gradients from the inputs rounded as the model sees them."""
    w = lin_w.detach().to(rounding).double().requires_grad_()
    b = lin_b.detach().to(rounding).double().requires_grad_()
    x = h.detach().to(rounding).double().requires_grad_()
    loss = F.cross_entropy((x @ w.T + b).view(-1, V), y.view(-1))
    return loss.detach(), torch.autograd.grad(loss, [x, w, b])


def test_autocast_bf16_projection_loss_outside():
    lin, h, y = _setup()

    def fn(h, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = lin(h)
        return F.cross_entropy(z.float().view(-1, V), y.view(-1))

    params = [h, *lin.parameters()]
    expected, expected_grads = run_step(fn, params, (h, y))
    out, grads, code = compiled_step(fn, params, (h, y))
    assert uses_op(code)
    gold, gold_grads = _gold(lin.weight, lin.bias, h, y, torch.bfloat16)
    eager_err = _gold_error(expected, expected_grads, gold, gold_grads)
    ours_err = _gold_error(out, grads, gold, gold_grads)
    for ours, eager in zip(ours_err, eager_err):
        assert ours <= 2 * eager + 2**-8, (ours_err, eager_err)
    assert [g.dtype for g in grads] == [g.dtype for g in expected_grads]


def test_bf16_model_upcast_logits():
    torch.manual_seed(0)
    lin = nn.Linear(D, V).bfloat16()
    h = torch.randn(B, T, D, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, V, (B, T))

    def fn(h, y):
        return F.cross_entropy(lin(h).float().view(-1, V), y.view(-1))

    params = [h, *lin.parameters()]
    expected, expected_grads = run_step(fn, params, (h, y))
    out, grads, code = compiled_step(fn, params, (h, y))
    assert uses_op(code)
    assert out.dtype == expected.dtype == torch.float32
    gold, gold_grads = _gold(lin.weight, lin.bias, h, y, torch.bfloat16)
    eager_err = _gold_error(expected, expected_grads, gold, gold_grads)
    ours_err = _gold_error(out, grads, gold, gold_grads)
    for ours, eager in zip(ours_err, eager_err):
        assert ours <= 2 * eager + 2**-8, (ours_err, eager_err)


def test_loss_dtype_follows_the_loss_call():
    """Without an upcast, cross_entropy of bfloat16 logits returns bfloat16: so does the rewrite."""
    torch.manual_seed(0)
    lin = nn.Linear(D, V).bfloat16()
    h = torch.randn(B, T, D, dtype=torch.bfloat16)
    y = torch.randint(0, V, (B, T))

    def fn(h, y):
        return F.cross_entropy(lin(h).view(-1, V), y.view(-1))

    out, _, code = compiled_step(fn, list(lin.parameters()), (h, y))
    assert uses_op(code) and out.dtype == torch.bfloat16
    assert_close(out.float(), fn(h, y).float(), rtol=2**-7)

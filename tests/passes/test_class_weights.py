"""Class weights (``weight=``) of cross_entropy / nll_loss are rewritten to the op's ``weight=``: loss
and gradients equal eager's (float64 reference, every reduction, ignored targets, label smoothing,
a bias), and no N x V buffer is left in the generated code."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cce_inductor

from passes_helpers import compiled_step, fresh_dynamo, nxv_buffers, run_step, uses_op  # noqa: F401

B, T, D, V = 2, 9, 12, 53


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(D, V)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(V, D, generator=g) / 2)
        lin.bias.copy_(torch.randn(V, generator=g))
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    w = torch.rand(V, generator=g) * 2 + 0.1  # (torch's nll_loss takes no gradient for it)
    return lin, h, y, w


def _close(a, b, what):
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert err <= 1e-5, (what, err)


def _program(head, form):
    def fn(h, y, w):
        z = head(h).view(-1, V)
        if form == "nll_loss":
            return F.nll_loss(F.log_softmax(z, -1), y.view(-1), weight=w)
        if form == "smoothing":
            return F.cross_entropy(z, y.view(-1), weight=w, label_smoothing=0.2)
        return F.cross_entropy(z, y.view(-1), weight=w, reduction=form)

    return fn


@pytest.mark.parametrize("form", ["mean", "sum", "none", "smoothing", "nll_loss"])
def test_class_weights_are_rewritten_and_equal_eager(form):
    lin, h, y, w = _setup()
    fn = _program(lin, form)
    out, grads, code = compiled_step(fn, [h, lin.weight, lin.bias], (h, y, w))
    assert uses_op(code) and nxv_buffers(code, B * T, V) == []
    double = nn.Linear(D, V).double()
    double.load_state_dict(lin.state_dict())
    h64 = h.detach().double().requires_grad_()
    ref_out, ref_grads = run_step(_program(double, form), [h64, double.weight, double.bias], (h64, y, w.double()))
    _close(out, ref_out, "loss")
    for g, r, name in zip(grads, ref_grads, ("h", "W", "b")):
        _close(g, r, name)
    (site,) = cce_inductor.explain(fn, h, y, w).sites
    assert site.status == "rewritten" and "class_weight" in site.details

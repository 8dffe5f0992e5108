"""Grad modes and higher-order-op regions around a site.

* A projection under ``torch.no_grad()`` whose parameters require grad (an evaluation loop) is
  rewritten to the op's forward only, wherever the no_grad block ends: the loss equals eager's and
  requires no grad. Where something after the projection needs a gradient (a temperature applied
  with grad enabled), or the projection runs under ``inference_mode`` inside the compiled region
  and the loss outside it, the site is left alone and explain() says why. (A whole graph under
  no_grad or inference_mode is tested on a Hugging Face model in test_hf_models.py.)
* A head and loss inside ``torch.utils.checkpoint`` (Dynamo's ``tag_activation_checkpoint``
  region, recomputed by AOTAutograd in the backward) are rewritten there; a region boundary
  between the head and the loss leaves the site alone, with the reason; so does a loss in the body
  of another higher-order op (a torch.cond branch), which the rewrite does not enter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cce_inductor
from passes_helpers import (  # fresh_dynamo: an autouse fixture
    fresh_dynamo,
    assert_grads_close,
    assert_outputs_close,
    compiled_step,
    nxv_buffers,
    run_step,
    uses_op,
)

B, T, D, V = 2, 7, 8, 97


def _setup(seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(D, V)
    temp = nn.Parameter(torch.tensor(1.3))
    h = torch.randn(B, T, D, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    return lin, temp, h, y


# ----------------------------------------------------------------------------- grad modes


def _projection_under_no_grad(lin, temp):
    def fn(h, y):
        with torch.no_grad():
            z = lin(h)
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    return fn


def _loss_under_no_grad(lin, temp):
    def fn(h, y):
        z = lin(h)
        with torch.no_grad():
            loss = F.cross_entropy(z.view(-1, V), y.view(-1))
        return loss + 0 * h.sum()  # something to differentiate

    return fn


REWRITTEN = {"projection_under_no_grad": _projection_under_no_grad, "loss_under_no_grad": _loss_under_no_grad}


@pytest.mark.parametrize("name", sorted(REWRITTEN))
def test_no_grad_site_runs_the_forward_only(name):
    lin, temp, h, y = _setup()
    fn = REWRITTEN[name](lin, temp)
    params = [h, *lin.parameters()]
    expected, expected_grads = run_step(fn, params, (h, y))
    out, grads, code = compiled_step(fn, params, (h, y))
    assert "cce_inductor.lce_forward" in code and "lce_backward" not in code
    assert nxv_buffers(code, B * T, V) == []
    assert out.requires_grad == expected.requires_grad
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, ["h", "weight", "bias"])
    (site,) = cce_inductor.explain(fn, h, y).sites
    assert site.status == "rewritten" and (name == "loss_under_no_grad" or "no_grad" in site.details["grad"])


def _temperature_after_no_grad(lin, temp):
    def fn(h, y):
        with torch.no_grad():
            z = lin(h)
        return F.cross_entropy((z * temp).view(-1, V), y.view(-1))

    return fn, "needs a gradient"


def _projection_under_inference_mode(lin, temp):
    def fn(h, y):
        with torch.inference_mode():
            z = lin(h)
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    return fn, "inference_mode"


LEFT_ALONE = {"temperature_after_no_grad": _temperature_after_no_grad,
              "projection_under_inference_mode": _projection_under_inference_mode}


@pytest.mark.parametrize("name", sorted(LEFT_ALONE))
def test_grad_mode_mismatch_is_left_alone(name):
    lin, temp, h, y = _setup()
    fn, reason = LEFT_ALONE[name](lin, temp)
    params = [temp, *lin.parameters()]
    expected, expected_grads = run_step(fn, params, (h, y))
    out, grads, code = compiled_step(fn, params, (h, y))
    assert "lce_forward" not in code
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, ["temp", "weight", "bias"])
    (site,) = cce_inductor.explain(fn, h, y).sites
    assert site.status == "skipped" and reason in site.reason


# ----------------------------------------------------------------------------- checkpoint regions


def test_head_and_loss_inside_checkpoint_are_rewritten():
    lin, _, h, y = _setup()

    def head_and_loss(x, y):
        return F.cross_entropy(lin(x).view(-1, V), y.view(-1))

    def fn(h, y):
        return checkpoint(head_and_loss, torch.tanh(h), y, use_reentrant=False)

    params = [h, *lin.parameters()]
    expected, expected_grads = run_step(fn, params, (h, y))
    out, grads, code = compiled_step(fn, params, (h, y))
    assert uses_op(code)
    assert nxv_buffers(code, B * T, V) == []
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, ["h", "weight", "bias"])
    (site,) = cce_inductor.explain(fn, h, y).sites
    assert site.status == "rewritten" and site.region == "a torch.utils.checkpoint region"


def _head_inside(lin):
    def fn(h, y):
        z = checkpoint(lin, h, use_reentrant=False)
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    return fn, "come out of a torch.utils.checkpoint region"


def _loss_inside(lin):
    def loss(z, y):
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    def fn(h, y):
        return checkpoint(loss, lin(h), y, use_reentrant=False)

    return fn, "enter a torch.utils.checkpoint region from outside"


BOUNDARIES = {"head_inside": _head_inside, "loss_inside": _loss_inside}


@pytest.mark.parametrize("name", sorted(BOUNDARIES))
def test_checkpoint_boundary_between_head_and_loss_is_reported(name):
    lin, _, h, y = _setup()
    fn, reason = BOUNDARIES[name](lin)
    (site,) = cce_inductor.explain(fn, h, y).sites
    assert site.status == "skipped" and reason in site.reason


@pytest.mark.skipif(not hasattr(torch, "cond"), reason="torch.cond is missing")
def test_loss_in_a_cond_branch_is_reported():
    lin, _, h, y = _setup()

    def fn(h, y, flag):
        def head_and_loss(h, y):
            return F.cross_entropy(lin(h).view(-1, V), y.view(-1)).reshape(1)

        def nothing(h, y):
            return (h.sum() * 0).reshape(1)

        return torch.cond(flag, head_and_loss, nothing, (h, y))

    with torch.no_grad():
        try:
            (site,) = cce_inductor.explain(fn, h.detach(), y, torch.tensor(True)).sites
        except torch._dynamo.exc.UncapturedHigherOrderOpError as error:
            pytest.skip(f"this torch's Dynamo does not capture this torch.cond: {error}")
    assert site.status == "skipped" and site.region == "a torch.cond branch"
    assert "does not enter a torch.cond branch" in site.reason

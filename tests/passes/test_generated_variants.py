"""Property test: loss code assembled from the styles real models use is rewritten and exact.

Hypothesis draws a combination of projection form, bias, scaling, softcap, cast, label-shift
style, logits layout and reduction, builds the loss function, compiles it with backend="cce" and
checks the op is in the generated code, no N x V buffer is allocated, and the loss and gradients
equal eager's. Examples are derandomized so CI sees the same ones on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from passes_helpers import assert_grads_close, assert_outputs_close, compiled_step, nxv_buffers, run_step, uses_op  # noqa: E402

B, T, D, V = 2, 7, 8, 97


@dataclass(frozen=True)
class Variant:
    projection: str  # "linear" | "matmul_t" | "at_T"
    bias: bool
    scale: object  # None | float | "parameter"
    softcap: object  # None | float
    cast: object  # None | "float" | "to"
    shift: str  # "none" | "logits" (logits[..., :-1, :] + labels[..., 1:]) | "labels" (pad + slice)
    layout: str  # "view" | "reshape" | "flatten" | "transpose" (class dim 1)
    reduction: str  # "mean" | "sum" | "none" (then masked mean)


variants = st.builds(
    Variant,
    projection=st.sampled_from(["linear", "matmul_t", "at_T"]),
    bias=st.booleans(),
    scale=st.sampled_from([None, 0.5, "parameter"]),
    softcap=st.sampled_from([None, 4.0]),
    cast=st.sampled_from([None, "float", "to"]),
    shift=st.sampled_from(["none", "logits", "labels"]),
    layout=st.sampled_from(["view", "reshape", "flatten", "transpose"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)


def build(v: Variant):
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(V, D, generator=g) / 3)
    b = nn.Parameter(torch.randn(V, generator=g) / 3) if v.bias else None
    temp = nn.Parameter(torch.tensor(0.8)) if v.scale == "parameter" else None
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=g)
    y[1, 3] = -100

    def fn(h, labels):
        if v.projection == "linear":
            z = F.linear(h, w, b)
        else:
            z = (torch.matmul(h, w.t()) if v.projection == "matmul_t" else h @ w.T)
            if b is not None:
                z = z + b
        if v.scale is not None:
            z = z * (temp if v.scale == "parameter" else v.scale)
        if v.softcap is not None:
            z = torch.tanh(z / v.softcap) * v.softcap
        if v.cast == "float":
            z = z.float()
        elif v.cast == "to":
            z = z.to(torch.float32)
        if v.shift == "logits":
            z = z[..., :-1, :].contiguous()
            labels = labels[..., 1:].contiguous()
        elif v.shift == "labels":
            labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        if v.layout == "transpose":
            logits, targets = z.transpose(1, 2), labels
        elif v.layout == "view":
            logits, targets = z.view(-1, V), labels.view(-1)
        elif v.layout == "reshape":
            logits, targets = z.reshape(-1, z.shape[-1]), labels.reshape(-1)
        else:
            logits, targets = z.flatten(0, 1), labels.flatten()
        if v.reduction != "none":
            return F.cross_entropy(logits, targets, reduction=v.reduction)
        per_token = F.cross_entropy(logits, targets, reduction="none")
        mask = (targets % 2 == 0).float()
        return (per_token * mask).sum() / mask.sum().clamp_min(1)

    params = [p for p in (h, w, b, temp) if p is not None]
    tokens = B * (T - 1) if v.shift == "logits" else B * T
    return fn, params, (h, y), tokens


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(variants)
def test_generated_variant(v):
    torch._dynamo.reset()
    fn, params, args, tokens = build(v)
    expected, expected_grads = run_step(fn, params, args)
    out, grads, code = compiled_step(fn, params, args)
    assert uses_op(code), v
    assert nxv_buffers(code, tokens, V) == [], v
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, [f"param {i}" for i in range(len(params))])

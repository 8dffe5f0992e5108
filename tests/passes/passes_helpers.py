"""Shared checks for the pass tests: compile, run forward and backward, compare with eager, and
read the generated code for the op and for N x V buffers."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import cce_inductor

OP_NAMES = ("cce_inductor.lce_forward", "cce_inductor.lce_backward")
RTOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Autouse in the modules that import it: each test compiles from a clean Dynamo state."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss_of(out):
    """The scalar to backpropagate from a function's output (the first element of a tuple)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "loss"):
        out = out.loss
    return out if out.dim() == 0 else out.sum()


def run_step(fn, params, args, kwargs=None):
    """fn(*args, **kwargs), backward of its loss; returns (outputs, grads of params)."""
    kwargs = kwargs or {}
    for p in params:
        p.grad = None
    out = fn(*args, **kwargs)
    loss = _loss_of(out)
    grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else [None] * len(params)
    return out, list(grads)


def compiled_step(fn, params, args, kwargs=None, *, backend="cce", options=None, enable=None, dynamic=None):
    """Compile ``fn`` with fullgraph=True, run forward + backward, return (outputs, grads, code).

    ``backend="cce"`` (the named backend, with ``options``), or ``enable=dict(...)`` to run the
    default Inductor backend inside ``cce_inductor.enable(**enable)``."""
    ctx = cce_inductor.enable(**enable) if enable is not None else contextlib.nullcontext()
    with ctx:
        if enable is not None:
            compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        else:
            compiled = torch.compile(fn, backend=backend, options=options, fullgraph=True, dynamic=dynamic)
        (out, grads), code = run_and_get_code(lambda: run_step(compiled, params, args, kwargs))
    return out, grads, "\n".join(code)


def assert_close(actual, expected, rtol=RTOL, what="value", floor=1e-30):
    """Relative error of the whole tensor (norm-wise) within rtol; relative to ``floor`` where the
    expected norm is below it (a gradient that is zero but for rounding)."""
    if expected is None:
        assert actual is None, f"{what}: expected no gradient"
        return
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    if e.dtype.is_floating_point and torch.isnan(e).any():
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN pattern differs"
        a, e = a.nan_to_num(), e.nan_to_num()
    err = (a - e).norm().item()
    scale = max(e.norm().item(), floor)
    assert err <= rtol * scale + 1e-30, f"{what}: relative error {err / scale:.2e} > {rtol:.0e}"


def assert_outputs_close(actual, expected, rtol=RTOL):
    if isinstance(expected, torch.Tensor):
        assert_close(actual, expected, rtol, "output")
        return
    if hasattr(expected, "loss"):
        assert_close(actual.loss, expected.loss, rtol, "loss")
        return
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            assert_close(a, e, rtol, f"output {i}")
        elif isinstance(e, torch.Tensor):
            assert torch.equal(a, e), f"output {i} differs"


def assert_grads_close(actual, expected, names, rtol=RTOL, floor=1e-30):
    for a, e, name in zip(actual, expected, names):
        assert_close(a, e, rtol, f"grad of {name}", floor)


def uses_op(code: str) -> bool:
    return all(name in code for name in OP_NAMES)


_ALLOC = re.compile(r"empty_strided_\w+\(\(([^()]*)\)")
# ... and a tensor an ATen fallback returns (Inductor asserts its size)
_ALLOC_OR_FALLBACK = re.compile(r"(?:empty_strided_\w+\(|assert_size_stride\(\w+, )\(([^()]*)\)")


def buffer_shapes(code: str, fallbacks: bool = False) -> list[tuple]:
    """Static shapes of the buffers the generated code allocates (symbolic dims as strings); with
    ``fallbacks``, also of those ATen fallbacks return (``fallback_by_default``)."""
    shapes = []
    for m in (_ALLOC_OR_FALLBACK if fallbacks else _ALLOC).finditer(code):
        dims = [d.strip() for d in m.group(1).split(",") if d.strip()]
        shapes.append(tuple(int(d) if d.isdigit() else d for d in dims))
    return shapes


def nxv_buffers(code: str, tokens: int, vocab: int, fallbacks: bool = False) -> list[tuple]:
    """Allocated buffers holding at least ``tokens`` x ``vocab`` elements with a vocab-sized dim:
    the logits, their copies, their softmax or their gradient."""
    out = []
    for shape in buffer_shapes(code, fallbacks):
        if vocab not in shape or any(isinstance(d, str) for d in shape):
            continue
        numel = 1
        for d in shape:
            numel *= d
        if numel >= tokens * vocab:
            out.append(shape)
    return out


def params_of(*modules_or_tensors) -> list[torch.Tensor]:
    out = []
    for m in modules_or_tensors:
        if isinstance(m, torch.nn.Module):
            out.extend(p for p in m.parameters() if p.requires_grad)
        elif isinstance(m, torch.Tensor) and m.requires_grad:
            out.append(m)
    return out

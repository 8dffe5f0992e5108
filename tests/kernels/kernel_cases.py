"""Cases and checks shared by the interpreter (CPU) and GPU tests of the Triton kernels.

Every check compares ``linear_cross_entropy(..., impl="triton")`` with the float64 definition
(``reference.naive_linear_cross_entropy``) on the same (rounded) inputs:
  float32 inputs: loss, lse and gradients within 1e-5 relative, norm-wise;
  16-bit inputs: no worse than plain torch in that dtype (same definition, computed in the input
  dtype) against the same float64 gold, with a 1.25x margin for the rounding noise of tiny shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cce_inductor import linear_cross_entropy
from cce_inductor.reference import naive_linear_cross_entropy

FLOAT32_TOL = 1e-5
LOW_PRECISION_MARGIN = 1.25
# The GPU accuracy-bar tests' shape (N, D, V): Gemma 2's head at half the benchmark's tokens.
BAR_SHAPE = (4096, 2304, 256000)


def loss_and_grads(fn, e, c, y):
    """(loss, dE, dC) in float32 of ``fn(e, c, y).backward()`` on fresh leaf copies of e and c."""
    e = e.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    loss = fn(e, c, y)
    loss.backward()
    return loss.detach().float(), e.grad.float(), c.grad.float()


@dataclass(frozen=True)
class Case:
    name: str
    n: int = 37  # tokens (per sequence when shape is 3-D)
    d: int = 45  # not a multiple of 16
    v: int = 101  # prime
    batch: int = 0  # > 0: e is (batch, n, d)
    bias: bool = False
    softcap: float | None = None
    ignore_index: int = -100
    n_ignored: int = 0
    label_smoothing: float = 0.0
    reduction: str = "mean"
    shift: int = 0
    return_lse: bool = False
    exact: bool = True
    scale: float = 1.0  # logit scale: large values make the softmax peaked
    options: dict = field(default_factory=dict)

    def op_kwargs(self):
        return dict(ignore_index=self.ignore_index, softcap=self.softcap, reduction=self.reduction,
                    shift=self.shift, label_smoothing=self.label_smoothing, return_lse=self.return_lse)


CASES = [
    Case("plain"),
    Case("bias", bias=True),
    Case("softcap", softcap=2.0, scale=3.0),
    Case("ignored", n_ignored=6),
    Case("ignore_is_a_class", ignore_index=7, n_ignored=5),
    Case("smoothing", label_smoothing=0.2, n_ignored=3),
    Case("lse_grad_sum", return_lse=True, reduction="sum"),
    Case("none_shift_3d", batch=2, n=19, reduction="none", shift=1),
    Case("everything", batch=2, n=17, bias=True, softcap=5.0, n_ignored=4, label_smoothing=0.1,
         shift=2, return_lse=True, scale=2.0),
    Case("one_token", n=1),
    Case("filter_on_nothing_skippable", exact=False, bias=True),  # must equal the exact result
]


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int = 0):
    """e, c, targets, bias in ``dtype`` on ``device``; targets with ``n_ignored`` ignored (and the
    ignore_index class itself present when it is a valid id)."""
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.n) if case.batch else (case.n,)
    e = torch.randn(*shape, case.d, generator=g, dtype=torch.float64) * case.scale
    c = torch.randn(case.v, case.d, generator=g, dtype=torch.float64) / math.sqrt(case.d)
    b = torch.randn(case.v, generator=g, dtype=torch.float64) if case.bias else None
    y = torch.randint(0, case.v, shape, generator=g).view(-1)
    if case.n_ignored:
        y[torch.randperm(y.numel(), generator=g)[: case.n_ignored]] = case.ignore_index
    y = y.view(shape)
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(e), cast(c), y.to(device), cast(b)


def run(fn, e, c, y, b, case: Case, seed: int = 1):
    """Outputs of fn and the gradients of a random weighting of them (loss and, with return_lse,
    lse), w.r.t. e, c (and bias)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (e, c, b)]
    out = fn(leaves[0], leaves[1], y, leaves[2])
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    scalar = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum()
                 for o in outs)
    scalar.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves if t is not None]


def triton_fn(case: Case):
    kw = case.op_kwargs()
    return lambda e, c, y, b: linear_cross_entropy(e, c, y, b, impl="triton", exact=case.exact, **kw, **case.options)


def reference_fn(case: Case, compute_dtype=torch.float64):
    kw = case.op_kwargs()
    return lambda e, c, y, b: naive_linear_cross_entropy(e, c, y, b, compute_dtype=compute_dtype, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error; NaNs must sit at the same places (e.g. a mean over no targets)."""
    a, b = a.double().cpu(), b.double().cpu()
    nan = torch.isnan(b)
    if not torch.equal(nan, torch.isnan(a)):
        return math.inf
    a, b = a[~nan], b[~nan]
    if b.numel() == 0:
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def errors(case: Case, dtype: torch.dtype, device, seed: int = 0):
    """(ours, torch-in-dtype) relative errors against float64, one entry per output and gradient."""
    e, c, y, b = make_inputs(case, dtype, device, seed)
    gold_out, gold_grad = run(reference_fn(case), *(None if t is None else t.double() if t.is_floating_point() else t
                                                    for t in (e, c, y, b)), case)
    out, grad = run(triton_fn(case), e, c, y, b, case)
    names = [f"out{i}" for i in range(len(out))] + ["de", "dc", "dbias"][: len(grad)]
    ours = [rel(a, g) for a, g in zip(out + grad, gold_out + gold_grad)]
    if dtype == torch.float32:
        return dict(zip(names, ours)), None
    t_out, t_grad = run(reference_fn(case, compute_dtype=dtype), e, c, y, b, case)
    theirs = [rel(a, g) for a, g in zip(t_out + t_grad, gold_out + gold_grad)]
    return dict(zip(names, ours)), dict(zip(names, theirs))


def check_case(case: Case, dtype: torch.dtype, device, seed: int = 0):
    ours, theirs = errors(case, dtype, device, seed)
    for name, err in ours.items():
        assert math.isfinite(err), (name, ours)
        if theirs is None:
            assert err <= FLOAT32_TOL, f"{case.name} {name}: {err:.2e} > {FLOAT32_TOL} ({ours})"
        else:
            bound = LOW_PRECISION_MARGIN * theirs[name] + 1e-6
            assert err <= bound, f"{case.name} {dtype} {name}: {err:.2e} > torch {theirs[name]:.2e} ({ours} vs {theirs})"
    return ours, theirs

"""Every op of the package returns what its fake says -- shape, dtype and strides -- for every input
layout: Inductor checks a custom op's real outputs against its fake's sizes and strides, so a fake
that copies a transposed input's strides (``empty_like``) while the op allocates contiguous
gradients crashes the first compiled backward (``AssertionError: expected size ... stride ...``).

The layouts are those a compiled program hands the op: a transposed e (``F.linear(x.t(), W)``), a
transposed c (``h @ W`` with W stored (D, V): the rewrite passes ``W.t()``), windows of wider tensors
(rows strided), strided targets and bias, and expanded (stride-0) upstream gradients."""

import os

import pytest
import torch
from torch._C._dynamo.guards import assert_size_stride
from torch._subclasses.fake_tensor import FakeTensorMode

from cce_inductor import linear_cross_entropy

ops = torch.ops.cce_inductor
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the Triton path on the CPU: the interpreter")

N, D, V = 5, 12, 20  # D and V not multiples of the interpreter's 16-wide tiles: masked tails


def _in_layout(t, layout):
    """t's values in ``layout``: "contiguous"; "transposed" (the .t() of a contiguous (cols, rows)
    tensor); "sliced" (a window of a wider tensor: 2-D rows strided, 1-D every other element)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":
        return t.t().contiguous().t()
    if t.dim() == 1:
        return torch.stack([t, torch.zeros_like(t)], 1).reshape(-1)[::2]
    return torch.cat([t, torch.zeros(t.shape[0], 3, dtype=t.dtype)], 1)[:, : t.shape[1]]


LAYOUTS = {  # (e, c, targets and bias, upstream gradients)
    "contiguous": ("contiguous", "contiguous", "contiguous", "dense"),
    "e_transposed": ("transposed", "contiguous", "contiguous", "expanded"),
    "c_transposed": ("contiguous", "transposed", "contiguous", "expanded"),
    "both_transposed": ("transposed", "transposed", "sliced", "expanded"),
    "sliced": ("sliced", "sliced", "sliced", "dense"),
}


def _inputs(layout, dtype=torch.float32, bias=True):
    e_layout, c_layout, vec_layout, grad_layout = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    e = _in_layout((torch.randn(N, D, generator=g) * 3).to(dtype), e_layout)
    c = _in_layout(torch.randn(V, D, generator=g).to(dtype), c_layout)
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = -100
    b = _in_layout(torch.randn(V, generator=g).to(dtype), vec_layout) if bias else None
    assert layout == "contiguous" or not (e.is_contiguous() and c.is_contiguous())
    if grad_layout == "expanded":  # as the upstream gradient of a sum or mean arrives
        grad = lambda: torch.full((1,), 0.5).expand(N)  # noqa: E731
    else:
        grad = lambda: torch.rand(N, generator=g)  # noqa: E731
    return e, c, _in_layout(y, vec_layout), b, grad


def assert_fake_matches_real(op, *args):
    """Runs op for real and its fake on fake copies of args (same strides); the outputs agree in
    shape, dtype, device and strides (checked as Inductor does: strides of dims of size > 1).
    Returns the real outputs."""
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    real_t = real if isinstance(real, tuple) else (real,)
    fake_t = fake if isinstance(fake, tuple) else (fake,)
    assert len(real_t) == len(fake_t)
    for i, (r, f) in enumerate(zip(real_t, fake_t)):
        if r is None:
            assert f is None, f"{op}: output {i}"
            continue
        assert (r.dtype, r.device) == (f.dtype, f.device), f"{op}: output {i}: {r.dtype} vs fake {f.dtype}"
        assert_size_stride(r, tuple(f.shape), tuple(f.stride()))
    return real


def _forward_and_backward(impl, e, c, y, b, grad, filtered=False):
    flags = (True, True) if filtered else (False, False)
    loss, lse, keep = assert_fake_matches_real(ops.lce_forward.default, e, c, y, b, -100, 0.0, 0.0, impl, *flags)
    for needs in ((True, True, True), (False, True, False)):
        assert_fake_matches_real(ops.lce_backward.default, e, c, y, b, lse, grad(), grad().to(lse.dtype), keep,
                                 -100, 0.0, 0.0, impl, filtered, *needs)
    return keep


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_path_fakes_match_reals(layout):
    e, c, y, b, grad = _inputs(layout)
    _forward_and_backward("torch", e, c, y, b, grad)
    # softcap and label smoothing take other branches of the torch path; the layout is the same
    loss, lse, keep = ops.lce_forward(e, c, y, b, -100, 2.0, 0.1, "torch", False, False)
    assert_fake_matches_real(ops.lce_backward.default, e, c, y, b, lse, grad(), grad().double(), keep, -100, 2.0, 0.1,
                             "torch", False, True, True, True)


@interpreter
@pytest.mark.parametrize("layout", ["contiguous", "both_transposed", "sliced"])
def test_triton_path_fakes_match_reals(layout):
    """The Triton forward and backward (float32: the atomic backward) and the workspace op with its
    in-place scaling. (e or c transposed alone: on the torch path above; here both at once.)"""
    e, c, y, b, grad = _inputs(layout)
    _forward_and_backward("triton", e, c, y, b, grad)
    out = assert_fake_matches_real(ops.lce_fused_reduced.default, e, c, y, b, -100, 0.0, 0.0, True, 4 * V * 3,
                                   True, True, True)
    for g in out[1:]:
        assert_fake_matches_real(ops.lce_scale_.default, g, torch.full((), 2.0).expand(1))


@interpreter
@pytest.mark.parametrize("layout", ["both_transposed", "sliced"])
def test_keep_flags_path_fakes_match_reals(layout):
    """float16, exact=False with filter_dc: the forward forms keep flags and the buffered backward
    follows them."""
    e, c, y, _, grad = _inputs(layout, torch.float16, bias=False)
    keep = _forward_and_backward("triton", e, c, y, None, grad, filtered=True)
    assert keep.shape == (1, 2)  # flags were formed: the path under test ran


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=interpreter)])
def test_opcheck_with_transposed_operands(impl):
    """torch.library.opcheck (schema, fake against real, autograd registration; on the torch path also
    the AOT dispatch) of the forward and backward with e and c both transposed, and of the workspace
    op and its scaling."""
    e, c, y, b, grad = _inputs("both_transposed")
    e.requires_grad_(), c.requires_grad_(), b.requires_grad_()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    if impl == "torch":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(ops.lce_forward.default, (e, c, y, b, -100, 0.0, 0.0, impl, False, False), test_utils=utils)
    loss, lse, keep = ops.lce_forward(e, c, y, b, -100, 0.0, 0.0, impl, False, False)
    torch.library.opcheck(ops.lce_backward.default, (e.detach(), c.detach(), y, b.detach(), lse.detach(), grad(),
                                                     grad().to(lse.dtype), keep, -100, 0.0, 0.0, impl, False, True,
                                                     True, True), test_utils=utils)
    if impl == "triton":
        args = (e, c, y, b, -100, 0.0, 0.0, True, 4 * V * 3, True, True, True)
        torch.library.opcheck(ops.lce_fused_reduced.default, args, test_utils=utils)
        dc = ops.lce_fused_reduced(*args)[2]
        torch.library.opcheck(ops.lce_scale_.default, (dc, torch.full((1,), 2.0)), test_utils=utils[:2])


def test_gradients_are_contiguous_whatever_the_layout():
    """The contract the fakes state, seen from autograd: the gradients w.r.t. a transposed e and a
    transposed c (views of contiguous (D, N) hidden states and a (D, V) weight) are contiguous."""
    e, c, y, b, _ = _inputs("both_transposed")
    x, w = e.t().detach().requires_grad_(), c.t().detach().requires_grad_()
    e_view, c_view = x.t(), w.t()
    grads = torch.autograd.grad(linear_cross_entropy(e_view, c_view, y, b, impl="torch"), (e_view, c_view))
    assert all(g.is_contiguous() for g in grads)


# ----------------------------------------------------------------------------- GPU

MODES = {
    "exact": {},
    "filtered": {"exact": False},
    "filter_dc": {"exact": False, "filter_dc": True},
    "workspace": {"max_workspace_bytes": 2**20},
}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_transposed_operands_in_every_mode(mode):
    """The Triton path on a GPU, bfloat16: e transposed (F.linear(x.t(), W)) and c transposed (a
    (D, V) weight used as h @ W), eager and compiled with backend="cce" (rewritten): the loss and
    gradients of the same op on contiguous copies (within 1e-3: float32 atomics and reduce-adds
    land in any order; the compiled loss is bfloat16, as F.cross_entropy's of bfloat16 logits), and
    gradients in the leaves' own layouts."""
    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code

    from cce_inductor import filter_choice

    g = torch.Generator().manual_seed(0)
    n, d, v = 300, 64, 5000
    x0 = (torch.randn(d, n, generator=g) * 4).bfloat16().cuda()  # the hidden states, stored (D, N)
    w0 = (torch.randn(d, v, generator=g) / d**0.5).bfloat16().cuda()  # the weight, stored (D, V)
    y = torch.randint(0, v, (n,), generator=g).cuda()
    y[::7] = -100
    options = MODES[mode]

    def run(fn):
        filter_choice.reset()  # each run starts as a first call (the filter runs)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(x, w)
        loss.backward()
        return [loss.detach(), x.grad, w.grad]

    want = run(lambda x, w: linear_cross_entropy(x.t().contiguous(), w.t().contiguous(), y, impl="triton", **options))
    eager = run(lambda x, w: linear_cross_entropy(x.t(), w.t(), y, impl="triton", **options))
    torch._dynamo.reset()
    compiled_fn = torch.compile(lambda x, w: F.cross_entropy(x.t() @ w, y), backend="cce", fullgraph=True,
                                options=dict(impl="triton", **options))
    compiled, code = run_and_get_code(run, compiled_fn)
    assert "cce_inductor.lce_" in "\n".join(code)
    assert compiled[0].dtype == torch.bfloat16
    torch.testing.assert_close(compiled[0], want[0].bfloat16(), rtol=2**-8, atol=0)  # one bf16 ulp
    for got in (eager, compiled):
        assert got[1].stride() == x0.stride() and got[2].stride() == w0.stride()
    for a, b in zip(eager + compiled[1:], want + want[1:]):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert err <= 1e-3, (mode, err)

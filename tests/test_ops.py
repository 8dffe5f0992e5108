"""The op's contract on the CPU (impl="torch"): numerics against float64, registration, compile, errors."""

import math
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cce_inductor
from cce_inductor import linear_cross_entropy
from cce_inductor.ops import TargetOutOfRangeError
from cce_inductor.reference import naive_linear_cross_entropy

OPTIONS = dict(ignore_index=-100, softcap=None, reduction="mean", shift=0, label_smoothing=0.0, return_lse=False)


def rel(a, b):
    """Norm-wise relative error; 0 where both are NaN (e.g. the mean over no targets)."""
    a, b = a.double(), b.double()
    if torch.isnan(b).all() and torch.isnan(a).all():
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_case(shape, d, v, *, dtype, peaked, ignore_frac, ignore_index, bias, seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    c = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    if peaked:  # a few classes per token carry most of the mass
        e = e * 6.0
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, v, shape, generator=g)
    y = torch.where(torch.rand(shape, generator=g) < ignore_frac, torch.full_like(y, ignore_index), y)
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(e), cast(c), y, cast(b)


def loss_and_grads(fn, e, c, y, b, **kw):
    """Run fn on leaf copies; reduce (loss, lse) to one scalar with random weights; return the
    outputs and the gradients w.r.t. every floating input."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (e, c, b)]
    out = fn(leaves[0], leaves[1], y, leaves[2], **kw)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    scalar = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    if torch.isnan(scalar):
        return [o.detach() for o in outs], None
    scalar.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves if t is not None]


def torch_in_dtype(e, c, y, b, **kw):
    """What plain torch computes with these inputs in their own dtype (no float64 upcast)."""
    return naive_linear_cross_entropy(e, c, y, b, compute_dtype=e.dtype, **kw)


cases = st.fixed_dictionaries(
    {
        "shape": st.sampled_from([(1,), (7,), (2, 5), (3, 4, 6), (1, 9)]),
        "d": st.sampled_from([1, 5, 17, 33]),
        "v": st.sampled_from([2, 3, 13, 97, 211]),
        "peaked": st.booleans(),
        "ignore_frac": st.sampled_from([0.0, 0.2]),
        "ignore_index": st.sampled_from([-100, 1]),  # 1 is also a valid class id
        "bias": st.booleans(),
        "softcap": st.sampled_from([None, 2.5]),
        "reduction": st.sampled_from(["mean", "sum", "none"]),
        "shift": st.sampled_from([0, 1, 2]),
        "label_smoothing": st.sampled_from([0.0, 0.1]),
        "return_lse": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def _split(case):
    case = dict(case)
    if case["shift"] >= case["shape"][-1] or len(case["shape"]) < 2:
        case["shift"] = 0
    data = {k: case.pop(k) for k in ("shape", "d", "v", "peaked", "ignore_frac", "bias", "seed")}
    data["ignore_index"] = case["ignore_index"]
    return data, case


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases)
def test_float32_matches_float64_reference(case):
    data, opts = _split(case)
    e, c, y, b = make_case(dtype=torch.float32, **data)
    outs, grads = loss_and_grads(linear_cross_entropy, e, c, y, b, impl="torch", **opts)
    ref_outs, ref_grads = loss_and_grads(naive_linear_cross_entropy, e.double(), c.double(), y,
                                         None if b is None else b.double(), **opts)
    for o, r in zip(outs, ref_outs):
        assert o.dtype == torch.float32
        assert o.shape == r.shape
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-6, equal_nan=True)
    if ref_grads is not None:
        for g, r in zip(grads, ref_grads):
            assert rel(g, r) < 1e-5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_low_precision_no_worse_than_torch(case, dtype):
    data, opts = _split(case)
    data["ignore_frac"] = 0.0  # keep the mean well defined so relative errors are meaningful
    e, c, y, b = make_case(dtype=dtype, **data)
    up = lambda t: None if t is None else t.double()
    ref_outs, ref_grads = loss_and_grads(naive_linear_cross_entropy, up(e), up(c), y, up(b), **opts)
    outs, grads = loss_and_grads(linear_cross_entropy, e, c, y, b, impl="torch", **opts)
    torch_outs, torch_grads = loss_and_grads(torch_in_dtype, e, c, y, b, **opts)
    for o, t, r in zip(outs, torch_outs, ref_outs):
        assert o.dtype == torch.float32
        assert rel(o, r) <= rel(t, r) + 1e-6
    if ref_grads is None:  # NaN loss (every target ignored): nothing to differentiate
        return
    for g, t, r, src in zip(grads, torch_grads, ref_grads, (e, c, b)):
        assert g.dtype == src.dtype
        # Ours rounds each gradient once, from float32; torch rounds the logits, the softmax and
        # the gradient. Half an ulp of the output dtype is the least any method can be off by.
        assert rel(g, r) <= max(rel(t, r), torch.finfo(dtype).eps / 2)


def test_all_ignored_matches_torch():
    e, c, y, _ = make_case((4, 3), 8, 11, dtype=torch.float32, peaked=False, ignore_frac=1.0,
                           ignore_index=-100, bias=False, seed=0)
    for reduction in ("mean", "sum", "none"):
        ours = linear_cross_entropy(e, c, y, reduction=reduction)
        ref = naive_linear_cross_entropy(e, c, y, reduction=reduction)
        torch.testing.assert_close(ours.double(), ref, equal_nan=True)


def test_grads_only_for_inputs_that_require_them():
    e, c, y, b = make_case((5,), 8, 11, dtype=torch.float32, peaked=False, ignore_frac=0.0,
                           ignore_index=-100, bias=True, seed=0)
    c.requires_grad_()
    linear_cross_entropy(e, c, y, b).backward()
    assert c.grad is not None and e.grad is None and b.grad is None


def test_double_backward_raises():
    e = torch.randn(4, 8, requires_grad=True)
    c = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 11, (4,))
    (ge,) = torch.autograd.grad(linear_cross_entropy(e, c, y), e, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        ge.sum().backward()


def test_autocast_computes_like_f_linear():
    e = torch.randn(6, 16)
    c = torch.randn(23, 16)
    y = torch.randint(0, 23, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(e, c, y)
    ref = naive_linear_cross_entropy(e.bfloat16(), c.bfloat16(), y)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    # Gradients flow back to the float32 leaves through the autocast cast, and a backward run inside
    # the autocast region computes as one outside it: those of bfloat16 inputs (its logit matmuls
    # ran in bfloat16 there).
    e.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(e, c, y).backward()
    assert e.grad.dtype == torch.float32
    e16 = e.detach().bfloat16().requires_grad_()
    linear_cross_entropy(e16, c.bfloat16(), y).backward()
    assert torch.equal(e.grad, e16.grad.float())


def test_opcheck():
    e = torch.randn(9, 7, dtype=torch.float32, requires_grad=True)
    c = torch.randn(13, 7, dtype=torch.float32, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    y = torch.randint(0, 13, (9,))
    y[3] = -100
    for bias in (None, b):
        args = (e, c, y, bias, -100, 2.0, 0.1, "torch", True, True)
        torch.library.opcheck(torch.ops.cce_inductor.lce_forward.default, args)
        loss, lse, keep = torch.ops.cce_inductor.lce_forward(*args)
        assert keep.numel() == 0  # the torch path forms no keep flags
        grads = (torch.randn(9), torch.randn(9, dtype=lse.dtype))
        bw_args = (e.detach(), c.detach(), y, None if bias is None else bias.detach(), lse.detach(), *grads, keep,
                   -100, 2.0, 0.1, "torch", True, True, True, bias is not None)
        torch.library.opcheck(torch.ops.cce_inductor.lce_backward.default, bw_args)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton path on the CPU: the interpreter")
def test_opcheck_with_keep_flags():
    """The Triton path's forward with keep flags (filter_grad and filter_dc, 16-bit, no bias, no
    softcap or smoothing): the fake's flag shape is the kernel's, and the backward takes the flags."""
    gen = torch.Generator().manual_seed(0)
    e = (torch.randn(37, 16, generator=gen) * 4).half().requires_grad_()
    c = torch.randn(40, 16, generator=gen).half().requires_grad_()
    y = torch.randint(0, 40, (37,), generator=gen)
    args = (e, c, y, None, -100, 0.0, 0.0, "triton", True, True)
    torch.library.opcheck(torch.ops.cce_inductor.lce_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    loss, lse, keep = torch.ops.cce_inductor.lce_forward(*args)
    assert keep.dtype == torch.int8 and keep.shape == (3, 3)  # the interpreter's 16 x 16 tiles
    for flagged in ((e, c, y, None, -100, 0.0, 0.0, "triton", True, False),  # dC exact
                    (e, c, y, None, -100, 1.0, 0.0, "triton", True, True)):  # a softcap
        assert torch.ops.cce_inductor.lce_forward(*flagged)[2].numel() == 0


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles_without_graph_break(dynamic):
    def step(e, c, y, b):
        return linear_cross_entropy(e, c, y, b, shift=1, softcap=3.0, label_smoothing=0.05)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    c = torch.randn(37, 12, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    for seq in (5, 9, 14):
        e = torch.randn(2, seq, 12, requires_grad=True)
        y = torch.randint(0, 37, (2, seq))
        (out, grads), (ref, ref_grads) = [
            (lambda o: (o, torch.autograd.grad(o, (e, c, b))))(f(e, c, y, b)) for f in (compiled, step)
        ]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            assert rel(g, r) < 1e-5


# ----------------------------------------------------------------------------- bad input

E, C, Y = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(e=torch.tensor(1.0)), ValueError, "e must be"),
        (dict(c=torch.randn(11)), ValueError, "c must be"),
        (dict(c=torch.randn(11, 9)), ValueError, "D of e"),
        (dict(targets=Y.float()), TypeError, "targets must be an integer"),
        (dict(targets=Y.bool()), TypeError, "targets must be an integer"),
        (dict(targets=Y[:, :2]), ValueError, "targets' shape"),
        (dict(bias=torch.randn(10)), ValueError, "bias must be"),
        (dict(e=E.double(), c=C.double()), TypeError, "e must be float32"),
        (dict(c=C.bfloat16()), TypeError, "c must have e's dtype"),
        (dict(bias=torch.randn(11, dtype=torch.float16)), TypeError, "bias must have e's dtype"),
        (dict(reduction="avg"), ValueError, "reduction must be"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
        (dict(label_smoothing=float("inf")), ValueError, "label_smoothing must be between"),
        (dict(softcap="30"), TypeError, "softcap must be"),
        (dict(label_smoothing=None), TypeError, "label_smoothing must be"),
        (dict(exact=None), TypeError, "exact must be"),
        (dict(shift=3), ValueError, "shift=3 is out of range"),
        (dict(shift=-1), ValueError, "shift must be"),
        (dict(e=E[0, 0], targets=Y[0, 0], shift=1), ValueError, "shift=1 is out of range"),
        (dict(impl="cuda"), ValueError, "impl must be"),
        (dict(ignore_index=True), TypeError, "ignore_index must be an int"),
        (dict(shift=True), ValueError, "shift must be"),
        (dict(return_lse=1), TypeError, "return_lse must be a bool"),
        (dict(filter_dc=1), TypeError, "filter_dc must be a bool"),
        (dict(filter_dc=True), ValueError, "filter_dc=True .* needs exact=False"),
        (dict(targets=torch.full((2, 3), 11)), ValueError, "targets must be in"),
        (dict(targets=torch.full((2, 3), -5)), IndexError, "targets must be in .* found -5"),
        (dict(e=E.to("meta")), ValueError, "one device"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    args = dict(e=E, c=C, targets=Y)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        linear_cross_entropy(args.pop("e"), args.pop("c"), args.pop("targets"), **args)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton path on the CPU: the interpreter"))])
def test_ignore_index_any_int(impl):
    """ignore_index is any int, as in F.cross_entropy: a valid class id, negative, outside [0, V),
    beyond int32; the loss and dE equal torch's in float64."""
    values = (1, -1, 11, 2**40) if impl == "torch" else (11, 2**40)
    for ignore_index in values:
        y = Y.clone()
        y[0, 1] = y[1, 2] = ignore_index
        e = E.clone().requires_grad_()
        loss = linear_cross_entropy(e, C, y, ignore_index=ignore_index, impl=impl)
        loss.backward()
        e64 = E.double().requires_grad_()
        ref = F.cross_entropy((e64 @ C.double().T).flatten(0, 1), y.flatten(), ignore_index=ignore_index)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
        assert rel(e.grad, e64.grad) < 1e-5


@pytest.mark.parametrize("smoothing", [-0.1, -math.inf, math.nan, 0])
def test_label_smoothing_not_above_zero_means_none_as_in_torch(smoothing):
    """F.cross_entropy treats a label_smoothing that is not above 0 (negative, NaN) as none; so does
    the op (it raised for negatives, so a compiled program failed where torch runs)."""
    y = Y.clone()
    y[0, 0] = -100
    z = (E.double() @ C.double().T).flatten(0, 1)
    torch_none = F.cross_entropy(z, y.flatten())
    torch.testing.assert_close(F.cross_entropy(z, y.flatten(), label_smoothing=smoothing), torch_none)
    for reduction in ("mean", "none"):
        ours = linear_cross_entropy(E, C, y, label_smoothing=smoothing, reduction=reduction)
        want = linear_cross_entropy(E, C, y, reduction=reduction)
        assert torch.equal(ours, want)
    torch.testing.assert_close(linear_cross_entropy(E, C, y, label_smoothing=smoothing).double(), torch_none,
                               rtol=1e-5, atol=0)


def test_label_smoothing_above_one_raises_as_in_torch():
    with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0. Got: 1.5"):
        F.cross_entropy(E @ C.T, Y, label_smoothing=1.5)  # torch's own wording, which the op's error repeats
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0. Got: 1.5"):
        linear_cross_entropy(E, C, Y, label_smoothing=1.5)


def test_out_of_range_target_is_an_index_error_and_shifted_out_targets_are_not_read():
    """Eager torch raises an IndexError for an out-of-range target: the op's error is one (and a
    ValueError). With shift, the targets shifted out (the first of each row) are never paired with
    a token, as in torch's ``cross_entropy(z[:, :-1], y[:, 1:])``: they are not checked."""
    y = Y.clone()
    y[1, 0] = 11
    with pytest.raises(IndexError):
        F.cross_entropy((E[:, :-1] @ C.T).flatten(0, 1), y[:, :-1].flatten())
    with pytest.raises(TargetOutOfRangeError, match="found 11"):
        linear_cross_entropy(E, C, y)
    ref = F.cross_entropy((E.double()[:, :-1] @ C.double().T).flatten(0, 1), y[:, 1:].flatten())
    torch.testing.assert_close(linear_cross_entropy(E, C, y, shift=1).double(), ref, rtol=1e-5, atol=0)


def test_public_api():
    assert set(cce_inductor.__all__) == {"linear_cross_entropy", "linear_token_stats", "TokenStats",
                                         "vocab_parallel_cross_entropy", "enable", "disable", "explain", "__version__"}


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_shift_with_narrow_integer_targets(dtype):
    """The label-shift padding is ignore_index: it must stay ignored whatever the targets' dtype
    (in uint8, -100 would wrap to 156, a valid class here)."""
    g = torch.Generator().manual_seed(0)
    e, c = torch.randn(2, 6, 8, generator=g), torch.randn(300, 8, generator=g)
    y = torch.randint(0, 200, (2, 6), generator=g)
    for reduction in ("mean", "sum", "none"):
        ours = linear_cross_entropy(e, c, y.to(dtype), shift=1, reduction=reduction)
        ref = naive_linear_cross_entropy(e.double(), c.double(), y, shift=1, reduction=reduction)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton path on the CPU: the interpreter")
def test_filter_dc_skips_the_recompute_only_where_the_flags_hold():
    """linear_cross_entropy(exact=False, filter_dc=True) on the Triton path: with the forward's keep
    flags, dE and dC are the kernels' listed backward's (dC dropped where skipped, reference
    "dropped" in float64 within 1.5x of the exact kernel's distance); with return_lse=True (an lse the
    caller may differentiate) no flags are formed and dC is exact mode's, as with filter_dc=False."""
    from cce_inductor import filter_choice, reference
    from cce_inductor.kernels import FILTER_EPS

    gen = torch.Generator().manual_seed(1)
    e0 = (torch.randn(40, 48, generator=gen) * 30 / 48**0.5).half()
    c0 = (torch.randn(150, 48, generator=gen) / 48**0.5).half()
    y = (e0.float() @ c0.float().T).argmax(1)
    y[3], y[7] = -100, 5

    def grads(**options):
        e, c = e0.clone().requires_grad_(), c0.clone().requires_grad_()
        out = linear_cross_entropy(e, c, y, impl="triton", **options)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return e.grad, c.grad

    with mock.patch.object(filter_choice, "MIN_SKIPPED", 0.0):  # every call filters (s = 0.03 here)
        listed = grads(exact=False, filter_dc=True)
        with_lse = grads(exact=False, filter_dc=True, return_lse=True)
        dc_exact = grads(exact=False)
    exact = grads()
    assert torch.equal(with_lse[1], dc_exact[1]) and torch.equal(with_lse[0], dc_exact[0])
    assert not torch.equal(listed[1], dc_exact[1])
    f64 = lambda t: t.double()  # noqa: E731
    lse = torch.logsumexp(f64(e0) @ f64(c0).T, 1)
    g = (y != -100).double() / (y != -100).sum()
    want = [reference.filtered_backward(f64(e0), f64(c0), None, y, lse, g, torch.zeros(40, dtype=torch.float64), -100,
                                        0.0, 0.0, eps, 16, 16, dc) for eps, dc in ((FILTER_EPS, "dropped"), (0.0, "exact"))]
    assert 0 < int((~want[0][3]).sum()) < want[0][3].numel()
    for got, got_exact, ref, ref_exact in zip(listed, exact, want[0][:2], want[1][:2]):
        assert rel(got, ref) <= 1.5 * rel(got_exact, ref_exact)


def test_every_op_makes_its_inputs_device_current(monkeypatch):
    """Triton launches on the current CUDA device, so each custom op enters its inputs' device
    (``ops._on_device_of``) around its work: forward, backward, the workspace op and its scaling.
    Recorded here on the CPU; a CUDA tensor gets ``torch.cuda.device`` of its own index."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cce_inductor import ops

    with FakeTensorMode():
        on_gpu1 = torch.empty(2, device="cuda:1")
    assert isinstance(ops._on_device_of(on_gpu1), torch.cuda.device) and ops._on_device_of(on_gpu1).idx == 1

    entered = []
    guard = ops._on_device_of

    def recording(t):
        entered.append(t.device.type)
        return guard(t)

    monkeypatch.setattr(ops, "_on_device_of", recording)
    e, c, y, _ = make_case((6,), 8, 11, dtype=torch.float32, peaked=False, ignore_frac=0.0, ignore_index=-100,
                           bias=False, seed=0)
    e.requires_grad_()
    linear_cross_entropy(e, c, y, impl="torch").backward()
    assert entered == ["cpu", "cpu"]  # lce_forward, lce_backward
    if os.environ.get("TRITON_INTERPRET") == "1":
        entered.clear()
        (2 * linear_cross_entropy(e, c, y, impl="triton", max_workspace_bytes=4 * 11 * 2)).backward()
        assert entered == ["cpu", "cpu"]  # lce_fused_reduced, lce_scale_ (once: only e needs a gradient)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("options", [{}, {"exact": False}, {"max_workspace_bytes": 2**20}],
                         ids=["exact", "filtered", "workspace"])
def test_gpu_inputs_on_a_device_that_is_not_current(options):
    """Tensors on cuda:1 while cuda:0 is current (a model split over GPUs): the loss and gradients of
    cuda:1 current (launched on the wrong device they are garbage or an error; within 1e-3, not bit
    for bit: the filtered backward's reduce-adds land in any order)."""
    e, c, y, _ = make_case((300,), 64, 5000, dtype=torch.bfloat16, peaked=True, ignore_frac=0.1,
                           ignore_index=-100, bias=False, seed=0)
    results = []
    for current in (1, 0):
        with torch.cuda.device(current):
            ins = [t.to("cuda:1") for t in (e, c, y)]
            ins[0].requires_grad_(), ins[1].requires_grad_()
            loss = linear_cross_entropy(*ins, impl="triton", **options)
            loss.backward()
            torch.cuda.synchronize(1)
            results.append([loss.detach().cpu(), ins[0].grad.cpu(), ins[1].grad.cpu()])
    for want, got in zip(*results):
        assert rel(got, want) <= 1e-3

"""The ``max_workspace_bytes`` path (kernels/workspace.py, the ``lce_fused_reduced`` op).

On the CPU under the Triton interpreter (set by conftest): the op's cases against the float64
definition with workspaces of one row, a few rows (several chunks, a partial last one) and all rows;
the chunking rule; the row kernel's launch variants; the upstream scalar; fallbacks; errors;
registration and compile. On a GPU (marked ``gpu``): the same cases and launch variants, the bf16
accuracy bar of the kernels issue, 64-bit offsets and the memory bound.
"""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from cce_inductor import linear_cross_entropy
from cce_inductor.reference import naive_linear_cross_entropy
from kernel_cases import (
    BAR_SHAPE, CASES, LOW_PRECISION_MARGIN, Case, check_case, errors, loss_and_grads, make_inputs, rel,
)

kernels = pytest.importorskip("cce_inductor.kernels")
if not kernels.AVAILABLE:  # pragma: no cover
    pytest.skip("triton is not installed", allow_module_level=True)

from cce_inductor.kernels import workspace  # noqa: E402

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs under the Triton interpreter")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warnings of masked lanes

# The kernel cases the option applies to (a reduced loss, no lse), plus sums with the other options.
APPLICABLE = [c for c in CASES if c.reduction != "none" and not c.return_lse] + [
    Case("sum_everything", batch=2, n=17, reduction="sum", bias=True, softcap=5.0, n_ignored=4,
         label_smoothing=0.1, shift=2, scale=2.0),
    Case("peaked_softcap_smoothing", softcap=3.0, label_smoothing=0.3, scale=6.0, n_ignored=2),
]
WORKSPACE_ROWS = {"one_row": 1, "five_rows": 5, "all_rows": 10_000}  # 37 tokens: 37, 8 (7 x 5 + 2), 1 chunk
# Under the interpreter V = 37 (three blocks of the row kernel's 16, the last of 5) rather than the
# kernel cases' 101: the row kernel's time grows with V, its paths do not.
INTERPRETER_V = 37


def with_workspace(case: Case, rows: int, dtype: torch.dtype) -> Case:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Case(**{**case.__dict__, "options": {"max_workspace_bytes": rows * case.v * itemsize}})


@pytest.fixture
def spy(monkeypatch):
    """Records the (rows, V) of every chunk the workspace path processes."""
    chunks = []
    launch = workspace._launch_rows

    def recording(z, *args, **kwargs):
        chunks.append(tuple(z.shape))
        return launch(z, *args, **kwargs)

    monkeypatch.setattr(workspace, "_launch_rows", recording)
    return chunks


def _expected_chunks(n_tokens, rows_budget):
    rows = workspace.workspace_rows(n_tokens, 1, 1, rows_budget)
    return [min(rows, n_tokens - n0) for n0 in range(0, n_tokens, rows)]


# ----------------------------------------------------------------------------- interpreter


# Every case at five rows a chunk (8 chunks, the last partial); one row a chunk (one program with work,
# 37 chunks) and one chunk for all rows on one each: the chunking and the loss options meet only in
# the host loop, which every case runs.
FLOAT32_CHUNKINGS = [(dataclasses.replace(c, v=INTERPRETER_V), rows) for c in APPLICABLE for rows, names in
                     (("five_rows", None), ("one_row", ("sum_everything",)),
                      ("all_rows", ("peaked_softcap_smoothing",)))
                     if names is None or c.name in names]


@interpreter
@pytest.mark.parametrize("case, rows", FLOAT32_CHUNKINGS, ids=[f"{c.name}-{rows}" for c, rows in FLOAT32_CHUNKINGS])
def test_float32_matches_float64(case, rows, spy):
    rows = WORKSPACE_ROWS[rows]
    check_case(with_workspace(case, rows, torch.float32), torch.float32, "cpu")
    tokens = (case.batch or 1) * case.n
    assert [r for r, _ in spy] == _expected_chunks(tokens, rows)
    assert all(v == case.v for _, v in spy)


LOW_PRECISION = [dataclasses.replace(c, v=INTERPRETER_V) for c in APPLICABLE
                 if c.name in ("plain", "everything", "ignore_is_a_class", "sum_everything")]


@interpreter
@pytest.mark.parametrize("case", LOW_PRECISION, ids=lambda c: c.name)
def test_bfloat16_no_worse_than_torch(case, spy):
    """Four chunks (the first formed by mm, the others added by addmm), every output and gradient
    within the kernels' margin of torch's own bf16 error (the upstream weight is random, so the
    backward's scaling is exercised too)."""
    check_case(with_workspace(case, 10, torch.bfloat16), torch.bfloat16, "cpu")
    assert 1 <= len(spy) <= 4


@interpreter
def test_bfloat16_dc_error_grows_like_sqrt_chunks(spy):
    """dC is accumulated in C's dtype, one rounding of the running sum per chunk: its error grows like
    sqrt(chunks): at 64 tokens, 4 chunks within the kernels' margin of torch's error and 64 within
    half of sqrt(64) times it."""
    case = Case("plain", n=64, v=INTERPRETER_V)
    for rows in (16, 1):
        spy.clear()
        ours, theirs = errors(with_workspace(case, rows, torch.bfloat16), torch.bfloat16, "cpu")
        chunks = len(spy)
        assert chunks == 64 // rows
        for name in ("out0", "de"):
            assert ours[name] <= LOW_PRECISION_MARGIN * theirs[name], (rows, ours, theirs)
        assert ours["dc"] <= max(LOW_PRECISION_MARGIN, 0.5 * math.sqrt(chunks)) * theirs["dc"], (chunks, ours, theirs)


@interpreter
def test_chunks_are_even_with_a_partial_last_one(spy):
    case = Case("plain", v=INTERPRETER_V)
    check_case(with_workspace(case, 10, torch.float32), torch.float32, "cpu")
    # 37 tokens, 10 fit: 4 chunks of 10 -> spread evenly: 10, 10, 10, 7.
    assert [r for r, _ in spy] == [10, 10, 10, 7]


# The row kernel's schedule keywords (workspace._launch_rows) that leave its results bit for
# bit, against its default launch (which prefetches, hints evict_first, and runs two programs per SM).
ROW_LAUNCHES = {"no_prefetch": {"prefetch": False}, "no_evict_first": {"evict_sweep2": False},
                "no_prefetch_no_evict_first": {"prefetch": False, "evict_sweep2": False},
                "one_program_per_sm": {"programs_per_sm": 1}}


def _rows_launched(z0, targets, weight, softcap, smoothing, keywords):
    """(loss per row, dz): the row kernel launched with ``keywords`` on a copy of z0."""
    z, loss = z0.clone(), torch.empty(len(z0), device=z0.device)
    workspace._launch_rows(z, targets, weight, loss, -100, softcap, smoothing, True, **keywords)
    return loss, z


def _rows_float64(z, targets, weight, ignore_index, softcap, smoothing):
    """The row kernel's definition in float64: (loss per row, dz)."""
    u = z.double()
    capped = softcap * torch.tanh(u / softcap) if softcap else u
    slope = 1 - torch.tanh(u / softcap) ** 2 if softcap else torch.ones_like(u)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(capped, -1)
    vocab = z.shape[1]
    loss = lse - (1 - smoothing) * capped.gather(1, safe[:, None])[:, 0] - smoothing / vocab * capped.sum(-1)
    dz = torch.softmax(capped, -1) - smoothing / vocab
    dz[torch.arange(len(z)), safe] -= 1 - smoothing
    dz = dz * weight * slope * valid[:, None]
    return torch.where(valid, loss, 0.0), dz


@interpreter
@pytest.mark.parametrize("launch", [ROW_LAUNCHES["no_prefetch"]], ids=["no_prefetch"])  # the interpreter ignores eviction hints
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("vocab, softcap, smoothing", [(37, 0.0, 0.0), (48, 5.0, 0.0), (5, 0.0, 0.2), (70, 3.0, 0.1)])
def test_row_kernel_launch_variants(vocab, softcap, smoothing, dtype, launch):
    """The launch keywords change only the row kernel's schedule: loss and dz bit for bit the default
    launch's, and (float32) both within 1e-5 of float64. Rows of less than one to five blocks of 16,
    masked tails, peaked rows, an ignored row; 7 rows on 3 programs (a grid stride)."""
    g = torch.Generator().manual_seed(vocab)
    z0 = (torch.randn(7, vocab, generator=g) * torch.tensor([1.0, 8.0, 0.5, 3.0, 1.0, 12.0, 2.0])[:, None]).to(dtype)
    targets = torch.randint(0, vocab, (7,), generator=g)
    targets[3] = -100
    weight = torch.full((), 1 / 6)
    (loss, dz), (loss_variant, dz_variant) = (_rows_launched(z0, targets, weight, softcap, smoothing, keywords)
                                              for keywords in ({}, launch))
    assert torch.equal(loss_variant, loss) and torch.equal(dz_variant, dz)
    if dtype == torch.float32:
        want_loss, want_dz = _rows_float64(z0, targets, weight, -100, softcap, smoothing)
        assert rel(loss, want_loss) <= 1e-5 and rel(dz, want_dz) <= 1e-5, (rel(loss, want_loss), rel(dz, want_dz))


def test_workspace_rows_rule():
    gib = 2**30
    assert workspace.workspace_rows(8192, 256000, 2, gib) == 2048  # 2097 fit: 4 chunks
    assert workspace.workspace_rows(8192, 128256, 2, gib) == 4096  # 4186 fit: 2 chunks
    assert workspace.workspace_rows(8000, 256000, 2, gib) == 2048  # 2000 rounded up to 128s: still fits
    assert workspace.workspace_rows(8192, 256000, 4, gib) == 1024  # float32: 1048 fit -> 8 chunks of 1024
    assert workspace.workspace_rows(37, 101, 4, 1) == 1  # below one row: one row
    assert workspace.workspace_rows(37, 101, 4, 10**9) == 37  # all fit: never more rows than tokens
    assert workspace.workspace_rows(0, 101, 4, 10**9) == 0
    for n in (1, 37, 1000, 8191):
        for fit in (1, 3, 37, 129, 4000):
            rows = workspace.workspace_rows(n, 7, 1, 7 * fit)
            assert 1 <= rows <= min(n, fit)


def _leaves(e, c, b):
    return [None if t is None else t.detach().clone().requires_grad_() for t in (e, c, b)]


def _case_inputs(dtype=torch.float32, bias=True, n_ignored=3, v=INTERPRETER_V, **kw):
    return make_inputs(Case("t", bias=bias, n_ignored=n_ignored, v=v, **kw), dtype, "cpu")


@interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_upstream_scalar_scales_the_gradients(reduction, spy):
    e, c, y, b = _case_inputs()
    ref = _leaves(e, c, b)
    loss = naive_linear_cross_entropy(ref[0].double(), ref[1].double(), y, ref[2].double(), reduction=reduction)
    (loss * 0.37 + 2.0 * loss).backward()
    ours = _leaves(e, c, b)
    out = linear_cross_entropy(*ours[:2], y, ours[2], reduction=reduction, impl="triton", max_workspace_bytes=400)
    # The loss used twice: autograd sums the two upstream gradients before the op's one backward.
    (out * 0.37 + 2.0 * out).backward()
    for a, r in zip(ours, ref):
        assert rel(a.grad, r.grad) <= 1e-5
    assert spy


@interpreter
def test_grad_outputs_and_expanded_upstream():
    e, c, y, b = _case_inputs(bias=False)
    leaves = _leaves(e, c, None)[:2]
    out = linear_cross_entropy(*leaves, y, impl="triton", max_workspace_bytes=1000)
    ge, gc = torch.autograd.grad(out.expand(3, 2).sum(), leaves)  # the scalar's grad: 6
    ref = _leaves(e, c, None)[:2]
    naive_linear_cross_entropy(ref[0].double(), ref[1].double(), y).mul(6.0).backward()
    assert rel(ge, ref[0].grad) <= 1e-5 and rel(gc, ref[1].grad) <= 1e-5


@interpreter
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, False, False)], ids=["e", "c", "bias", "none"])
def test_grads_only_for_inputs_that_require_them(needs, monkeypatch):
    e, c, y, b = _case_inputs()
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((e, c, b), needs)]
    gemms = []
    mm, addmm_ = torch.mm, torch.Tensor.addmm_
    monkeypatch.setattr(torch, "mm", lambda *a, **k: gemms.append("mm") or mm(*a, **k))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **k: gemms.append("addmm_") or addmm_(*a, **k))
    out = linear_cross_entropy(*leaves[:2], y, leaves[2], impl="triton", max_workspace_bytes=10 * INTERPRETER_V * 4)
    monkeypatch.undo()
    ref = naive_linear_cross_entropy(e.double(), c.double(), y, b.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # 4 chunks of 10 rows: the logits GEMM per chunk (addmm with the bias), plus dE / dC only where needed.
    assert len(gemms) == 4 * (needs[0] + needs[1])
    if any(needs):
        out.backward()
        ref_leaves = [t.double().requires_grad_() for t in (e, c, b)]
        naive_linear_cross_entropy(*ref_leaves[:2], y, ref_leaves[2]).backward()
        for leaf, r, need in zip(leaves, ref_leaves, needs):
            assert (leaf.grad is not None) == need
            if need:
                assert rel(leaf.grad, r.grad) <= 1e-5
    else:
        assert not out.requires_grad


@interpreter
def test_gradients_are_handed_over_without_a_copy(monkeypatch):
    """The backward scales the forward's gradient buffers in place and autograd keeps them as .grad:
    peak memory holds one set of gradients."""
    made = {}
    fused = workspace.lce_fused_reduced

    def recording(*args, **kwargs):
        out = fused(*args, **kwargs)
        made.update(de=out[1].data_ptr(), dc=out[2].data_ptr())
        return out

    monkeypatch.setattr(workspace, "lce_fused_reduced", recording)
    e, c, y, _ = _case_inputs(bias=False)
    leaves = _leaves(e.view(1, 37, 45), c, None)[:2]
    (linear_cross_entropy(*leaves, y.view(1, 37), impl="triton", max_workspace_bytes=1000) * 3.0).backward()
    assert leaves[0].grad.data_ptr() == made["de"] and leaves[1].grad.data_ptr() == made["dc"]


@interpreter
def test_no_grad_computes_the_loss_only(spy):
    e, c, y, b = _case_inputs()
    with torch.no_grad():
        out = linear_cross_entropy(e.requires_grad_(), c, y, b, impl="triton", max_workspace_bytes=2000)
    torch.testing.assert_close(out.double(), naive_linear_cross_entropy(e.double(), c.double(), y, b.double()),
                               rtol=1e-5, atol=1e-6)
    assert spy


@interpreter
@pytest.mark.parametrize("reduction, expect_nan", [("mean", True), ("sum", False)])
def test_all_targets_ignored(reduction, expect_nan):
    e, c, y, _ = _case_inputs(bias=False, n_ignored=37)
    leaves = _leaves(e, c, None)[:2]
    out = linear_cross_entropy(*leaves, y, reduction=reduction, impl="triton", max_workspace_bytes=1000)
    ref = naive_linear_cross_entropy(e.double(), c.double(), y, reduction=reduction)
    torch.testing.assert_close(out.double(), ref, equal_nan=True)
    assert torch.isnan(out).item() == expect_nan
    out.backward()  # zero gradients, as the default path (the mean's 1/0 never meets a valid row)
    assert leaves[0].grad.abs().max() == 0 and leaves[1].grad.abs().max() == 0


@interpreter
def test_out_of_range_target_gives_nan_at_the_kernel_level():
    """The public function rejects such targets on the CPU; the kernel's own contract is NaN."""
    e, c, y, _ = _case_inputs(bias=False, n_ignored=0)
    y = y.clone()
    y[4] = c.shape[0]  # one past the last class
    loss, *_ = workspace.lce_fused_reduced(e, c, None, y, -100, 0.0, 0.0, False, 10**6, False, False, False)
    assert torch.isnan(loss)


@interpreter
def test_backward_twice_and_double_backward_raise():
    e, c, y, _ = _case_inputs(bias=False)
    leaves = _leaves(e, c, None)[:2]
    out = linear_cross_entropy(*leaves, y, impl="triton", max_workspace_bytes=1000)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()
    out = linear_cross_entropy(*leaves, y, impl="triton", max_workspace_bytes=1000)
    with pytest.raises(RuntimeError, match="double backward"):
        (ge,) = torch.autograd.grad(out, leaves[0], create_graph=True)
        ge.sum().backward()


@pytest.mark.parametrize("value", [-1, 1.5, True, "1GiB", "AUTO", 2.0**30])
def test_bad_workspace_raises(value):
    e, c, y, _ = _case_inputs(bias=False)
    with pytest.raises(ValueError, match='max_workspace_bytes must be None, "auto" or an int >= 0'):
        linear_cross_entropy(e, c, y, max_workspace_bytes=value)


def test_auto_budget_rule():
    gb80, mib = 80 * 10**9, 2**20
    # a quarter of the logits: 2048 of 8192 rows, 4096 of 16384
    assert workspace.auto_workspace_bytes(8192, 256000, 2, gb80) == 2048 * 256000 * 2
    assert workspace.auto_workspace_bytes(16384, 151936, 2, gb80) == 4096 * 151936 * 2
    assert workspace.workspace_rows(8192, 128256, 2, workspace.auto_workspace_bytes(8192, 128256, 2, gb80)) == 2048
    # at least 512 rows (all of them when fewer), however short the input
    assert workspace.auto_workspace_bytes(1000, 256000, 2, gb80) == 512 * 256000 * 2
    assert workspace.auto_workspace_bytes(37, 101, 4, gb80) == 37 * 101 * 4
    # at most 1/32 of the device
    assert workspace.auto_workspace_bytes(65536, 256000, 2, gb80) == gb80 // 32
    assert workspace.auto_workspace_bytes(8192, 256000, 2, 16 * 2**30) == 16 * 2**30 // 32
    # at least one row, and no device limit on the CPU (the interpreter)
    assert workspace.auto_workspace_bytes(100, 10**6, 4, 1 * mib) == 10**6 * 4
    assert workspace.auto_workspace_bytes(10**6, 1000, 4, None) == 250_000 * 1000 * 4
    # it applies where 512 rows fit in the device's share
    assert workspace.auto_fits(256000, 2, gb80) and workspace.auto_fits(10, 4, None)
    assert not workspace.auto_fits(256000, 2, 4 * 2**30)  # 262 MB of rows > 128 MiB


@interpreter
@pytest.mark.parametrize("n, chunks", [(37, [13, 13, 11]), (100, [25] * 4)])
def test_auto_runs_chunks_of_a_quarter(n, chunks, spy, monkeypatch):
    """The op sizes "auto" per call: a quarter of the rows (100 -> 25), at least AUTO_MIN_ROWS (set to
    16 here, so that the interpreter runs small inputs: 37 -> 16 rows, spread evenly over 3 chunks)."""
    monkeypatch.setattr(workspace, "AUTO_MIN_ROWS", 16)
    e, c, y, b = _case_inputs(bias=False, n=n)
    ours = linear_cross_entropy(e.requires_grad_(), c, y, impl="triton", max_workspace_bytes="auto")
    assert ours.item() == pytest.approx(linear_cross_entropy(e, c, y, impl="torch").item(), rel=1e-5)
    assert spy == [(r, INTERPRETER_V) for r in chunks]


@interpreter
def test_compiled_backward_twice_gives_the_same_gradients(spy):
    """A compiled step's backward copies the gradients before scaling them: retain_graph works there
    (the eager op raises instead, test_backward_twice_and_double_backward_raise)."""
    e, c, y, b = _case_inputs(bias=False)
    e, c = e.requires_grad_(), c.requires_grad_()
    torch._dynamo.reset()
    step = torch.compile(lambda e, c, y: 3 * linear_cross_entropy(e, c, y, impl="triton", max_workspace_bytes="auto"))
    loss = step(e, c, y)
    first = [g.clone() for g in torch.autograd.grad(loss, (e, c), retain_graph=True)]
    second = torch.autograd.grad(loss, (e, c))
    want = torch.autograd.grad(3 * linear_cross_entropy(e, c, y, impl="torch"), (e, c))
    assert spy
    for a, b, w in zip(first, second, want):
        assert torch.equal(a, b) and rel(a, w) <= 1e-5


@interpreter
def test_auto_without_gradients_is_the_exact_forward(spy):
    e, c, y, b = _case_inputs()
    with torch.no_grad():
        linear_cross_entropy(e.requires_grad_(), c, y, b, impl="triton", max_workspace_bytes="auto")
    linear_cross_entropy(e.detach(), c.detach(), y, b, impl="triton", max_workspace_bytes="auto")
    assert not spy


@interpreter
@pytest.mark.parametrize("kwargs", [dict(max_workspace_bytes=0), dict(max_workspace_bytes=None), dict(),
                                    dict(max_workspace_bytes="auto", exact=False)],
                         ids=["zero", "none", "default", "auto_filtered"])
def test_exact_recompute_where_no_workspace_is_asked_for(kwargs, spy):
    e, c, y, b = _case_inputs()
    c.requires_grad_()
    assert torch.equal(linear_cross_entropy(e, c, y, b, impl="triton", **kwargs),
                       linear_cross_entropy(e, c, y, b, impl="triton", max_workspace_bytes=0))
    assert not spy


@interpreter
@pytest.mark.parametrize("kwargs", [
    dict(reduction="none"),
    dict(return_lse=True),
    dict(impl="torch"),
    dict(impl="auto"),  # CPU tensors: the torch path
    dict(dtype=torch.float16),  # gradients formed before a GradScaler's scale would underflow
], ids=["none", "lse", "torch", "auto_cpu", "float16"])
def test_falls_back_where_it_does_not_apply(kwargs, spy):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", torch.float32)
    kwargs.setdefault("impl", "triton")
    e, c, y, b = _case_inputs(dtype=dtype)
    plain = linear_cross_entropy(e, c, y, b, **kwargs)
    ours = linear_cross_entropy(e, c, y, b, max_workspace_bytes=1000, **kwargs)
    for a, r in zip(ours if isinstance(ours, tuple) else (ours,), plain if isinstance(plain, tuple) else (plain,)):
        assert torch.equal(a, r)
    assert not spy


@interpreter
def test_autocast_casts_and_grads_reach_float32_leaves(spy):
    e, c, y, _ = _case_inputs(bias=False)
    leaves = _leaves(e, c, None)[:2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(*leaves, y, impl="triton", max_workspace_bytes=1000)
    out.backward()
    ref = naive_linear_cross_entropy(e.bfloat16().double(), c.bfloat16().double(), y)
    assert out.dtype == torch.float32 and abs(out.double() - ref) <= 1e-2 * abs(ref)
    assert leaves[0].grad.dtype == torch.float32 and leaves[1].grad.dtype == torch.float32
    assert spy


@interpreter
def test_opcheck():
    e, c, y, b = _case_inputs(n=9)  # the registration, not the numerics: two chunks of a few rows
    for bias in (None, b):
        for needs in ((True, True, True), (False, True, False)):
            args = (e.requires_grad_(needs[0]), c.requires_grad_(needs[1]), y,
                    None if bias is None else bias.requires_grad_(needs[2]),
                    -100, 2.0, 0.1, True, 1000, *needs)
            # Not the aot_dispatch tests: they return every output to the caller, and the backward
            # scales the gradient outputs in place (no second copy of dC), which AOTAutograd cannot
            # express for a returned output. The public function never returns them; compiling it is
            # covered by test_compiles_without_graph_break.
            torch.library.opcheck(torch.ops.cce_inductor.lce_fused_reduced.default, args,
                                  test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    grad = torch.randn(5, 3)
    torch.library.opcheck(torch.ops.cce_inductor.lce_scale_.default, (grad, torch.tensor(0.5)),
                          test_utils=("test_schema", "test_faketensor"))


@interpreter
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles_without_graph_break(dynamic, spy):
    def step(e, c, y, b):
        return linear_cross_entropy(e, c, y, b, shift=1, softcap=3.0, label_smoothing=0.05, impl="triton",
                                    max_workspace_bytes=3 * 37 * 4)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    c = torch.randn(37, 12, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    for seq in (5, 9):
        e = torch.randn(2, seq, 12, requires_grad=True)
        y = torch.randint(0, 37, (2, seq))
        (out, grads), (ref, ref_grads) = [
            (lambda o: (o, torch.autograd.grad(o * 1.5, (e, c, b))))(f(e, c, y, b)) for f in (compiled, step)
        ]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            assert rel(g, r) < 1e-5
    assert spy


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
GIB = 2**30


@gpu
@pytest.mark.parametrize("dtype, rows", [(torch.float32, 1), (torch.float32, 5), (torch.float32, 10_000),
                                         (torch.bfloat16, 10), (torch.bfloat16, 10_000)],
                         ids=["float32-one_row", "float32-five_rows", "float32-all_rows", "bfloat16-four_chunks",
                              "bfloat16-one_chunk"])
@pytest.mark.parametrize("case", APPLICABLE, ids=lambda c: c.name)
def test_gpu_cases_match_float64(case, rows, dtype, spy):
    """float32 within 1e-5 of float64 at any chunking; bf16 within the kernels' margin of torch up to
    four chunks (dC's growth beyond that: test_bfloat16_dc_error_grows_like_sqrt_chunks)."""
    check_case(with_workspace(case, rows, dtype), dtype, "cuda")
    assert spy


@gpu
@pytest.mark.parametrize("regime", ["uniform", "lm"])
def test_gpu_bf16_accuracy_bar(regime):
    """Loss within 1e-3 of float32 math on the same bf16 inputs; gradients no worse than
    max(1.5 x plain torch bf16, 5e-3), with 1 GiB of workspace (several chunks at this shape)."""
    from cce_inductor.testing import make_inputs as make_regime

    n, d, v = BAR_SHAPE
    inp = make_regime(regime, n, d, v, device="cuda", seed=0)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gold = loss_and_grads(lambda e, c, y: F.cross_entropy(e.float() @ c.float().T, y), inp.e, inp.c, inp.targets)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    plain = loss_and_grads(lambda e, c, y: F.cross_entropy(F.linear(e, c).float(), y), inp.e, inp.c, inp.targets)
    ours = loss_and_grads(lambda e, c, y: linear_cross_entropy(e, c, y, impl="triton", max_workspace_bytes=GIB),
                  inp.e, inp.c, inp.targets)
    loss_err = rel(ours[0], gold[0])
    errs = {name: (rel(ours[i], gold[i]), rel(plain[i], gold[i])) for i, name in ((1, "dE"), (2, "dC"))}
    print(f"{regime} workspace loss {loss_err:.1e} (torch bf16 {rel(plain[0], gold[0]):.1e}) "
          + " ".join(f"{k} ours {a:.2e} torch-bf16 {t:.2e}" for k, (a, t) in errs.items()))
    assert loss_err <= 1e-3
    for name, (err, torch_err) in errs.items():
        assert err <= max(1.5 * torch_err, 5e-3), (regime, name, err, torch_err)


def _gpu_rows(vocab, seed):
    """300 bf16 rows of logits ~ N(0, 16) on the GPU, row 7 ignored: (z0, targets, mean weight)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = 300
    z0 = (torch.randn(rows, vocab, device="cuda", generator=g) * 4).bfloat16()
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    targets[7] = -100
    return z0, targets, torch.full((), 1 / (rows - 1), device="cuda")


@gpu
@pytest.mark.parametrize("launch", ROW_LAUNCHES.values(), ids=ROW_LAUNCHES.keys())
@pytest.mark.parametrize("vocab, softcap", [(128256, 0.0), (50001, 30.0)])
def test_gpu_row_kernel_launch_variants(vocab, softcap, launch):
    """On the GPU's code path too, the schedule keywords leave loss and dz bit for bit the default's
    (bf16 rows of 4 and 8 blocks, an odd V's masked tail, an ignored row, more rows than programs)."""
    z0, targets, weight = _gpu_rows(vocab, seed=0)
    (loss, dz), (loss_variant, dz_variant) = (_rows_launched(z0, targets, weight, softcap, 0.0, keywords)
                                              for keywords in ({}, launch))
    assert torch.equal(loss_variant, loss) and torch.equal(dz_variant, dz)
    assert torch.isfinite(loss).all() and dz[7].abs().max() == 0


@gpu
@pytest.mark.parametrize("vocab, softcap", [(128256, 0.0), (50001, 30.0)])
def test_gpu_row_kernel_block_size_changes_only_the_last_bits(vocab, softcap):
    """The block size and warps change the order of each row's sums: the launch before 2026-12-02
    (32 KB blocks, 16 warps, one program per SM) against the default, and both against float64."""
    z0, targets, weight = _gpu_rows(vocab, seed=1)
    old = {"block_bytes": 32768, "warps": 16, "programs_per_sm": 1, "evict_sweep2": False}
    (loss, dz), (loss_old, dz_old) = (_rows_launched(z0, targets, weight, softcap, 0.0, keywords)
                                      for keywords in ({}, old))
    want_loss, want_dz = _rows_float64(z0, targets, weight, -100, softcap, 0.0)
    assert rel(loss, loss_old) <= 1e-6 and rel(loss, want_loss) <= 1e-5
    # dz in bf16: a last-bit difference of the float32 lse moves a stored value by at most one bf16 step
    step = 2.0**-7 * dz_old.float().abs()
    assert ((dz.float() - dz_old.float()).abs() <= step).all()
    assert rel(dz.float(), want_dz) <= 4e-3 and rel(dz_old.float(), want_dz) <= 4e-3


@gpu
def test_gpu_workspace_past_2_pow_31_elements():
    """One chunk of 8500 x 256000 > 2^31 logits: the row offsets must be 64-bit."""
    n, d, v = 8500, 128, 256000
    g = torch.Generator(device="cuda").manual_seed(0)
    e = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    c = (torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d)).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[-1] = v - 1
    assert workspace.workspace_rows(n, v, 2, 5 * GIB) * v > 2**31
    ours = loss_and_grads(lambda e, c, y: linear_cross_entropy(e, c, y, impl="triton", max_workspace_bytes=5 * GIB),
                          e, c, y)
    ref = loss_and_grads(lambda e, c, y: linear_cross_entropy(e, c, y, impl="torch"), e, c, y)
    assert rel(ours[0], ref[0]) <= 1e-4
    assert rel(ours[1], ref[1]) <= 1e-2 and rel(ours[2], ref[2]) <= 1e-2
    assert rel(ours[1][-100:], ref[1][-100:]) <= 1e-2  # the last rows: wrong 32-bit offsets land here


@gpu
@pytest.mark.parametrize("shape", [(8192, 2304, 256000), (8192, 4096, 128256)], ids=["gemma2", "llama3"])
def test_gpu_memory_bound(shape):
    """Peak memory above the inputs during forward + backward <= workspace + gradients + 64 MB."""
    n, d, v = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    e = (torch.randn(n, d, device="cuda", generator=g) / math.sqrt(d)).bfloat16().requires_grad_()
    c = torch.randn(v, d, device="cuda", generator=g).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)

    def step():
        linear_cross_entropy(e, c, y, impl="triton", max_workspace_bytes=GIB).backward()

    step()  # warm-up: Triton compilation, cuBLAS handles and workspaces
    e.grad = c.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    rows = workspace.workspace_rows(n, v, 2, GIB)
    bound = rows * v * 2 + (e.numel() + c.numel()) * 2 + 64 * 2**20
    print(f"{shape}: peak extra {extra / GIB:.3f} GiB, bound {bound / GIB:.3f} GiB ({rows} rows per chunk)")
    assert rows * v * 2 <= GIB
    assert extra <= bound

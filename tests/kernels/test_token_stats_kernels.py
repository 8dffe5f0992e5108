"""The Triton kernels of linear_token_stats (kernels/token_stats.py): under the Triton interpreter on
small odd shapes (N = 37, D = 20 or 13, V = 101; the interpreter's tiles are 16 x 16 x 16, so every
dimension spans several tiles with a masked edge, and D = 20 loads through TMA descriptors while
D = 13 loads through pointers), and on CUDA (``gpu``) at the same cases and at a realistic head.
Values and gradients against the float64 definition, with the checks of tests/test_token_stats.py.
"""

import dataclasses
import math
import os

import pytest
import torch

from cce_inductor import linear_token_stats
from cce_inductor.token_stats import naive_token_stats
from test_token_stats import CASES, check, rel

kernels = pytest.importorskip("cce_inductor.kernels")
if not kernels.AVAILABLE:  # pragma: no cover
    pytest.skip("triton is not installed", allow_module_level=True)

from cce_inductor.kernels import token_stats as stats_kernels  # noqa: E402

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs under the Triton interpreter")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warnings of masked lanes

# D = 20: two steps of the 16-wide tiles, TMA loads; the transposed and per-token cases keep D = 13
# (pointer loads).
KERNEL_CASES = [c if c.name in ("transposed_c", "per_token_temperature") else dataclasses.replace(c, d=20)
                for c in CASES]


@interpreter
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.name)
def test_interpreter_matches_float64(case):
    check(case, "triton")


@interpreter
@pytest.mark.parametrize("case, dtype", [(KERNEL_CASES[0], torch.bfloat16), (KERNEL_CASES[6], torch.float16),
                                         (KERNEL_CASES[7], torch.bfloat16)],
                         ids=["plain-bfloat16", "softcap_temperature-float16", "learnable_temperature-bfloat16"])
def test_interpreter_low_precision_no_worse_than_torch(case, dtype):
    check(case, "triton", dtype)


def _raw_inputs(n=37, d=20, v=101, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g) * scale
    c = torch.randn(v, d, generator=g) / math.sqrt(d)
    b = torch.randn(v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    return e, c, b, y


@interpreter
def test_forward_combines_splits_in_steps():
    """The combine kernel's loop over the vocabulary splits, one split per step (its running max,
    sum, entropy term and arg-max carried between steps), gives the one-step result; the split
    count is the launcher's (at least two here)."""
    e, c, _, y = _raw_inputs(scale=4.0)
    c[90] = c[3]  # an arg-max tie across splits
    e[1] = c[3] * 20
    one_step = stats_kernels.stats_forward(e, c, None, y, -100, 0.0, 1.0, True, True, True, True)
    steps = stats_kernels.stats_forward(e, c, None, y, -100, 0.0, 1.0, True, True, True, True, splits_per_step=1)
    gold = naive_token_stats(e.double(), c.double(), y)
    z = e.double() @ c.double().T
    p = z.softmax(-1)
    gold = (*gold, (p * (z - (p * z).sum(-1, keepdim=True)) ** 2).sum(-1))
    assert steps[2][1] == 3
    for a, s, r in zip(one_step, steps, gold):
        if r.is_floating_point():
            assert rel(a, r) <= 1e-5 and rel(s, r) <= 1e-5
        else:
            assert torch.equal(a, r) and torch.equal(s, r)


@interpreter
def test_backward_windows_and_chunks_agree_with_one_window():
    """A buffer of a few tiles splits the backward into several windows of tokens and chunks of the
    vocabulary (dE accumulated over chunks, dC over windows, dbias by atomics): the same gradients."""
    e, c, b, y = _raw_inputs()
    _, h, _, lse, _ = stats_kernels.stats_forward(e, c, b, y, -100, 3.0, 0.8, False, True, False)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(37, generator=g) for _ in range(3)]
    args = (e, c, b, y, lse, h, *grads, -100, 3.0, 0.8, True, True, True)
    whole = stats_kernels.stats_backward(*args)
    # 16 x 16 tiles: 32 rows x 48 columns of float32 dz plus 32 rows of dE's accumulator
    small = stats_kernels.stats_backward(*args, buffer_bytes=32 * 48 * 4 + 32 * 20 * 4)
    gold = torch.ops.cce_inductor.token_stats_backward(e, c, y, b, lse.double(), h.double(),
                                                       *[x.double() for x in grads], -100, 3.0, 0.8, "torch",
                                                       True, True, True)
    for a, s, r in zip(whole, small, gold):
        assert rel(a, r) <= 1e-5 and rel(s, r) <= 1e-5


@interpreter
@pytest.mark.parametrize("which", ["lse", "entropy", "logprob_without_targets_read"])
def test_one_upstream_gradient(which):
    """The dz kernel's variants with one upstream gradient (the others None), dE and dC only."""
    e, c, _, y = _raw_inputs()
    lp, h, _, lse, _ = stats_kernels.stats_forward(e, c, None, y, -100, 0.0, 1.0, True, True, False)
    g = torch.randn(37, generator=torch.Generator().manual_seed(2))
    grads = {"lse": (None, None, g), "entropy": (None, g, None), "logprob_without_targets_read": (g, None, None)}[which]
    ours = stats_kernels.stats_backward(e, c, None, y, lse, h, *grads, -100, 0.0, 1.0, True, True, False)
    gold = torch.ops.cce_inductor.token_stats_backward(
        e, c, y, None, lse.double(), h.double(), *[None if x is None else x.double() for x in grads], -100, 0.0,
        1.0, "torch", True, True, False)
    assert ours[2] is None
    for a, r in zip(ours[:2], gold[:2]):
        assert rel(a, r) <= 1e-5


@interpreter
def test_argmax_ties_across_tiles_and_splits():
    """Exact ties (duplicate classifier rows) in one tile, in two tiles of one split and in two
    splits: the first index wins, as torch.argmax; for 16-bit inputs the comparison is of the
    logits rounded to the input dtype (eager's)."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(6, 16, generator=g)
    c = torch.randn(200, 16, generator=g) * 0.1
    c[3] = c[9] = e[0] * 3  # one tile
    c[20] = c[40] = e[1] * 3  # two tiles
    c[5] = c[190] = e[2] * 3  # far apart: two splits
    for dtype in (torch.float32, torch.bfloat16):
        am = linear_token_stats(e.to(dtype), c.to(dtype), logprob=False, argmax=True, impl="triton").argmax
        assert am[:3].tolist() == [3, 20, 5]
        torch.testing.assert_close(am, (e.to(dtype) @ c.to(dtype).T).argmax(-1))


@interpreter
def test_targets_none_and_fields_alone():
    e, c, b, y = _raw_inputs()
    out = linear_token_stats(e, c, None, b, logprob=False, entropy=True, lse=True, impl="triton")
    gold = naive_token_stats(e.double(), c.double(), None, b.double())
    assert out.logprob is None and out.argmax is None
    assert rel(out.entropy, gold.entropy) <= 1e-5 and rel(out.lse, gold.lse) <= 1e-5


@interpreter
def test_opcheck_triton(monkeypatch):
    from cce_inductor.kernels import token_stats_workspace

    monkeypatch.setattr(token_stats_workspace, "MIN_BUDGET_ROWS", 1)  # a budget of 3 rows keeps 3
    e, c, b, y = _raw_inputs(n=19, v=37)
    e.requires_grad_(), c.requires_grad_(), b.requires_grad_()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for budget, rows in ((0, 0), (-1, 19 // 2), (10**9, 19 // 2), (3 * 37 * 4, 3)):  # none, auto, capped, 3 rows
        args = (e, c, y, b, -100, 2.0, 0.5, True, True, True, True, "triton", budget)
        torch.library.opcheck(torch.ops.cce_inductor.token_stats_forward.default, args, test_utils=utils)
        lp, h, am, lse, _, kept = torch.ops.cce_inductor.token_stats_forward(*args)
        assert kept.shape == (rows, 37) and kept.dtype == e.dtype
        grads = [torch.randn(19) for _ in range(3)]
        bw = (e.detach(), c.detach(), y, b.detach(), lse.detach(), h.detach(), *grads, -100, 2.0, 0.5, "triton",
              True, True, True, kept)
        torch.library.opcheck(torch.ops.cce_inductor.token_stats_backward.default, bw, test_utils=utils)


# ----------------------------------------------------------------------------- the kept logits


# a subset of the cases: the row kernel's flags (softcap, temperature, an ignore_index that is a class),
# the bias, the shift, tensor temperatures, a transposed classifier, peaked data; the rest add nothing here
KEPT_CASES = ("plain", "peaked", "softcap_temperature", "learnable_temperature", "per_token_temperature",
              "shift_3d", "ignore_is_a_class", "transposed_c")


SEVEN_ROWS = 7 * 101 * 4  # a budget of 7 float32 rows of the cases' vocabulary: several recomputed chunks


@interpreter
@pytest.mark.parametrize("case, budget", [(c, "auto") for c in KERNEL_CASES if c.name in KEPT_CASES]
                         + [(c, SEVEN_ROWS) for c in KERNEL_CASES if c.name in ("softcap_temperature", "shift_3d")],
                         ids=lambda x: x.name if hasattr(x, "name") else ("seven_rows" if x == SEVEN_ROWS else x))
def test_interpreter_kept_logits_match_float64(case, budget, monkeypatch):
    """max_workspace_bytes: the first K tokens' logits kept from the forward (cuBLAS-like torch.mm, the
    row kernel's statistics), the backward over them and over chunks of K recomputed rows ("auto":
    half the tokens, one recomputed chunk; seven rows: five or more chunks, the last partial)."""
    from cce_inductor.kernels import token_stats_workspace

    monkeypatch.setattr(token_stats_workspace, "MIN_BUDGET_ROWS", 1)
    check(case, "triton", max_workspace_bytes=budget)


@interpreter
@pytest.mark.parametrize("case, dtype", [(KERNEL_CASES[1], torch.bfloat16), (KERNEL_CASES[6], torch.bfloat16)],
                         ids=["peaked-bfloat16", "softcap_temperature-bfloat16"])
def test_interpreter_kept_logits_low_precision_no_worse_than_torch(case, dtype):
    check(case, "triton", dtype, max_workspace_bytes="auto")


def _kept_run(e, c, b, y, budget, retain=False):
    leaves = [t.detach().clone().requires_grad_() for t in (e, c, b)]
    out = linear_token_stats(leaves[0], leaves[1], y, leaves[2], softcap=3.0, temperature=0.8, entropy=True,
                             lse=True, impl="triton", max_workspace_bytes=budget)
    g = torch.Generator().manual_seed(3)
    loss = sum((f * torch.randn(f.shape, generator=g)).sum() for f in (out.logprob, out.entropy, out.lse))
    grads = torch.autograd.grad(loss, leaves, retain_graph=retain)
    if retain:  # a second backward through the same graph: the kept logits were not overwritten
        again = torch.autograd.grad(loss, leaves)
        for a, b2 in zip(grads, again):
            assert torch.equal(a, b2)
    return grads


@interpreter
def test_kept_rows_argmax_compares_the_capped_logits_as_eager():
    """float32 with a softcap: logits that the cap saturates tie, and the first of them wins, in the
    kept rows as in the fused rows and eager (not the larger raw logit)."""
    e = torch.zeros(8, 4)
    e[:, 0] = 1.0
    c = torch.zeros(50, 4)
    c[5, 0], c[30, 0] = 400.0, 800.0  # 100 and 200 x the cap: both tanh to exactly 1 in float32
    for budget in ("auto", 0):
        am = linear_token_stats(e.requires_grad_(), c, logprob=False, argmax=True, lse=True, softcap=4.0,
                                impl="triton", max_workspace_bytes=budget).argmax
        assert am.tolist() == [5] * 8, (budget, am)


@interpreter
def test_kept_logits_chunks_sizes_and_second_backward(monkeypatch):
    """K rows kept, the rest recomputed in chunks of K (the last partial): the gradients equal the
    minimum-memory path's whatever K (3: 13 chunks, the last of one row; N/2) and a second backward
    gives the same."""
    from cce_inductor.kernels import token_stats_workspace

    monkeypatch.setattr(token_stats_workspace, "MIN_BUDGET_ROWS", 1)
    e, c, b, y = _raw_inputs()
    exact = _kept_run(e, c, b, y, 0)
    row_bytes = 101 * 4
    for rows in (3, 100):
        kept = _kept_run(e, c, b, y, rows * row_bytes, retain=rows == 3)
        for a, r in zip(kept, exact):
            assert rel(a, r) <= 1e-5, rows


def test_kept_rows_rule():
    """K: half of the tokens under "auto" within 1/32 of the device's memory; a budget's rows at
    most half the tokens; none for 0 (and none on the torch path or for float16: num_kept)."""
    from cce_inductor.kernels.token_stats_workspace import kept_rows
    from cce_inductor.token_stats import num_kept

    assert kept_rows(16384, 151936, 2, -1, 80 * 2**30) == 8192
    assert kept_rows(16384, 151936, 2, -1, 16 * 2**30) == 16 * 2**30 // 32 // (151936 * 2)
    assert kept_rows(16384, 151936, 2, -1, None) == 8192
    assert kept_rows(65536, 151936, 2, -1, 80 * 2**30) == 80 * 2**30 // 32 // (151936 * 2)
    assert kept_rows(16384, 151936, 2, 10**12, None) == 8192
    assert kept_rows(16384, 151936, 2, 151936 * 2 * 200, None) == 200
    # fewer than MIN_BUDGET_ROWS rows in the budget or in the device's share: none kept
    assert kept_rows(16384, 151936, 2, 151936 * 2 * 10, None) == 0
    assert kept_rows(16384, 151936, 2, -1, 2**30) == 0
    assert kept_rows(1, 100, 2, -1, None) == 0 and kept_rows(100, 100, 2, 0, None) == 0
    e, c, b = torch.empty(64, 8), torch.empty(100, 8), torch.empty(100)
    assert num_kept(e, c, b, "triton", -1) == 32 and num_kept(e, c, None, "torch", -1) == 0
    assert num_kept(e.half(), c.half(), None, "triton", -1) == 0 and num_kept(e, c, None, "triton", 0) == 0
    # operands of two dtypes (the raw op; the public function and autocast pass one): none kept
    assert num_kept(e.bfloat16(), c, None, "triton", -1) == 0 and num_kept(e, c, b.bfloat16(), "triton", -1) == 0


@interpreter
def test_kept_logits_only_where_a_gradient_is_formed():
    """Under no_grad, or with no input requiring grad, no logits are kept (the op's kept output empty)."""
    e, c, b, y = _raw_inputs()
    seen = []
    real = torch.ops.cce_inductor.token_stats_forward

    class Spy:
        def __call__(self, *args):
            out = real(*args)
            seen.append(out[5].shape[0])
            return out

    import cce_inductor.token_stats as ts

    original, ts.token_stats_forward = ts.token_stats_forward, Spy()
    try:
        linear_token_stats(e, c, y, impl="triton", max_workspace_bytes="auto")
        with torch.no_grad():
            linear_token_stats(e.requires_grad_(), c, y, impl="triton", max_workspace_bytes="auto")
        linear_token_stats(e, c, y, impl="triton", max_workspace_bytes="auto")
        linear_token_stats(e, c, y, impl="triton", max_workspace_bytes=0)
    finally:
        ts.token_stats_forward = original
    assert seen == [0, 0, 37 // 2, 0]


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.name)
def test_gpu_cases_match_float64(case, dtype):
    check(case, "triton", dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.name)
def test_gpu_kept_logits_cases(case, dtype):
    check(case, "triton", dtype, "cuda", max_workspace_bytes="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [None, "auto", 512 * 128256 * 2], ids=["exact", "auto", "quarter"])
@pytest.mark.parametrize("regime", ["uniform", "lm"])
def test_gpu_realistic_head_no_worse_than_torch(regime, budget):
    """N = 2048, D = 2048, V = 128256, bfloat16, logprob + entropy + lse with a random weighting:
    values and gradients against float32 math on the same inputs, no worse than the usual eager
    code's (bfloat16 logits upcast to float32), and the op's peak memory a fraction of the logits'."""
    from cce_inductor.testing import make_inputs as regime_inputs

    n, d, v = 2048, 2048, 128256
    inp = regime_inputs(regime, n, d, v, device="cuda", seed=0)
    g = torch.Generator(device="cuda").manual_seed(1)
    w = [torch.randn(n, generator=g, device="cuda") for _ in range(3)]

    def eager(e, c, y, compute):
        z = (e.to(compute) @ c.to(compute).T).float()
        logp = z.log_softmax(-1)
        return logp.gather(-1, y[:, None])[:, 0], -(logp.exp() * logp).sum(-1), z.logsumexp(-1)

    def ours(e, c, y):
        out = linear_token_stats(e, c, y, entropy=True, lse=True, max_workspace_bytes=budget)
        return out.logprob, out.entropy, out.lse

    def run(fn):
        e, c = (t.detach().clone().requires_grad_() for t in (inp.e, inp.c))
        outs = fn(e, c, inp.targets)
        sum((o * wi).sum() for o, wi in zip(outs, w)).backward()
        return [o.detach() for o in outs] + [e.grad, c.grad]

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gold = run(lambda e, c, y: eager(e, c, y, torch.float32))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    plain = run(lambda e, c, y: eager(e, c, y, torch.bfloat16))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    mine = run(ours)
    peak = torch.cuda.max_memory_allocated() - base
    for name, a, p, r in zip(("logprob", "entropy", "lse", "de", "dc"), mine, plain, gold):
        assert rel(a, r) <= 1.25 * rel(p, r) + 1e-6, (name, rel(a, r), rel(p, r))
    grads_bytes = (n + v) * d * 2
    # above the leaves (copies of e and c) and their gradients: an eighth of the float32 logits at most,
    # and with kept logits those (K rows) and the backward's buffer of as many
    kept = {None: 0, "auto": n // 2}.get(budget, n // 4) * v * 2
    assert peak - 2 * grads_bytes - 2 * kept < n * v * 4 / 8, peak


@interpreter
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_rl_loss_keeps_logits_and_matches_eager(dynamic):
    """backend="cce" (max_workspace_bytes "auto") on an RL loss, with static and dynamic shapes (the
    op's fake sizes its kept logits from a symbolic N): eager's loss and gradients, and explain()
    says how many tokens' logits are kept."""
    import cce_inductor

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 101, bias=False)

    def loss_fn(h, y, adv):
        logp = head(h).log_softmax(-1)
        lp = logp.gather(-1, y[:, None])[:, 0]
        ent = -(logp.exp() * logp).sum(-1)
        return -(adv * lp).mean() - 0.01 * ent.mean()

    compiled = torch.compile(loss_fn, backend="cce", options={"impl": "triton"}, dynamic=dynamic)
    for n in (64, 40):
        h = torch.randn(n, 16, requires_grad=True)
        y, adv = torch.randint(0, 101, (n,)), torch.randn(n)
        ours = compiled(h, y, adv)
        ours_grads = torch.autograd.grad(ours, [h, head.weight])
        gold = loss_fn(h, y, adv)
        gold_grads = torch.autograd.grad(gold, [h, head.weight])
        torch.testing.assert_close(ours, gold)
        for a, b in zip(ours_grads, gold_grads):
            torch.testing.assert_close(a, b)
    with cce_inductor.enable(impl="triton"):
        text = str(cce_inductor.explain(loss_fn, torch.randn(64, 16, requires_grad=True),
                                        torch.randint(0, 101, (64,)), torch.randn(64)))
    assert "kept logits (auto): 32 of 64 tokens' logits" in text, text


@interpreter
def test_kept_path_backward_materializes_no_zero_gradient_for_the_kept_logits():
    """The kept logits are an op output no one differentiates: autograd must not hand the backward a
    K x V tensor of zeros for them (outside the op, nothing of that size is made)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    e, c, _, y = _raw_inputs(n=64)
    e.requires_grad_(), c.requires_grad_()
    kept_numel = (64 // 2) * 101
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.numel() >= kept_numel and o.shape[-1] == 101:
                    seen.append((str(func), tuple(o.shape)))
            return out

    out = linear_token_stats(e, c, y, entropy=True, impl="triton", max_workspace_bytes="auto")
    loss = out.logprob.sum() + out.entropy.sum()
    with Log():
        loss.backward()
    assert seen == [], seen

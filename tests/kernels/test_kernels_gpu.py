"""The Triton kernels on CUDA: the interpreter tests' properties, large shapes, the accuracy bar,
determinism. Every test is marked ``gpu`` (skipped without CUDA)."""

import math

import pytest
import torch
import torch.nn.functional as F

from cce_inductor import linear_cross_entropy, reference
from cce_inductor.testing import make_inputs, regime_stats
from kernel_cases import BAR_SHAPE, CASES, check_case, loss_and_grads

pytestmark = pytest.mark.gpu

kernels = pytest.importorskip("cce_inductor.kernels")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cases_match_float64(case, dtype):
    check_case(case, dtype, "cuda")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("plain", "everything")], ids=lambda c: c.name)
def test_float16_cases(case):
    check_case(case, torch.float16, "cuda")


# ----------------------------------------------------------------------------- the accuracy bar


def _float32_math(e, c, y):
    return F.cross_entropy(e.float() @ c.float().T, y)


def _torch_bf16(e, c, y):
    return F.cross_entropy(F.linear(e, c).float(), y)


class _no_tf32:
    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


@pytest.fixture(scope="module", params=["uniform", "lm"])
def bar_inputs(request):
    n, d, v = BAR_SHAPE
    inp = make_inputs(request.param, n, d, v, device="cuda", seed=0)
    with _no_tf32():
        gold = loss_and_grads(_float32_math, inp.e, inp.c, inp.targets)
    plain = loss_and_grads(_torch_bf16, inp.e, inp.c, inp.targets)
    print(request.param, regime_stats(inp.e[:512], inp.c))
    return request.param, inp, gold, plain


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "filtered"])
def test_bf16_accuracy_bar(bar_inputs, exact):
    regime, inp, gold, plain = bar_inputs
    ours = loss_and_grads(lambda e, c, y: linear_cross_entropy(e, c, y, impl="triton", exact=exact),
                          inp.e, inp.c, inp.targets)
    loss_err = _rel(ours[0], gold[0])
    errs = {name: (_rel(ours[i], gold[i]), _rel(plain[i], gold[i])) for i, name in ((1, "dE"), (2, "dC"))}
    print(f"{regime} exact={exact} loss {loss_err:.1e} " + " ".join(f"{k} ours {a:.2e} torch-bf16 {b:.2e}" for k, (a, b) in errs.items()))
    assert loss_err <= 1e-3
    for name, (err, torch_err) in errs.items():
        assert err <= max(1.5 * torch_err, 5e-3), (regime, exact, name, err, torch_err)


# ----------------------------------------------------------------------------- large shapes


def _check_against_chunked(e, c, y, grad_tol=1e-2):
    """Ours against the pure-torch chunked path (float32 math on the same bf16 inputs)."""
    loss, lse = kernels.lce_forward(e, c, None, y, -100, 0.0, 0.0)
    ref_loss, ref_lse = reference.chunked_forward(e, c, None, y, -100, 0.0, 0.0)
    assert _rel(lse, ref_lse) <= 1e-5 and _rel(loss, ref_loss) <= 1e-4
    tail = slice(-100, None)  # the last rows: wrong 32-bit offsets would land here
    assert _rel(loss[tail], ref_loss[tail]) <= 1e-4
    g = torch.rand(e.shape[0], device=e.device)
    zero = torch.zeros_like(g)
    de, dc, _ = kernels.lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, False, True, True, False)
    ref_de, ref_dc, _ = reference.chunked_backward(e, c, None, y, ref_lse.float(), g, zero, -100, 0.0, 0.0,
                                                   True, True, False)
    assert _rel(de, ref_de) <= grad_tol and _rel(dc, ref_dc) <= grad_tol
    assert _rel(de[tail], ref_de[tail]) <= grad_tol and _rel(dc[-1000:], ref_dc[-1000:]) <= grad_tol


def test_n_times_v_past_2_pow_31():
    n, d, v = 8500, 128, 256000
    assert n * v > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    e = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    c = (torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d) * 3).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    _check_against_chunked(e, c, y)


def test_v_times_d_past_2_pow_31():
    n, d, v = 64, 8200, 2**18
    assert v * d > 2**31
    g = torch.Generator(device="cuda").manual_seed(1)
    e = (torch.randn(n, d, device="cuda", generator=g) / math.sqrt(d)).bfloat16()
    c = torch.randn(v, d, device="cuda", generator=g).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[-1] = v - 1  # the last row of C
    _check_against_chunked(e, c, y)
    del c
    torch.cuda.empty_cache()


def test_buffered_and_atomic_paths_agree():
    """The exact 16-bit backward goes through the dz buffer and cuBLAS (several windows and chunks
    here); the atomic path is the one the filter uses. Both against float32 math on the same inputs
    (bias, softcap, label smoothing, ignored tokens), and against each other."""
    from cce_inductor.kernels.backward import _HAS_ADDMM_DTYPE
    from cce_inductor.kernels.backward_buffered import buffered_shape

    print("torch has addmm(out_dtype):", _HAS_ADDMM_DTYPE)
    n, d, v = 3000, 1024, 50000
    g = torch.Generator(device="cuda").manual_seed(4)
    e = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    c = (torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d) * 2).bfloat16()
    b = torch.randn(v, device="cuda", generator=g).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::7] = -100
    softcap, ls, budget = 20.0, 0.1, 8 * 2**20
    assert buffered_shape(n, d, v, 2, budget, 128, 256)[0] < n  # several windows
    _, lse = kernels.lce_forward(e, c, b, y, -100, softcap, ls)
    gl, gs = torch.rand(n, device="cuda"), torch.rand(n, device="cuda") * 0.1
    args = (e, c, b, y, lse, gl, gs, -100, softcap, ls, False, True, True, True)
    buffered = kernels.lce_backward(*args, buffered=True, buffer_bytes=budget)
    atomic = kernels.lce_backward(*args, buffered=False)
    gold = reference.chunked_backward(e.float(), c.float(), b.float(), y, lse, gl, gs, -100, softcap, ls,
                                      True, True, True)
    for name, x, a, want in zip(("dE", "dC", "dbias"), buffered, atomic, gold):
        errs = _rel(x, want), _rel(a, want)
        print(name, "buffered %.2e atomic %.2e" % errs)
        assert errs[0] <= max(1.5 * errs[1], 5e-3), (name, errs)


# ----------------------------------------------------------------------------- determinism, filter


def test_determinism():
    """The forward has no atomics: bitwise equal. The backward: the exact 16-bit path's GEMMs are
    cuBLAS's (dbias alone uses atomics); the atomic path sums float32 atomics in a run-dependent
    order: equal up to float32 rounding of the accumulators (then rounded to bf16)."""
    inp = make_inputs("lm", 2048, 1024, 32768, device="cuda", seed=2)

    def step():
        e = inp.e.detach().clone().requires_grad_()
        c = inp.c.detach().clone().requires_grad_()
        loss = linear_cross_entropy(e, c, inp.targets, impl="triton", exact=True)
        loss.backward()
        return loss.detach(), e.grad, c.grad

    first, second = step(), step()
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1:], second[1:]):
        assert _rel(a, b) <= 1e-3
    print("backward bitwise equal:", all(torch.equal(a, b) for a, b in zip(first[1:], second[1:])))


def test_filtered_backward_under_torch_determinism():
    """The filtered backward's dE GEMM cuts its last wave into pieces (a tile's pieces added in a
    run-dependent order) unless torch's deterministic algorithms are on: then two runs are bitwise
    equal, and the two schedules agree up to float32 rounding (then rounded to bf16)."""
    inp = make_inputs("lm", 2048, 1024, 32768, device="cuda", seed=4)
    n = inp.e.shape[0]
    _, lse = kernels.lce_forward(inp.e, inp.c, None, inp.targets, -100, 0.0, 0.0)
    g = torch.full((n,), 1.0 / n, device="cuda")

    def grads():
        return kernels.lce_backward(inp.e, inp.c, None, inp.targets, lse, g, torch.zeros_like(g), -100, 0.0,
                                    0.0, True, True, True, False)[:2]

    free = grads()
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS needs an env var otherwise
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for a, b in zip(free, first):
        assert _rel(a, b) <= 1e-3


def test_filter_skips_only_where_the_softmax_allows():
    uniform = make_inputs("uniform", 2048, 512, 65536, device="cuda", seed=3)
    assert kernels.skipped_fraction(uniform.e, uniform.c, uniform.targets) == 0.0
    lm = make_inputs("lm", 2048, 512, 65536, device="cuda", seed=3)
    # At D = 512 this generator's softmax is flatter than at the benchmark's shapes: the filter's
    # eps = 1/8 skips almost nothing there (the rule simulated in float32 on the CPU: s = 0.0006).
    # Logits scaled by 1.5 are peaked enough (simulated s = 0.53).
    s = kernels.skipped_fraction(lm.e * 1.5, lm.c, lm.targets)
    print("lm skipped fraction", s)
    assert s > 0.0


def test_filtered_gemms_reduce_and_order_of_work():
    """The filtered GEMMs called directly at the GPU's tiles (TMA loads, dE's epilogue a TMA
    reduce-add, dC's a load and store through a descriptor) with their tiles in order of work and in
    index order, against float64 sums over the kept tiles: 1000 tokens (8 token tiles, the last
    partial) x 3000 entries (12 vocab tiles, the last partial; a chunk starting at row 40 of C) x D =
    512, keep counts differing between token tiles, 5 programs (dE: 16 tiles, dC: 48, several waves
    each, so both orders run). Both orders and dE's load-and-store epilogue give the same float32
    sums, bit for bit; dE with its last wave in pieces (16 tiles on 5 programs: 15 whole, 1 in 5
    pieces, added by the TMA reduce or by pointer atomics) the same sums up to their order; dE's
    epilogue in four column blocks the same sums; dC's as a bf16 TMA reduce-add the sum rounded
    twice."""
    from cce_inductor.kernels.backward_buffered import buffer_row_stride
    from cce_inductor.kernels.backward_filtered_dc import _tile_means, filtered_dc_gemm
    from cce_inductor.kernels.backward_filtered_de import filtered_de_gemm
    from cce_inductor.kernels.backward_shared import epilogue_descriptor
    from cce_inductor.kernels.common import buffered_config, filtered_dc_config, filtered_de_config, tma_descriptor

    n, d, v, v_begin = 1000, 512, 3000, 40
    gen = torch.Generator(device="cuda").manual_seed(11)
    dz = (torch.randn(n, buffer_row_stride(v), device="cuda", generator=gen) * 1e-2).bfloat16()[:, :v]
    e = torch.randn(n, d, device="cuda", generator=gen).bfloat16()
    c = (torch.randn(v_begin + v, d, device="cuda", generator=gen) / d**0.5).bfloat16()
    cfg = buffered_config(e)
    de_cfg, dc_cfg = filtered_de_config(e), filtered_dc_config(e)
    tiles_n, tiles_v = -(-n // cfg.block_n), -(-v // cfg.block_v)
    rates = torch.linspace(0.1, 0.95, tiles_n, device="cuda")[:, None]
    keep = (torch.rand(tiles_n, tiles_v, device="cuda", generator=gen) < rates).to(torch.int8)
    mask = keep.bool().repeat_interleave(cfg.block_n, 0).repeat_interleave(cfg.block_v, 1)[:n, :v]
    col_sums = torch.randn(tiles_n, v, device="cuda", generator=gen) * 1e-2 * ~mask[:: cfg.block_n]
    means = _tile_means(e, cfg.block_n)
    dc_old = torch.randn(v, d, device="cuda", generator=gen).bfloat16()
    descs = dict(dz_de=tma_descriptor(dz, [de_cfg.block_n, de_cfg.block_v], de_cfg),
                 c_de=tma_descriptor(c, [de_cfg.block_v, de_cfg.block_d], de_cfg),
                 dz_dc=tma_descriptor(dz, [dc_cfg.block_n, dc_cfg.block_v], dc_cfg),
                 e_dc=tma_descriptor(e, [dc_cfg.block_n, dc_cfg.block_d], dc_cfg))
    if None in descs.values():
        pytest.skip("no TMA descriptors on this GPU")
    kept = torch.where(mask, dz.double(), 0.0)
    de_want = 1.0 + kept @ c[v_begin:].double()
    dc_want = dc_old.double() + kept.T @ e.double() + col_sums.bfloat16().double().T @ means.bfloat16().double()
    for reduce, parts in ((True, 2), (False, 2), (True, 4)):
        acc = torch.ones(n, d, device="cuda")
        filtered_de_gemm(acc, dz, c, keep.view(-1), v_begin, de_cfg, cfg.block_v, 5,
                         dz_desc=descs["dz_de"], c_desc=descs["c_de"],
                         acc_desc=epilogue_descriptor(acc, de_cfg, de_cfg.block_n, parts),
                         epilogue_parts=parts, epilogue_reduce=reduce, split_last_wave=True)
        print("last wave in pieces, reduce", reduce, "parts", parts, "dE %.2e" % _rel(acc, de_want))
        assert _rel(acc, de_want) < 1e-5
    results = []
    for balanced, reduce in ((True, True), (False, True), (True, False)):
        acc = torch.ones(n, d, device="cuda")
        filtered_de_gemm(acc, dz, c, keep.view(-1), v_begin, de_cfg, cfg.block_v, 5,
                         dz_desc=descs["dz_de"], c_desc=descs["c_de"],
                         acc_desc=epilogue_descriptor(acc, de_cfg, de_cfg.block_n, 2),
                         epilogue_parts=2, epilogue_reduce=reduce, balanced=balanced, split_last_wave=False)
        dc = dc_old.clone()
        filtered_dc_gemm(dc, dz, e, keep.view(-1), col_sums, means, True, dc_cfg, cfg.block_n, cfg.block_v,
                         5, dz_desc=descs["dz_dc"], e_desc=descs["e_dc"],
                         dc_desc=epilogue_descriptor(dc, dc_cfg, dc_cfg.block_v, 1),
                         epilogue_parts=1, balanced=balanced)
        print("balanced", balanced, "reduce", reduce, "dE %.2e dC %.2e" % (_rel(acc, de_want), _rel(dc, dc_want)))
        assert _rel(acc, de_want) < 1e-5
        assert _rel(dc, dc_want) < 4e-3  # one bf16 rounding of the sum
        results.append((acc, dc))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    # dE's epilogue in four blocks: the same sums; dC's as a bf16 reduce-add (the sum rounded to bf16,
    # then added in L2 and rounded again; in one and two blocks)
    acc = torch.ones(n, d, device="cuda")
    filtered_de_gemm(acc, dz, c, keep.view(-1), v_begin, de_cfg, cfg.block_v, 5,
                     dz_desc=descs["dz_de"], c_desc=descs["c_de"],
                     acc_desc=epilogue_descriptor(acc, de_cfg, de_cfg.block_n, 4),
                     epilogue_parts=4, epilogue_reduce=True, split_last_wave=False)
    assert torch.equal(acc, results[0][0])
    for parts in (1, 2):
        dc = dc_old.clone()
        filtered_dc_gemm(dc, dz, e, keep.view(-1), col_sums, means, True, dc_cfg, cfg.block_n, cfg.block_v,
                         5, dz_desc=descs["dz_dc"], e_desc=descs["e_dc"],
                         dc_desc=epilogue_descriptor(dc, dc_cfg, dc_cfg.block_v, parts),
                         epilogue_parts=parts, epilogue_reduce=True)
        twice = (dc_old.float() + (dc_want - dc_old.double()).float().bfloat16().float()).bfloat16()
        print("dC reduce-add, parts", parts, "dC %.2e, against the twice-rounded sum %.2e"
              % (_rel(dc, dc_want), _rel(dc, twice)))
        assert _rel(dc, dc_want) < 4e-3
        assert _rel(dc, twice) < 1e-3  # what is left: the kernel's float32 sum against float64's


def test_corrected_dc_filter_matches_the_reference():
    """The filtered buffered backward (the GPU's 128 x 256 dz tiles, TMA, the Triton dE and dC GEMMs)
    against reference.filtered_backward in float64 on the same bf16 inputs: LM-like logits scaled by 4
    to be peaked (a quarter of the tiles skipped in a CPU run of the reference; scaled by 1.5, 2 of 264
    here), a bias, ignored tokens, N = 1000 (a partial token tile) in several windows, V = 8292 in
    several chunks (a partial vocab tile). The tiles skipped are the reference's (its float64 rule
    against the kernel's float32 one: a borderline tile may flip); dE and dC within 1.5x of the exact
    kernel's distance from the exact float64 gradients."""
    n, d, v = 1000, 256, 8292
    lm = make_inputs("lm", n, d, v, device="cuda", seed=3)
    e, c = (lm.e.float() * 4.0).bfloat16(), lm.c
    gen = torch.Generator(device="cuda").manual_seed(6)
    b = (torch.randn(v, device="cuda", generator=gen) * 0.1).bfloat16()
    y = lm.targets.clone()
    y[::13] = -100
    _, lse = kernels.lce_forward(e, c, b, y, -100, 0.0, 0.0)
    gl, gs = torch.rand(n, device="cuda", generator=gen) / n, torch.rand(n, device="cuda", generator=gen) * 1e-4
    args = (e, c, b, y, lse, gl, gs, -100, 0.0, 0.0)
    budget = 2 * 256 * 4096 + 4 * 256 * d  # windows of 256 tokens, chunks of 4096 and wider
    counts = torch.zeros(2, dtype=torch.int32, device="cuda")
    filtered = kernels.lce_backward(*args, True, True, True, True, buffer_bytes=budget, tile_counts=counts,
                                    dc_filter="corrected")
    exact = kernels.lce_backward(*args, False, True, True, True, buffer_bytes=budget)
    f64 = lambda t: t.double()  # noqa: E731

    def reference_grads(eps, dc_filter):
        return reference.filtered_backward(f64(e), f64(c), f64(b), y, f64(lse), f64(gl), f64(gs), -100, 0.0, 0.0,
                                           eps, 128, 256, dc_filter)

    want, want_exact = reference_grads(kernels.FILTER_EPS, "corrected"), reference_grads(0.0, "exact")
    skipped, total = int((~want[3]).sum()), want[3].numel()
    print("tiles skipped: kernel", counts.tolist(), "reference", skipped, "of", total)
    assert 0.05 * total < skipped < total and abs(int(counts[1]) - skipped) <= 2
    for name, got, got_exact, ref, ref_exact in zip(("dE", "dC"), filtered, exact, want, want_exact):
        errs = _rel(got, ref), _rel(got_exact, ref_exact)
        print(name, "filtered %.2e exact %.2e" % errs)
        assert errs[0] <= 1.5 * errs[1], (name, errs)
    assert _rel(filtered[2], exact[2]) <= 1e-6  # dbias: never filtered


def test_forward_keep_flags_and_the_listed_backward():
    """lce_forward_with_keep and lce_backward(keep=...) at the GPU's tiles (TMA, the flattened dz
    kernel walking its list of kept tiles, the filtered dE and dC GEMMs without stand-ins), against
    reference.filtered_backward(dc_filter="dropped") in float64 on the same bf16 inputs: LM-like
    logits scaled by 4 (peaked), ignored tokens, the plain loss's gradients (grad_lse = 0), N = 1000 (a
    partial token tile) in several windows, V = 8292 in several chunks (a partial vocab tile). The
    forward's flags are the reference's and the dz kernel's own (each up to 2 borderline tiles: their
    float32 sums against float64, and the forward's tile log-sum-exps against the recompute's sums);
    the forward's loss and lse are lce_forward's bit for bit; dE and dC within 1.5x of the exact
    kernel's distance from the exact float64 gradients."""
    from cce_inductor.kernels.forward import lce_forward_with_keep

    n, d, v = 1000, 256, 8292
    lm = make_inputs("lm", n, d, v, device="cuda", seed=3)
    e, c = (lm.e.float() * 4.0).bfloat16(), lm.c
    y = lm.targets.clone()
    y[::13] = -100
    loss, lse, keep = lce_forward_with_keep(e, c, None, y, -100, kernels.FILTER_EPS)
    want_loss, want_lse = kernels.lce_forward(e, c, None, y, -100, 0.0, 0.0)
    assert torch.equal(loss, want_loss) and torch.equal(lse, want_lse)
    gen = torch.Generator(device="cuda").manual_seed(6)
    gl, gs = (0.5 + torch.rand(n, device="cuda", generator=gen)) / n, torch.zeros(n, device="cuda")
    args = (e, c, None, y, lse, gl, gs, -100, 0.0, 0.0)
    budget = 2 * 256 * 4096 + 4 * 256 * d  # windows of 256 tokens, chunks of 4096 and wider
    counts = {name: torch.zeros(2, dtype=torch.int32, device="cuda") for name in ("listed", "dz kernel")}
    listed = kernels.lce_backward(*args, True, True, True, False, buffer_bytes=budget, keep=keep,
                                  tile_counts=counts["listed"])
    kernels.lce_backward(*args, True, True, True, False, buffer_bytes=budget, tile_counts=counts["dz kernel"])
    exact = kernels.lce_backward(*args, False, True, True, False, buffer_bytes=budget)
    f64 = lambda t: t.double()  # noqa: E731
    want, want_exact = (reference.filtered_backward(f64(e), f64(c), None, y, f64(lse), f64(gl), f64(gs), -100, 0.0,
                                                    0.0, eps, 128, 256, dc_filter)
                        for eps, dc_filter in ((kernels.FILTER_EPS, "dropped"), (0.0, "exact")))
    skipped, total = int((~want[3]).sum()), want[3].numel()
    print("tiles skipped: forward", counts["listed"].tolist(), "dz kernel", counts["dz kernel"].tolist(),
          "reference", skipped, "of", total, "flags differing", int((keep.bool() != want[3]).sum()))
    assert counts["listed"].tolist() == [int(keep.sum()), int((keep == 0).sum())]
    assert 0.05 * total < skipped < total and int((keep.bool() != want[3]).sum()) <= 2
    assert abs(int(counts["listed"][1]) - int(counts["dz kernel"][1])) <= 2
    for name, got, got_exact, ref, ref_exact in zip(("dE", "dC"), listed, exact, want, want_exact):
        errs = _rel(got, ref), _rel(got_exact, ref_exact)
        print(name, "listed %.2e exact %.2e" % errs)
        assert errs[0] <= 1.5 * errs[1], (name, errs)

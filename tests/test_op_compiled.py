"""Programs that plain torch.compile runs keep running, with the same values, gradients and errors,
under backend="cce" -- through the op, on the torch path and the Triton path (the interpreter on
the CPU) with and without the workspace:

* transposed operands: a weight stored (D, V) used as ``h @ W``, and ``F.linear(x.t(), W)``;
* ``ignore_index`` a valid class id, and a negative ``label_smoothing`` (torch: no smoothing);
* a target outside [0, V) that is not ignore_index raises (on the CPU; a GPU device-asserts),
  never a NaN loss with the finite gradients of another class."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from cce_inductor import linear_cross_entropy
from cce_inductor.ops import TargetOutOfRangeError

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the Triton path on the CPU: the interpreter")

N, D, V = 6, 12, 20
PATHS = {
    "torch": {},
    "triton": {"impl": "triton", "max_workspace_bytes": 0},  # the exact recompute (the default is "auto")
    "workspace": {"impl": "triton", "max_workspace_bytes": 4 * V * 4},  # chunks of 4 tokens
}


def program(h, x, y, w_dv, w_vd):
    """Two loss sites: a (D, V) weight used as h @ W, ignore_index a valid class id and a negative
    label smoothing; a transposed hidden state through F.linear."""
    return (F.cross_entropy(h @ w_dv, y, ignore_index=1, label_smoothing=-0.1)
            + F.cross_entropy(F.linear(x.t(), w_vd), y, ignore_index=1))


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g, dtype=torch.float64) * 2
    x = torch.randn(D, N, generator=g, dtype=torch.float64) * 2  # hidden states stored transposed
    w_dv = torch.randn(D, V, generator=g, dtype=torch.float64) / D**0.5
    w_vd = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[2] = 1  # ignored
    return [t.to(dtype) for t in (h, x, w_dv, w_vd)], y


def _run(fn, leaves, y):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    h, x, w_dv, w_vd = leaves
    loss = fn(h, x, y, w_dv, w_vd)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.fixture(scope="module", params=[
    "torch", pytest.param("triton", marks=interpreter), pytest.param("workspace", marks=interpreter)])
def compiled(request):
    """(path, the program compiled with backend="cce" on that path, its generated code), compiled
    and run once per module (compiling is the slow part). Inductor's on-disk graph caches are off
    for the compile: a graph cached with an older op's fake would be handed back otherwise."""
    torch._dynamo.reset()
    fn = torch.compile(program, backend="cce", options=PATHS[request.param], fullgraph=True)
    leaves, y = _inputs()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        _, code = run_and_get_code(_run, fn, leaves, y)
    yield request.param, fn, "\n".join(code)
    torch._dynamo.reset()


def test_compiled_program_matches_eager(compiled):
    """Both sites rewritten (the op in the code, the workspace op on that path); the loss and every
    gradient within 1e-5 of the float64 eager program."""
    path, fn, code = compiled
    op = "cce_inductor.lce_fused_reduced" if path == "workspace" else "cce_inductor.lce_forward"
    assert code.count(op) >= 2, code
    leaves, y = _inputs()
    loss, grads = _run(fn, leaves, y)
    ref_loss, ref_grads = _run(program, [t.double() for t in leaves], y)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    for g, r in zip(grads, ref_grads):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-5


@pytest.mark.parametrize("bad", [V, -5, -100], ids=["V", "-5", "-100 (not the ignore_index here)"])
def test_compiled_program_raises_for_an_out_of_range_target(compiled, bad):
    """As eager torch raises an IndexError, the compiled program raises one (TargetOutOfRangeError):
    no NaN loss with the finite gradients of another class."""
    _, fn, _ = compiled
    leaves, y = _inputs()
    y_bad = y.clone()
    y_bad[4] = bad
    with pytest.raises(IndexError):
        program(*leaves[:2], y_bad, *leaves[2:])
    with pytest.raises(TargetOutOfRangeError, match=f"found {bad}"):
        _run(fn, leaves, y_bad)


def test_label_smoothing_above_one_fails_as_under_plain_compile():
    """label_smoothing > 1: torch refuses it while tracing, before any rewrite, with and without the
    pass, with torch's message."""
    leaves, y = _inputs()

    def smoothed(h, w):
        return F.cross_entropy(h @ w, y, label_smoothing=1.5)

    for backend in ("eager", "cce"):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="label_smoothing must be between 0.0 and 1.0"):
            torch.compile(smoothed, backend=backend, fullgraph=True)(leaves[0], leaves[2])
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- GPU

GPU_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    from cce_inductor import linear_cross_entropy

    mode = sys.argv[1]
    e = torch.randn(64, 32, device="cuda", requires_grad=True)
    c = torch.randn(100, 32, device="cuda", requires_grad=True)
    y = torch.randint(0, 100, (64,), device="cuda")
    y[5] = int(sys.argv[2])
    if mode == "compiled":
        fn = torch.compile(lambda e, c, y: F.cross_entropy(e @ c.t(), y), backend="cce", fullgraph=True)
    else:
        options = {"max_workspace_bytes": 2**14} if mode == "workspace" else {}
        fn = lambda e, c, y: linear_cross_entropy(e, c, y, impl="triton", **options)
    loss = fn(e, c, y)
    loss.backward()
    torch.cuda.synchronize()
    print("finished", loss.item(), bool(e.grad.isfinite().all()))
    """
)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "compiled", "workspace"])
def test_gpu_out_of_range_target_device_asserts(mode):
    """On a GPU an out-of-range target is a device-side assert (checked without a host sync), as
    under plain torch.compile: the process gets a CUDA error and never a loss; in range, it runs.
    In a subprocess each: a device-side assert leaves the CUDA context unusable."""
    def run(target):
        return subprocess.run([sys.executable, "-c", GPU_SCRIPT, mode, str(target)], capture_output=True,
                              text=True, timeout=600)

    good = run(7)
    assert good.returncode == 0 and "finished" in good.stdout, good.stderr
    for target in (100, -5):
        bad = run(target)
        assert bad.returncode != 0 and "finished" not in bad.stdout
        assert "device-side assert" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"max_workspace_bytes": 2**20}], ids=["exact", "workspace"])
def test_gpu_target_check_makes_no_host_sync(options):
    """The op's forward and backward on a GPU, the target check included, under
    torch.cuda.set_sync_debug_mode("error"): any synchronizing call raises."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(300, 64, generator=g).bfloat16().cuda().requires_grad_()
    c = torch.randn(5000, 64, generator=g).bfloat16().cuda().requires_grad_()
    y = torch.randint(0, 5000, (300,), generator=g).cuda()
    y[::9] = -100
    linear_cross_entropy(e, c, y, impl="triton", **options).backward()  # warm up (compiles the kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        linear_cross_entropy(e, c, y, impl="triton", **options).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

"""Quick timing of the Triton kernels alone (the full side-by-side harness is ``benchmarks.lce_bench``).

    python -m benchmarks.kernel_timing --out kernel_timing.json

bf16, (N, D, V) = (8192, 2304, 256000) and (8192, 4096, 128256), both data regimes: T = ``e @ c.T``
(cuBLAS), our forward, forward+backward exact and filtered (median ``do_bench``), as ms and in units
of T; the peak memory of forward+backward above the inputs, and above the gradients' own size; the
skipped fraction s; dE and dC errors against float32 math on the same bf16 inputs, next to plain
torch bf16's (F.linear in bf16, cross-entropy on float32 logits).
"""

from __future__ import annotations

import argparse
import datetime
import json
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from cce_inductor import linear_cross_entropy
from cce_inductor.kernels import lce_backward, lce_forward, skipped_fraction
from cce_inductor.kernels import common
from cce_inductor.testing import make_inputs, regime_stats

SHAPES = [(8192, 2304, 256000), (8192, 4096, 128256)]
# --configs: the fixed 16-bit GPU configs of kernels/common.py first, then alternatives to them
_FORWARD, _BACKWARD = common._GPU_FORWARD_16, common._GPU_BACKWARD_16
FORWARD_CONFIGS = [_FORWARD, replace(_FORWARD, num_stages=4), replace(_FORWARD, block_v=128, num_stages=4),
                   replace(_FORWARD, block_n=256, block_v=128)]
BACKWARD_CONFIGS = [_BACKWARD, replace(_BACKWARD, group_n=32), replace(_BACKWARD, block_v=256, num_stages=2),
                    replace(_BACKWARD, block_n=256, num_stages=2)]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _grads(fn, e, c, y):
    e = e.detach().clone().requires_grad_()
    c = c.detach().clone().requires_grad_()
    fn(e, c, y).backward()
    return e.grad, c.grad


def _peak_extra(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(n, d, v, regime):
    inp = make_inputs(regime, n, d, v, device="cuda", seed=0)
    e, c, y = inp.e, inp.c, inp.targets
    row = dict(shape=[n, d, v], regime=regime, stats=regime_stats(e[:1024], c))
    ms = lambda fn, rep=300: do_bench(fn, warmup=50, rep=rep, return_mode="median")  # noqa: E731
    t_gemm = ms(lambda: e @ c.T)
    row["T_ms"] = t_gemm
    row["forward_ms"] = ms(lambda: lce_forward(e, c, None, y, -100, 0.0, 0.0))
    row["forward_peak_extra_MB"] = _peak_extra(lambda: lce_forward(e, c, None, y, -100, 0.0, 0.0)) / 2**20
    el = e.detach().clone().requires_grad_()
    cl = c.detach().clone().requires_grad_()
    grads_size = el.numel() * el.element_size() + cl.numel() * cl.element_size()
    gold = _grads(lambda a, b, t: F.cross_entropy(a.float() @ b.float().T, t), e, c, y)
    plain = _grads(lambda a, b, t: F.cross_entropy(F.linear(a, b).float(), t), e, c, y)
    row["torch_bf16_err"] = dict(dE=_rel(plain[0], gold[0]), dC=_rel(plain[1], gold[1]))
    del plain
    for mode, exact in (("exact", True), ("filtered", False)):
        def step():
            linear_cross_entropy(el, cl, y, impl="triton", exact=exact).backward()

        step()
        row[f"{mode}_fwbw_ms"] = do_bench(step, warmup=50, rep=600, grad_to_none=[el, cl], return_mode="median")
        el.grad = cl.grad = None
        row[f"{mode}_peak_extra_MB"] = _peak_extra(step) / 2**20
        row[f"{mode}_over_grads_MB"] = row[f"{mode}_peak_extra_MB"] - grads_size / 2**20
        row[f"{mode}_err"] = dict(dE=_rel(el.grad, gold[0]), dC=_rel(cl.grad, gold[1]))
        el.grad = cl.grad = None
    row["s"] = skipped_fraction(e, c, y)
    for key in ("forward", "exact_fwbw", "filtered_fwbw"):
        row[f"{key}_T"] = row[f"{key}_ms"] / t_gemm
    return row


def config_sweep(n, d, v):
    """Forward and exact backward (dE and dC) times of each candidate tile config, uniform regime."""
    inp = make_inputs("uniform", n, d, v, device="cuda", seed=0)
    e, c, y = inp.e, inp.c, inp.targets
    t_gemm = do_bench(lambda: e @ c.T, warmup=50, rep=300, return_mode="median")
    _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    g = torch.full_like(lse, 1.0 / n)
    zero = torch.zeros_like(lse)
    rows = []
    for kind, configs in (("forward", FORWARD_CONFIGS), ("backward", BACKWARD_CONFIGS)):
        for cfg in configs:
            if kind == "forward":
                fn = lambda: lce_forward(e, c, None, y, -100, 0.0, 0.0, config=cfg)  # noqa: E731
            else:
                fn = lambda: lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, False, True, True, False, config=cfg)  # noqa: E731
            try:
                t = do_bench(fn, warmup=50, rep=400, return_mode="median")
                out = fn()
                if cfg == configs[0]:
                    first = out
                # the same lse / gradients as the default config (up to the atomics' order)
                pairs = zip(out[:2], first[:2]) if kind == "backward" else [(out[1], first[1])]
                diff = max(_rel(a, b) for a, b in pairs)
            except Exception as exc:  # a config that does not fit this GPU
                t, diff = float("nan"), float("nan")
                print(kind, cfg, "failed:", str(exc)[:200])
            rows.append(dict(kind=kind, config=list(cfg.__dict__.values()), ms=t, T=t / t_gemm, diff_vs_default=diff))
            print(kind, cfg, f"{t:.2f} ms = {t / t_gemm:.2f} T, diff vs default {diff:.1e}", flush=True)
    return dict(shape=[n, d, v], T_ms=t_gemm, rows=rows)


def filter_growth(d=2304, v=256000, ns=(4096, 8192, 16384, 32768), epss=(2.0**-2, 2.0**-3)):
    """The filter's own error (filtered vs exact gradients of our kernels) and s as N grows, LM-like,
    with the dC GEMM filtered too (``dc_filter="dropped"``), which is what shows dC's error growing."""
    rows = []
    for n in ns:
        inp = make_inputs("lm", n, d, v, device="cuda", seed=5)
        e, c, y = inp.e, inp.c, inp.targets
        _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
        g = torch.full_like(lse, 1.0 / n)
        zero = torch.zeros_like(lse)
        exact = lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, False, True, True, False)
        for eps in epss:
            counts = torch.zeros(2, dtype=torch.int32, device="cuda")
            filt = lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, True, True, True, False,
                                filter_eps=eps, dc_filter="dropped", tile_counts=counts)
            computed, skipped = counts.tolist()
            row = dict(n=n, eps=eps, s=skipped / (computed + skipped), dE=_rel(filt[0], exact[0]), dC=_rel(filt[1], exact[1]))
            rows.append(row)
            print("filter", row, flush=True)
        del inp, e, c, exact, filt
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--configs", action="store_true", help="also time the candidate tile configs")
    parser.add_argument("--filter-growth", action="store_true", help="also the filter's error as N grows")
    args = parser.parse_args(argv)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(), rows=[])
    for n, d, v in SHAPES:
        for regime in ("uniform", "lm"):
            row = measure(n, d, v, regime)
            result["rows"].append(row)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.configs:
        result["config_sweep"] = [config_sweep(*SHAPES[0])]
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    if args.filter_growth:
        result["filter_growth"] = filter_growth()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print(f"\n{result['device']} torch {result['torch']} triton {result['triton']}")
    print("shape              regime   T ms   fw T  exact T filt T   s     mem/grads+MB  dE err ours/torch  dC err ours/torch")
    for r in result["rows"]:
        print(f"{'x'.join(map(str, r['shape'])):18s} {r['regime']:8s} {r['T_ms']:6.2f} {r['forward_T']:5.2f} "
              f"{r['exact_fwbw_T']:6.2f} {r['filtered_fwbw_T']:6.2f} {r['s']:5.2f} "
              f"{r['exact_over_grads_MB']:7.0f} "
              f"{r['exact_err']['dE']:.1e}/{r['filtered_err']['dE']:.1e}/{r['torch_bf16_err']['dE']:.1e} "
              f"{r['exact_err']['dC']:.1e}/{r['filtered_err']['dC']:.1e}/{r['torch_bf16_err']['dC']:.1e}")


if __name__ == "__main__":
    main()

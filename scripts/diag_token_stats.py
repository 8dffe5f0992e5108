"""Study: where the kept-logits path of linear_token_stats spends its time and memory (Qwen-like head)."""
import json, sys, torch, triton
from triton.testing import do_bench
from cce_inductor import linear_token_stats
from cce_inductor.testing import make_inputs
from cce_inductor.kernels import token_stats_workspace as W
from cce_inductor.kernels import token_stats as TS

out = {}
n, d, v = 16384, 3584, 151936
inp = make_inputs("lm", n, d, v, dtype=torch.bfloat16, device="cuda", seed=0)
e, c, y = inp.e, inp.c, inp.targets
bench = lambda f: float(do_bench(f, warmup=10, rep=50, return_mode="median"))
T = bench(lambda: e @ c.T); out["T_ms"] = T
for k in (4096, 8192):
    Z = torch.empty(k, v, dtype=e.dtype, device="cuda"); G = torch.empty_like(Z)
    de = torch.empty(n, d, dtype=e.dtype, device="cuda"); dc = torch.empty(v, d, dtype=e.dtype, device="cuda")
    f32 = dict(dtype=torch.float32, device="cuda")
    stats = (torch.empty(k, **f32), torch.empty(k, **f32), None, torch.empty(k, **f32), None)
    coef = (torch.randn(k, **f32) * 1e-4, torch.randn(k, **f32) * 1e-4, torch.randn(k, **f32) * 1e-4)
    torch.mm(e[:k], c.T, out=Z)
    r = {}
    r["mm_z"] = bench(lambda: torch.mm(e[:k], c.T, out=Z))
    r["rows_stats"] = bench(lambda: W._launch_rows(Z, None, y[:k], None, stats, -100, 0.0, 1.0, True, True, False, False, False))
    for pps in (1, 2, 4):
        for warps in (4, 8, 16):
            r[f"rows_grad_pps{pps}_w{warps}"] = bench(lambda: W._launch_rows(Z, G, y[:k], coef, None, -100, 0.0, 1.0, True, True, False, False, False, programs_per_sm=pps, warps=warps))
    r["rows_grad_no_entropy"] = bench(lambda: W._launch_rows(Z, G, y[:k], (coef[0], coef[1], None), None, -100, 0.0, 1.0, True, False, False, False, False))
    r["mm_de"] = bench(lambda: torch.mm(G, c, out=de[:k]))
    r["mm_dc_first"] = bench(lambda: torch.mm(G.T, e[:k], out=dc))
    r["addmm_dc"] = bench(lambda: dc.addmm_(G.T, e[k:2 * k]))
    r["fused_fwd_rest"] = bench(lambda: TS.stats_forward(e[k:], c, None, y[k:], -100, 0.0, 1.0, True, True, False))
    out[f"k{k}"] = {kk: (vv, vv / T) for kk, vv in r.items()}
    del Z, G
out["fused_fwd_all"] = bench(lambda: TS.stats_forward(e, c, None, y, -100, 0.0, 1.0, True, True, False)) / T

# memory: allocated after the forward and the peak of the backward, with probes at each row-kernel launch
probes = []
real = W._launch_rows
def probe(*a, **kw):
    probes.append(torch.cuda.memory_allocated())
    return real(*a, **kw)
W._launch_rows = probe
for budget in ("auto", 0):
    ee, cc = e.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated(); probes.clear()
    o = linear_token_stats(ee, cc, y, entropy=True, max_workspace_bytes=budget)
    after_fwd = torch.cuda.memory_allocated() - base; peak_fwd = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    (o.logprob.sum() + 0.01 * o.entropy.sum()).backward()
    torch.cuda.synchronize()
    out[f"mem_{budget}"] = dict(after_fwd=after_fwd, peak_fwd=peak_fwd, peak_bwd=torch.cuda.max_memory_allocated() - base,
                               probes=[p - base for p in probes], kept_bytes=n // 4 * v * 2, grads=(n + v) * d * 2)
    del ee, cc, o
W._launch_rows = real
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1], "w"), indent=1)

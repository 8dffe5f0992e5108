"""Study (temporary): fw+bw time and peak memory of the workspace path against chunk rows, with
torch.compile, exact mode and T at the anchor shapes, LM-like data; and one chunk's parts."""
import json, os, sys, datetime, torch, torch.nn.functional as F, triton
from triton.testing import do_bench
import cce_inductor
from cce_inductor.testing import make_inputs
from cce_inductor.kernels import workspace as ws

SHAPES = [("gemma2", 8192, 2304, 256000), ("llama3-8b", 8192, 4096, 128256), ("llama3.2-1b", 8192, 2048, 128256),
          ("mistral", 16384, 4096, 32768), ("qwen-7b", 16384, 3584, 151936), ("gemma2-16k", 16384, 2304, 256000)]
ROWS = [512, 1024, 2048, 4096]
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "points": []}

def compiled(e, c, y):
    return F.cross_entropy((e @ c.T).float(), y)
compiled = torch.compile(compiled, dynamic=False)

def measure(fn, e, c, y):
    def step():
        loss = fn(e, c, y)
        torch.autograd.grad(loss, (e, c))
    step(); torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    step(); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(step, warmup=2, rep=200, return_mode="median")
    return ms, peak

for name, n, d, v in SHAPES:
    if len(sys.argv) > 1 and name not in sys.argv[1:]:
        continue
    inp = make_inputs("lm", n, d, v, device="cuda")
    e, c, y = inp.e.requires_grad_(), inp.c.requires_grad_(), inp.targets
    t = do_bench(lambda: torch.mm(e, c.T), warmup=2, rep=200, return_mode="median")
    row = {"shape": name, "n": n, "d": d, "v": v, "T_ms": t, "logits_bytes": n * v * 2}
    for label, fn in [("compile", compiled), ("exact", lambda e, c, y: cce_inductor.linear_cross_entropy(e, c, y))] + [
            (f"ws{m}", (lambda m: lambda e, c, y: cce_inductor.linear_cross_entropy(e, c, y, max_workspace_bytes=m * v * 2))(m)) for m in ROWS]:
        try:
            ms, peak = measure(fn, e, c, y)
            row[label] = {"ms": ms, "T": ms / t, "peak_GB": peak / 1e9, "peak_over_logits": peak / (n * v * 2)}
        except Exception as exc:
            row[label] = {"error": repr(exc)[:200]}
        print(name, label, row[label], flush=True)
    # one chunk's parts
    for m in (1024, 4096):
        z = torch.empty(m, v, dtype=e.dtype, device="cuda"); ec = e.detach()[:m]; cc = c.detach()
        dc = torch.empty_like(cc); de = torch.empty(m, d, dtype=e.dtype, device="cuda")
        w = torch.ones((), device="cuda"); loss = torch.empty(m, device="cuda")
        parts = {"fwd_mm": do_bench(lambda: torch.mm(ec, cc.T, out=z), return_mode="median"),
                 "rows": do_bench(lambda: ws._launch_rows(z, y[:m], w, loss, -100, 0.0, 0.0, True), return_mode="median"),
                 "dE_mm": do_bench(lambda: torch.mm(z, cc, out=de), return_mode="median"),
                 "dC_mm": do_bench(lambda: torch.mm(z.T, ec, out=dc), return_mode="median"),
                 "dC_addmm": do_bench(lambda: dc.addmm_(z.T, ec), return_mode="median")}
        parts["T_share"] = t * m / n
        row[f"parts{m}"] = parts
        print(name, m, {k: round(x, 3) for k, x in parts.items()}, flush=True)
        del z, dc, de
    out["points"].append(row)
    del e, c, y, inp
    torch.cuda.empty_cache()
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "study_workspace_rows.json"), "w"), indent=1)

"""RL-style per-token statistics at a large head: ``linear_token_stats`` against torch.compile of the same
loss written plainly, in one process.

    python -m benchmarks.rl_bench --out rl.json           # GPU: Qwen-like head, N=16384, D=3584, V=151936, bf16
    python -m benchmarks.rl_bench --small --out rl.json   # CPU, tiny shapes, seconds (tests)

The loss, forward + backward w.r.t. e and c:
    loss = -(adv * logprob).mean() - 0.01 * entropy.mean()
  * ``cce_inductor``: ``linear_token_stats(e, c, targets, logprob=True, entropy=True,
    max_workspace_bytes="auto")``, the backend's default (the logits of half of the tokens kept
    from the forward for the backward); ``cce_inductor_quarter``: a budget that keeps a quarter;
    ``cce_inductor_exact``: ``max_workspace_bytes=0`` (the minimum memory, one fused recompute);
  * ``torch.compile``: the same loss from materialized logits (``log_softmax`` + ``gather`` and
    ``-(p * logp).sum(-1)`` of ``(e @ c.T).float()``), compiled with ``--compile-backend`` (Inductor;
    ``--small``: aot_eager, to run in seconds on a CPU).
Per method: the median forward time (grad enabled, no backward) and fw+bw time
(``timing.median_ms``: ``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` on the CPU), its
ratio to T (the cuBLAS N x V x D logits GEMM, measured in the same run), the peak memory above the
inputs (CUDA; gradients included), and the largest norm-wise relative difference of the loss and
gradients from the torch.compile method's. A table is printed; JSON (device, versions,
date, command) is written to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import sys
from dataclasses import asdict, dataclass

import torch

from cce_inductor import linear_token_stats
from cce_inductor.testing import make_inputs

from .timing import median_ms

ENTROPY_COEF = 0.01


@dataclass(frozen=True)
class Config:
    n: int = 16384
    d: int = 3584
    v: int = 151936
    dtype: str = "bfloat16"
    device: str = "cuda"
    regime: str = "uniform"
    compile_backend: str = "inductor"
    seed: int = 0
    reps: int = 5  # CPU timing: calls after one warm-up


SMALL = dict(n=256, d=64, v=1000, dtype="float32", device="cpu", compile_backend="aot_eager", reps=3)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cce_loss(e, c, targets, adv, max_workspace_bytes="auto"):
    out = linear_token_stats(e, c, targets, logprob=True, entropy=True, max_workspace_bytes=max_workspace_bytes)
    return -(adv * out.logprob).mean() - ENTROPY_COEF * out.entropy.mean()


def plain_loss(e, c, targets, adv):
    logits = (e @ c.T).float()
    logp = logits.log_softmax(-1)
    logprob = logp.gather(-1, targets[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return -(adv * logprob).mean() - ENTROPY_COEF * entropy.mean()


def _time_ms(fn, device: str, reps: int) -> float:
    # about ten timed calls of a ~0.1 s step on CUDA (do_bench's default 100 ms would time one)
    return median_ms(fn, device, reps=reps, warmup_ms=200, rep_ms=1000)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run_method(name, loss_fn, e, c, targets, adv, cfg, t_ms):
    """(record, (loss, dE, dC)) of one method; the record's status is ok, oom or error."""
    record = dict(method=name, status="ok", fwd_ms=None, fwdbwd_ms=None, ratio_t=None, fwd_ratio_t=None,
                  peak_bytes_above_inputs=None)
    cuda = cfg.device == "cuda"

    def step():
        e.grad = c.grad = None
        loss = loss_fn(e, c, targets, adv)
        loss.backward()
        return loss

    try:
        loss = step()  # first call: compiles, and gives the values compared
        result = (loss.detach(), e.grad.detach().clone(), c.grad.detach().clone())
        if cuda:
            e.grad = c.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            record["peak_bytes_above_inputs"] = torch.cuda.max_memory_allocated() - base
        record["fwdbwd_ms"] = _time_ms(step, cfg.device, cfg.reps)
        record["ratio_t"] = record["fwdbwd_ms"] / t_ms if t_ms else None
        record["fwd_ms"] = _time_ms(lambda: loss_fn(e, c, targets, adv), cfg.device, cfg.reps)
        record["fwd_ratio_t"] = record["fwd_ms"] / t_ms if t_ms else None
    except torch.cuda.OutOfMemoryError as err:
        record.update(status="oom", error=str(err).splitlines()[0])
        result = None
    except Exception as err:  # noqa: BLE001 - a failing method is data, the other still runs
        record.update(status="error", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        result = None
    e.grad = c.grad = None
    if cuda:
        torch.cuda.empty_cache()
    return record, result


def run(cfg: Config) -> dict:
    dtype = DTYPES[cfg.dtype]
    inp = make_inputs(cfg.regime, cfg.n, cfg.d, cfg.v, dtype=dtype, device=cfg.device, seed=cfg.seed)
    e = inp.e.detach().requires_grad_()
    c = inp.c.detach().requires_grad_()
    targets = inp.targets
    adv = torch.randn(cfg.n, generator=torch.Generator(cfg.device).manual_seed(cfg.seed + 1), device=cfg.device)
    with torch.no_grad():
        t_ms = _time_ms(lambda: e @ c.T, cfg.device, cfg.reps)

    quarter = (cfg.n // 4) * cfg.v * e.element_size()  # a budget that keeps a quarter of the tokens' logits
    methods = (("cce_inductor", cce_loss),
               ("cce_inductor_quarter", functools.partial(cce_loss, max_workspace_bytes=quarter)),
               ("cce_inductor_exact", functools.partial(cce_loss, max_workspace_bytes=0)),
               ("torch.compile", torch.compile(plain_loss, backend=cfg.compile_backend, fullgraph=True)))
    records, results = [], {}
    for name, fn in methods:
        record, result = _run_method(name, fn, e, c, targets, adv, cfg, t_ms)
        records.append(record)
        results[name] = result
    ref = results.get("torch.compile")
    for record in records:
        mine = results[record["method"]]
        record["max_rel_err_vs_torch"] = (max(_rel(a, b) for a, b in zip(mine, ref))
                                          if mine is not None and ref is not None else None)
    input_bytes = sum(t.numel() * t.element_size() for t in (e, c, targets, adv))
    return dict(
        benchmark="rl_bench",
        loss=f"-(adv * logprob).mean() - {ENTROPY_COEF} * entropy.mean(), fw+bw w.r.t. e and c",
        device=_device_name(cfg.device),
        versions=_versions(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
        config=asdict(cfg),
        t_ms=t_ms,
        input_bytes=input_bytes,
        grad_bytes=(e.numel() + c.numel()) * e.element_size(),
        results=records,
    )


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def _versions() -> dict:
    import cce_inductor

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                cce_inductor=cce_inductor.__version__, cuda=torch.version.cuda)


def table(data: dict) -> str:
    cfg = data["config"]
    lines = [f"N={cfg['n']} D={cfg['d']} V={cfg['v']} {cfg['dtype']} on {data['device']}; "
             f"T (logits GEMM) = {data['t_ms']:.3f} ms",
             "| method | forward | x T | fw+bw | x T | peak memory above inputs | max rel. diff vs torch.compile |",
             "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']} | - | - | - | - | - |")
            continue
        mem = r["peak_bytes_above_inputs"]
        err = r["max_rel_err_vs_torch"]
        lines.append(f"| {r['method']} | {r['fwd_ms']:.2f} ms | {r['fwd_ratio_t']:.2f} | "
                     f"{r['fwdbwd_ms']:.2f} ms | {r['ratio_t']:.2f} | "
                     f"{'-' if mem is None else f'{mem / 1e9:.2f} GB'} | {'-' if err is None else f'{err:.1e}'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny float32 shapes on the CPU (seconds)")
    p.add_argument("--out", default="rl_bench.json")
    for name in ("n", "d", "v"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--dtype", choices=tuple(DTYPES))
    p.add_argument("--regime", choices=("uniform", "lm"))
    p.add_argument("--compile-backend")
    args = p.parse_args(argv)
    options = dict(SMALL) if args.small else {}
    for key in ("n", "d", "v", "dtype", "regime", "compile_backend"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    cfg = Config(**options)
    data = run(cfg)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=2)
    print(table(data))
    return data


if __name__ == "__main__":
    main()

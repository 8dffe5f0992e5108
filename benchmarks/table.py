"""Markdown tables of a benchmark JSON: one table per (shape, regime), one per sweep regime.

    python -m benchmarks.table bench.json
"""

from __future__ import annotations

import argparse
import json


def fmt_bytes(b) -> str:
    """Decimal units: 1 MB = 10^6 bytes, 1 GB = 10^9 bytes."""
    if b is None:
        return "-"
    if abs(b) >= 1e9:
        return f"{b / 1e9:.2f} GB"
    if abs(b) >= 1e8:
        return f"{b / 1e6:.0f} MB"
    return f"{b / 1e6:.1f} MB"


def fmt_time(ms, ratio) -> str:
    if ms is None:
        return "-"
    text = f"{ms:.2f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s"
    return text + (f" ({ratio:.2f} T)" if ratio is not None else "")


def _err(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def _status(m: dict) -> str:
    return {"oom": "OOM", "error": "error", "skipped": "skipped"}.get(m["status"], m["status"])


def _point_key(r: dict) -> tuple:
    return (r["n"], r["d"], r["v"], r["regime"])


def _unavailable(data: dict) -> set[str]:
    return {name for name, info in data["meta"].get("methods", {}).items() if not info.get("available", True)}


def _point_table(data: dict, rec: dict, rows: list[dict]) -> list[str]:
    stats = rec["stats"]
    head = (f"### {rec['shape']} (N={rec['n']}, D={rec['d']}, V={rec['v']}), {rec['regime']}: "
            f"entropy {stats['mean_entropy_nats']:.2f} nats, p >= 2^-12 fraction {stats['frac_p_ge_2^-12']:.1e} "
            f"(first {rec['stats_tokens']} tokens)")
    lines = [head, ""]
    t = rec.get("t_ms")
    lines.append(
        f"T = {fmt_time(t, None)}; gradients dE + dC {fmt_bytes(rec['grad_bytes'])}; "
        f"torch {data['config']['dtype']} gradient error dE {_err(rec.get('torch_bf16_err_e'))}, "
        f"dC {_err(rec.get('torch_bf16_err_c'))}" + (f"; {rec['note']}" if rec.get("note") else "")
    )
    lines += ["", "| method | fwd | bwd | fwd+bwd | mem fwd | mem fwd+bwd | fwd+bwd − grads | dE err | dC err | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    problems = []
    for m in rows:
        if m["status"] != "ok":
            lines.append(f"| {m['label']} | {_status(m)} | | | | | | | | |")
            problems.append(f"{m['label']}: {m['reason']}")
            continue
        s = "-" if m.get("skipped_fraction") is None else f"{m['skipped_fraction']:.3f}"
        over = "-" if m["fwdbwd_mem_bytes"] is None else fmt_bytes(m["fwdbwd_mem_bytes"] - rec["grad_bytes"])
        lines.append(
            f"| {m['label']} | {fmt_time(m['fwd_ms'], m['fwd_ratio'])} | {fmt_time(m['bwd_ms'], m['bwd_ratio'])} | "
            f"{fmt_time(m['fwdbwd_ms'], m['fwdbwd_ratio'])} | {fmt_bytes(m['fwd_mem_bytes'])} | "
            f"{fmt_bytes(m['fwdbwd_mem_bytes'])} | {over} | {_err(m['err_e'])} | {_err(m['err_c'])} | {s} |"
        )
    lines.append("")
    lines += [f"- {p}" for p in problems]
    return lines + ([""] if problems else [])


def _sweep_table(data: dict, regime: str, rows: list[dict], ns: list[int]) -> list[str]:
    base = data["config"]["sweep_shape"]
    lines = [f"### Sweep over N at D={base['d']}, V={base['v']}, {regime}: fwd+bwd (the GEMM: fwd), peak memory", "",
             "| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    by_method: dict[str, dict[int, dict]] = {}
    labels: dict[str, str] = {}
    for m in rows:
        by_method.setdefault(m["method"], {})[m["n"]] = m
        labels[m["method"]] = m["label"]
    for name, per_n in by_method.items():
        cells = []
        for n in ns:
            m = per_n.get(n)
            if m is None:
                cells.append("")
            elif m["status"] != "ok":
                cells.append(_status(m))
            else:
                pas = "fwdbwd" if m["fwdbwd_ms"] is not None else "fwd"
                ms, ratio = m[f"{pas}_ms"], m[f"{pas}_ratio"]
                mem = m["fwdbwd_mem_bytes"] if m["fwdbwd_mem_bytes"] is not None else m["fwd_mem_bytes"]
                cells.append(f"{fmt_time(ms, ratio)}, {fmt_bytes(mem)}" if mem is not None else fmt_time(ms, ratio))
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    reasons = sorted({f"{labels[m['method']]} at N={m['n']}: {_status(m)} ({m['reason']})"
                      for m in rows if m["status"] != "ok"})
    return lines + [""] + [f"- {r}" for r in reasons] + ([""] if reasons else [])


def markdown(data: dict) -> str:
    meta, cfg = data["meta"], data["config"]
    rows = data["measurements"]
    skip = _unavailable(data)
    lines = [
        f"## cce_inductor benchmark: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"{cfg['dtype']}, {meta['date']}",
        "",
        f"`{meta['command']}` (commit {meta.get('git_commit') or '?'}, sources {meta.get('source_digest') or '?'}; peers: "
        + ", ".join(f"{k} {v or 'not installed'}" for k, v in meta["peers"].items()) + ")",
        "",
        *([] if meta.get("complete", True) else ["**Incomplete run** (a checkpoint written before the end).", ""]),
        "Median times; (x T) = ratio to the cuBLAS logits GEMM of the same point. Memory: peak above the "
        "inputs (fwd+bwd includes the returned gradients; 'fwd+bwd − grads' subtracts their size). Gradient error: " + meta["grad_error_metric"]
        + ". s: fraction of backward tiles skipped by filtering. 1 MB = 10^6 B.",
        "",
    ]
    main_keys = [(s["n"], s["d"], s["v"]) for s in cfg["shapes"]]
    for rec in data["regimes"]:
        if (rec["n"], rec["d"], rec["v"]) not in main_keys:
            continue
        point = [m for m in rows if _point_key(m) == _point_key(rec) and m["method"] not in skip]
        lines += _point_table(data, rec, point)
    if cfg["sweep"]:
        base = cfg["sweep_shape"]
        ns = sorted(cfg["sweep_ns"])
        for regime in cfg["sweep_regimes"]:
            sweep_rows = [m for m in rows if (m["d"], m["v"], m["regime"]) == (base["d"], base["v"], regime)
                          and m["n"] in ns and m["method"] not in skip]
            if sweep_rows:
                lines += _sweep_table(data, regime, sweep_rows, ns)
    if skip:
        lines.append("Not run here:")
        info = meta["methods"]
        lines += [f"- {info[name]['label']} ({name}): {info[name]['reason']}" for name in sorted(skip)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.table", description="Markdown tables of a benchmark JSON")
    p.add_argument("json")
    args = p.parse_args(argv)
    with open(args.json) as f:
        print(markdown(json.load(f)), end="")


if __name__ == "__main__":
    main()

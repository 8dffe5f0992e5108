"""Plot a benchmark JSON: time, time / T and peak memory against N for the sweep, one row per regime.

    python -m benchmarks.plot bench.json --out bench.png
"""

from __future__ import annotations

import argparse
import json


def sweep_series(data: dict, regime: str) -> dict[str, dict]:
    """Per method: label and the (N, ms, ratio to T, bytes) of its successful sweep points; the
    GEMM contributes its forward (it has no backward), every other method its forward+backward."""
    cfg = data["config"]
    base, ns = cfg["sweep_shape"], set(cfg["sweep_ns"])
    out: dict[str, dict] = {}
    for m in data["measurements"]:
        if (m["d"], m["v"], m["regime"]) != (base["d"], base["v"], regime) or m["n"] not in ns:
            continue
        series = out.setdefault(m["method"], {"label": m["label"], "points": [], "failed": []})
        if m["status"] != "ok":
            if m["status"] in ("oom", "error"):
                series["failed"].append((m["n"], m["status"]))
            continue
        fwdbwd = m["fwdbwd_ms"] is not None
        ms = m["fwdbwd_ms"] if fwdbwd else m["fwd_ms"]
        ratio = m["fwdbwd_ratio"] if fwdbwd else m["fwd_ratio"]
        mem = m["fwdbwd_mem_bytes"] if fwdbwd else m["fwd_mem_bytes"]
        if ms is not None:
            series["points"].append((m["n"], ms, ratio, mem))
    for series in out.values():
        series["points"].sort()
    return {k: v for k, v in out.items() if v["points"] or v["failed"]}


def plot(data: dict, out: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, meta = data["config"], data["meta"]
    regimes = [r for r in cfg["sweep_regimes"] if sweep_series(data, r)] if cfg["sweep"] else []
    if not regimes:
        raise SystemExit("no sweep in this JSON (run the benchmark with --sweep)")
    base = cfg["sweep_shape"]
    fig, axes = plt.subplots(len(regimes), 3, figsize=(17, 4.8 * len(regimes)), squeeze=False)
    for row, regime in zip(axes, regimes):
        series = sweep_series(data, regime)
        grads = {r["n"]: r["grad_bytes"] for r in data["regimes"]
                 if (r["d"], r["v"], r["regime"]) == (base["d"], base["v"], regime)}
        for name, s in series.items():
            pts = s["points"]
            label = s["label"] + (" [fwd]" if name == "gemm" else "")
            if s["failed"]:
                label += " (" + ", ".join(f"{st.upper()} at N={n}" for n, st in s["failed"][:1]) + ")"
            marker = "s" if name.startswith("cce_inductor") else "o"
            style = dict(marker=marker, label=label, linewidth=2.2 if name.startswith("cce_inductor") else 1.3)
            row[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
            ratio_pts = [(p[0], p[2]) for p in pts if p[2] is not None]
            row[1].plot([p[0] for p in ratio_pts], [p[1] for p in ratio_pts], **style)
            mem_pts = [(p[0], p[3]) for p in pts if p[3] is not None]
            row[2].plot([p[0] for p in mem_pts], [p[1] / 1e9 for p in mem_pts], **style)
        if grads:
            ns = sorted(grads)
            row[2].plot(ns, [grads[n] / 1e9 for n in ns], "k--", linewidth=1, label="dE + dC (the floor)")
        titles = ("fwd+bwd time (ms)", "fwd+bwd time / T", "peak memory above inputs (GB)")
        for ax, title in zip(row, titles):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_title(f"{title} — {regime}, D={base['d']}, V={base['v']}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        row[1].set_yscale("linear")
        row[1].set_ylim(bottom=0)
        row[2].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {cfg['dtype']}, {meta['date']}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("--out", default="bench.png")
    args = p.parse_args(argv)
    with open(args.json) as f:
        plot(json.load(f), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

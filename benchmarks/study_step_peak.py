"""Study (issue 28): what a training step holds at its peak, torch.compile against backend="cce".

    python -m benchmarks.study_step_peak [--models llama gemma] [--backends inductor cce cce_exact]

For each model and backend: a warm step, then one step under the allocator's memory history; the
trace is replayed to find the moment of the step's peak and the allocations live then, printed
largest first with the frames (source lines) that made them.
"""

from __future__ import annotations

import argparse
import collections
import gc
import linecache

import torch

from .model_step import SHAPES, Settings, TrainingStep, build_model

KEEP = ("torchinductor", "cce_inductor", "transformers", "benchmarks", "torch/optim", "torch/autograd")


def frames_text(frames, limit=3):
    out = []
    for fr in frames:
        name = fr.get("filename", "")
        if any(k in name for k in KEEP):
            line = linecache.getline(name, fr.get("line", 0)).strip()
            out.append(f"{name.rsplit('/', 1)[-1]}:{fr.get('line')} {fr.get('name')}: {line[:110]}")
            if len(out) == limit:
                break
    return " | ".join(out) or "(no frame)"


def peak_composition(snapshot):
    live, total, best, best_live, best_idx = {}, 0, -1, {}, -1
    events = [ev for trace in snapshot["device_traces"] for ev in trace]
    for i, ev in enumerate(events):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
        elif ev["action"] in ("free_completed",) and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
        if total > best:
            best, best_live, best_idx = total, dict(live), i
    return best, best_live, best_idx, events


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["llama", "gemma"])
    p.add_argument("--backends", nargs="+", default=["inductor", "cce", "cce_exact"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    args = p.parse_args()
    dev = torch.device("cuda")
    settings = Settings(batch=args.batch, seq=args.seq)
    for shape in SHAPES:
        if not any(shape.name.startswith(m) for m in args.models):
            continue
        logits = args.batch * args.seq * shape.vocab * 2
        for backend in args.backends:
            model = build_model(shape, settings, dev)
            step = TrainingStep(model, backend, dev)
            step(args.batch, args.seq)
            step(args.batch, args.seq)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=200000)
            step(args.batch, args.seq)
            torch.cuda.synchronize()
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            peak = torch.cuda.max_memory_allocated()
            best, live, idx, events = peak_composition(snap)
            print(f"\n=== {shape.name} {backend}: peak {peak / 1e9:.3f} GB, state before the step "
                  f"{base / 1e9:.3f} GB, traced peak above it {best / 1e9:.3f} GB "
                  f"(event {idx} of {len(events)}); bf16 logits {logits / 1e9:.3f} GB")
            print("    at the peak, event:", frames_text(events[idx].get("frames", []), 4))
            groups = collections.defaultdict(lambda: [0, 0])
            for ev in live.values():
                key = frames_text(ev.get("frames", []))
                groups[key][0] += ev["size"]
                groups[key][1] += 1
            for key, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:14]:
                print(f"  {size / 1e6:10.1f} MB  x{count:<4d} {key}")
            del step, model
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

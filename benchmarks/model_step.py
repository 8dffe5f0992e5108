"""Model-level memory and speed of a whole training step: plain torch.compile against backend="cce".

    python -m benchmarks.model_step --out model_step.json             # GPU, with the largest-batch search
    python -m benchmarks.model_step --no-search --out model_step.json # the fixed batch only
    python -m benchmarks.model_step --small --out /tmp/model_step.json # CPU smoke test, tiny models

For three model shapes with large vocabularies -- Gemma-2-2B-like (V = 256000, hidden 2304, final logit
softcapping 30), Llama-3.2-1B-like (V = 128256, hidden 2048, tied embeddings) and Qwen-2.5-7B-like
(V = 151936, hidden 3584, untied head) -- with random bf16 weights, in one process: a training step
(forward, backward, AdamW step) of the unmodified Hugging Face model, `model(input_ids=ids, labels=ids).loss`,
compiled plainly, with backend="cce" (its default: the "auto" workspace), and with backend="cce" and
options={"max_workspace_bytes": 0} (the minimum memory); and the model itself compiled as a module
(plainly and with backend="cce"), its output -- logits included -- kept alive through the backward
and the optimizer step, as a training loop keeps it (``--backends`` picks). For each:
  * at a fixed batch: peak memory (max_memory_allocated over the step; the weights and the AdamW
    state, which are the same for both, are reported apart), median step time and tokens/s;
  * the largest batch that fits (doubling, then bisecting to 1/8 of the last doubling; each probe is
    one step; out-of-memory is caught and the memory freed), and tokens/s at that batch (not with
    ``--no-search``).
The batch dimension is compiled as dynamic (one compilation serves every batch size).
Writes ``--out`` (JSON: device, versions, command, settings and every run's figures, rewritten after
each run so that a partial run keeps its data) and prints a markdown table of the runs.

Departures from the real models, all printed and recorded: fewer layers than the real model (the
time budget; --layers), so the head's share of memory is larger than in the full model -- the GB
saved do not depend on depth, the ratios do. The Gemma-2-2B shape runs on transformers' Gemma 3 text
architecture with attention softcapping off, because the Gemma 2 class has no SDPA attention (only
eager attention, whose O(T^2) memory would dominate); its final logit softcapping (30) is kept.
bf16 parameters and fused AdamW in bf16 (no fp32 master weights). The --small CPU mode (float32, tiny
models) only checks that the harness runs: it has no memory to measure and no limit to search.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import torch  # noqa: E402

import cce_inductor  # noqa: E402

# backend -> (torch.compile's backend, its options, whether the model itself is compiled):
# "cce" is the default (max_workspace_bytes="auto": a bounded buffer of logits, a quarter of them,
# the gradients formed in the forward); "cce_exact" asks for the minimum memory (max_workspace_bytes=0,
# the exact recompute). The "_module" ways compile the model as a module, as users do:
# it returns its logits, and the step keeps its output alive through the backward and the optimizer
# step, as a training loop does (``out = model(...); out.loss.backward(); opt.step()``).
COMPILE_ARGS = {"inductor": ("inductor", None, False), "cce": ("cce", None, False),
                "cce_exact": ("cce", {"max_workspace_bytes": 0}, False),
                "inductor_module": ("inductor", None, True), "cce_module": ("cce", None, True)}
BACKENDS = tuple(COMPILE_ARGS)
LABELS = {"inductor": "torch.compile", "cce": 'backend="cce"', "cce_exact": 'backend="cce", max_workspace_bytes=0',
          "inductor_module": "torch.compile(model)", "cce_module": 'torch.compile(model, backend="cce")'}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    arch: str  # "gemma" (transformers' Gemma 3 text model), "llama" or "qwen2"
    vocab: int
    hidden: int
    intermediate: int
    layers: int  # layers run here
    full_layers: int  # layers of the real model
    heads: int
    kv_heads: int
    head_dim: int
    softcap: float | None  # final logit softcapping


SHAPES = (
    ModelShape("gemma-2-2b-like", "gemma", 256000, 2304, 9216, 4, 26, 8, 4, 256, 30.0),
    ModelShape("llama-3.2-1b-like", "llama", 128256, 2048, 8192, 4, 16, 32, 8, 64, None),
    ModelShape("qwen-2.5-7b-like", "qwen2", 151936, 3584, 18944, 4, 28, 28, 4, 128, None),
)
SMALL_SHAPES = (
    ModelShape("gemma-tiny", "gemma", 8192, 64, 128, 1, 26, 4, 2, 16, 30.0),
    ModelShape("llama-tiny", "llama", 4096, 64, 128, 1, 16, 4, 2, 16, None),
    ModelShape("qwen-tiny", "qwen2", 4096, 64, 128, 1, 28, 4, 2, 16, None),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    seq: int = 2048
    batch: int = 4  # the fixed batch both backends are compared at
    reps: int = 5  # timed steps at the fixed batch
    max_batch: int = 512  # the search stops here
    max_batch_reps: int = 2  # timed steps at the largest batch
    dtype: str = "bfloat16"  # of the parameters


SMALL_SETTINGS = Settings(seq=32, batch=2, reps=2, max_batch=8, max_batch_reps=1, dtype="float32")


# ----------------------------------------------------------------------------- model and step


def build_model(shape: ModelShape, settings: Settings, device: torch.device):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=max(settings.seq, 8192),
                  tie_word_embeddings=shape.arch != "qwen2", use_cache=False, attn_implementation="sdpa")
    if shape.arch == "gemma":
        config = Gemma3TextConfig(**common, final_logit_softcapping=shape.softcap, attn_logit_softcapping=None,
                                  layer_types=["full_attention"] * shape.layers, query_pre_attn_scalar=shape.head_dim)
        cls = Gemma3ForCausalLM
    elif shape.arch == "qwen2":
        config = Qwen2Config(**common)
        cls = Qwen2ForCausalLM
    else:
        config = LlamaConfig(**common)
        cls = LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config)
    return model.to(getattr(torch, settings.dtype)).train()


class TrainingStep:
    """forward + backward + AdamW of the unmodified model's own loss, compiled with ``backend``."""

    def __init__(self, model, backend: str, device: torch.device):
        def loss_fn(ids):
            return model(input_ids=ids, labels=ids).loss

        compile_backend, options, module = COMPILE_ARGS[backend]
        self.module = module
        self.compiled = torch.compile(model if module else loss_fn, backend=compile_backend, options=options)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        self.vocab = model.config.vocab_size
        self.device = device

    def __call__(self, batch: int, seq: int) -> float:
        ids = torch.randint(0, self.vocab, (batch, seq), device=self.device)
        torch._dynamo.maybe_mark_dynamic(ids, 0)
        out = self.compiled(input_ids=ids, labels=ids) if self.module else None
        loss = out.loss if self.module else self.compiled(ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        del out  # the output (logits included) lived through the backward and the step
        return loss.detach()

    def free(self):
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step: TrainingStep, batch: int, seq: int, reps: int) -> dict:
    """Median step time and peak memory over ``reps`` steps (after a warm step at this batch)."""
    dev = step.device
    step(batch, seq)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else None
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(batch, seq)
        sync(dev)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"batch": batch, "step_s": step_s, "tokens_per_s": batch * seq / step_s, "state_bytes": base,
            "peak_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None}


def is_oom(err: Exception) -> bool:
    """Out of memory, as the allocator, cuBLAS or a kernel launch reports it."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def fits(step: TrainingStep, batch: int, seq: int) -> bool:
    ok = True
    try:
        step(batch, seq)
        sync(step.device)
    except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
        if not is_oom(err):
            raise
        ok = False
    step.free()  # outside the except block: the traceback (and the tensors it holds) is gone
    return ok


def largest_batch(step: TrainingStep, seq: int, start: int, cap: int) -> tuple[int, bool, list]:
    """(largest batch that ran, whether the search hit ``cap``, the probes as (batch, fitted))."""
    probes = []

    def probe(b):
        ok = fits(step, b, seq)
        probes.append((b, ok))
        print(f"    batch {b:4d}: {'ok' if ok else 'out of memory'}", flush=True)
        return ok

    lo, hi = start, None
    while hi is None and lo < cap:
        b = min(2 * lo, cap)
        if probe(b):
            lo = b
        else:
            hi = b
    if hi is None:
        return lo, True, probes
    resolution = max(1, (hi - lo) // 8)
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, False, probes


def measure(shape: ModelShape, backend: str, settings: Settings, device: torch.device, search: bool = True) -> dict:
    torch.compiler.reset()
    model = build_model(shape, settings, device)
    step = TrainingStep(model, backend, device)
    result = {"model": shape.name, "backend": backend, "seq": settings.seq}
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    try:
        step(settings.batch, settings.seq)  # compiles; allocates the AdamW state
        sync(device)
        result["first_step_s"] = time.perf_counter() - t0
        print(f"  {LABELS[backend]}: first step (compile) {result['first_step_s']:.1f}s", flush=True)
        result["fixed"] = timed_steps(step, settings.batch, settings.seq, settings.reps)
    except RuntimeError as err:
        if not is_oom(err):
            raise
        result["fixed"] = None
    step.free()
    if result["fixed"] is None:
        print(f"  {LABELS[backend]}: out of memory at batch {settings.batch}", flush=True)
        del step, model
        torch.compiler.reset()
        gc.collect()
        return result

    fixed = result["fixed"]
    print(f"  {LABELS[backend]}: batch {settings.batch}: peak {fmt_gb(fixed['peak_bytes'])}, "
          f"{fixed['step_s'] * 1e3:.0f} ms/step, {fixed['tokens_per_s']:,.0f} tokens/s"
          + ("; searching the largest batch" if search else ""), flush=True)
    result.update(max_batch=None, max_batch_capped=None, probes=[], at_max_batch=None)
    if search:
        best, capped, probes = largest_batch(step, settings.seq, settings.batch, settings.max_batch)
        result.update(max_batch=best, max_batch_capped=capped, probes=probes)
        try:
            result["at_max_batch"] = timed_steps(step, best, settings.seq, settings.max_batch_reps)
        except RuntimeError as err:  # fragmentation after the search: report the batch, not its speed
            if not is_oom(err):
                raise
        step.free()
    result["compilations"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    result["wall_s"] = time.perf_counter() - t0
    del step, model
    torch.compiler.reset()  # compiled code may still refer to the model: free it before the next run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- report


def fmt_gb(b) -> str:
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def table(record: dict) -> str:
    seq = record["settings"]["seq"]
    lines = [
        f"| model (layers run / real) | backend | peak memory, batch {record['settings']['batch']} x {seq} "
        "| of which weights + AdamW | ms / step | tokens/s | largest batch | tokens/s at largest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["results"]:
        shape = next(s for s in record["shapes"] if s["name"] == r["model"])
        name = f"{r['model']} ({shape['layers']}/{shape['full_layers']})"
        f, m = r.get("fixed"), r.get("at_max_batch")
        if f is None:
            lines.append(f"| {name} | {LABELS[r['backend']]} | OOM | | | | | |")
            continue
        largest = "-" if r["max_batch"] is None else f"{r['max_batch']}{'+' if r['max_batch_capped'] else ''}"
        lines.append(
            f"| {name} | {LABELS[r['backend']]} | {fmt_gb(f['peak_bytes'])} | {fmt_gb(f['state_bytes'])} | "
            f"{f['step_s'] * 1e3:.0f} | {f['tokens_per_s']:,.0f} | {largest} | "
            f"{'-' if m is None else format(m['tokens_per_s'], ',.0f')} |"
        )
    for shape in record["shapes"]:
        runs = {r["backend"]: r for r in record["results"] if r["model"] == shape["name"] and r.get("fixed")}
        plain = runs.get("inductor")
        tokens = record["settings"]["batch"] * seq
        for backend in BACKENDS[1:]:
            cce = runs.get(backend)
            if plain is None or cce is None or cce["fixed"]["peak_bytes"] is None:
                continue
            largest = ("" if cce["max_batch"] is None or plain["max_batch"] is None else
                       f"largest batch {plain['max_batch']} -> {cce['max_batch']}{'+' if cce['max_batch_capped'] else ''}; ")
            lines.append(
                f"\n{shape['name']}: {LABELS[backend]} lowers the peak by "
                f"{fmt_gb(plain['fixed']['peak_bytes'] - cce['fixed']['peak_bytes'])} at {tokens} tokens "
                f"(the {tokens} x {shape['vocab']} logits alone are {fmt_gb(tokens * shape['vocab'] * 2)} in bf16); "
                f"{largest}tokens/s at batch {record['settings']['batch']}: "
                f"x{cce['fixed']['tokens_per_s'] / plain['fixed']['tokens_per_s']:.2f}"
            )
    return "\n".join(lines)


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cce_inductor": cce_inductor.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("model_step.json"))
    parser.add_argument("--small", "--smoke", action="store_true", help="tiny models on the CPU (automatic without a GPU)")
    parser.add_argument("--layers", type=int, help="decoder layers to run (default: 4 of each real model's)")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int, help="the fixed batch both backends are compared at")
    parser.add_argument("--models", nargs="+", help="a subset of the model names")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--no-search", action="store_true", help="only the fixed batch: no largest-batch search")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    shapes, settings = (SMALL_SHAPES, SMALL_SETTINGS) if small else (SHAPES, Settings())
    if args.layers:
        shapes = tuple(dataclasses.replace(s, layers=args.layers) for s in shapes)
    if args.models:
        shapes = tuple(s for s in shapes if s.name in args.models)
    settings = dataclasses.replace(settings, **{k: v for k, v in (("seq", args.seq), ("batch", args.batch)) if v})
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # never fall back to eager silently

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    note = (f"Random {settings.dtype} weights, AdamW on {settings.dtype} parameters (no fp32 master weights). "
            "Layers reduced for the time budget: "
            + ", ".join(f"{s.name} runs {s.layers} of {s.full_layers}" for s in shapes)
            + " -- the GB saved do not depend on depth, the ratios do. The Gemma-2-2B-like shape runs on "
            "transformers' Gemma 3 text architecture (SDPA attention; the Gemma 2 class has only eager/flash/"
            "flex attention) with attention softcapping off and final logit softcapping 30.")
    print(f"{device_name}; {note}", flush=True)
    t0 = time.perf_counter()
    record = {
        "what": "peak memory and tokens/s of a whole training step (forward, backward, AdamW), "
                "plain torch.compile vs backend='cce' (its default, and max_workspace_bytes=0), and the largest batch that fits",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "versions": versions(), "command": " ".join(sys.argv), "note": note,
        "settings": dataclasses.asdict(settings), "shapes": [dataclasses.asdict(s) for s in shapes],
        "results": [], "wall_s": None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        print(f"{shape.name}: V={shape.vocab}, hidden {shape.hidden}, {shape.layers} layers, "
              f"seq {settings.seq}", flush=True)
        for backend in args.backends:
            record["results"].append(measure(shape, backend, settings, device, search=not args.no_search))
            record["wall_s"] = time.perf_counter() - t0
            args.out.write_text(json.dumps(record, indent=1))  # after each run: a partial run keeps its data
            print(f"  ({record['wall_s']:.0f}s so far)", flush=True)

    print(f"\nwrote {args.out} ({record['wall_s']:.0f}s)\n", flush=True)
    print(table(record), flush=True)
    return record


if __name__ == "__main__":
    main()

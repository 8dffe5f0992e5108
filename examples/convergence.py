"""Convergence: one Llama-style model trained four ways from the same init on the same batches.

The ways: eager PyTorch, plain torch.compile, torch.compile with the cce pass with gradient filtering
(exact=False, opt-in), and the pass in exact mode (exact=True, the default). A fifth run, eager from
another random init on the same batches, gives the scale of run-to-run noise that "the curves overlap
within noise" is judged against (rounding differences alone, compile against eager, are far smaller). The model is an unmodified Hugging Face
LlamaForCausalLM built from a config with random weights; the data is the Python standard library's
own .py source files, tokenized with a byte-level BPE tokenizer trained here with `tokenizers`.
Everything is offline and deterministic (sorted file list, fixed seeds).

    python examples/convergence.py --out results/convergence           # GPU, ~3-4 minutes on an H100
    python examples/convergence.py --small --out /tmp/convergence      # CPU smoke test, tiny sizes

Writes <out>/convergence.json (per-step losses of every way, held-out loss, config, device, versions,
date, wall times, tokens/s, peak memory) and, where matplotlib is installed (the "bench" extra),
<out>/convergence.png (the loss curves).

Expected output: the data and model lines, each way's loss every 50 steps (and its last), then a
table with one row per way. The compiled ways follow eager's curve to rounding (on the CPU, in
float32, to ~1e-5); the filtered way (exact=False) may stray slightly more on a GPU; the reseeded
eager run differs by far more -- that is the noise scale. The last line names the files written.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import hashlib
import importlib.util
import json
import math
import pathlib
import platform
import sysconfig
import time

import torch

import cce_inductor

WAYS = ("eager", "compile", "cce", "cce_exact", "eager_reseeded")
LABELS = {
    "eager": "eager",
    "compile": "torch.compile",
    "cce": 'torch.compile, backend="cce", exact=False (filtered)',
    "cce_exact": 'torch.compile, backend="cce", exact=True',
    "eager_reseeded": "eager, another init seed (noise scale)",
}


@dataclasses.dataclass(frozen=True)
class Config:
    text_bytes: int = 16_000_000  # characters of stdlib source read (caps tokenizer time and data)
    vocab: int = 32768
    hidden: int = 512
    intermediate: int = 1408
    layers: int = 4
    heads: int = 8
    seq: int = 512
    batch: int = 16
    steps: int = 300
    lr: float = 1e-3
    warmup: int = 30
    eval_batches: int = 8
    seed: int = 0


SMALL = Config(text_bytes=600_000, vocab=2048, hidden=64, intermediate=128, layers=1, heads=4, seq=64,
               batch=4, steps=6, warmup=2, eval_batches=2)


# ----------------------------------------------------------------------------- data


def read_stdlib_sources(max_chars: int) -> tuple[list[str], int]:
    """The standard library's .py files in sorted path order, up to ``max_chars`` characters."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    paths = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    texts, total = [], 0
    for path in paths:
        text = path.read_bytes().decode("utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if total < max_chars // 2:
        raise RuntimeError(f"only {total} characters of .py source under {root}; need about {max_chars}")
    return texts, len(paths)


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenize(tok, texts: list[str]) -> torch.Tensor:
    """All files as one token stream, files separated by <|endoftext|>."""
    eot = tok.token_to_id("<|endoftext|>")
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int64)


def make_batches(stream: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, batch, seq) training windows at random offsets, and held-out windows from the last 5%."""
    split = int(len(stream) * 0.95)
    train, held_out = stream[:split], stream[split:]
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, len(train) - cfg.seq, (cfg.steps, cfg.batch), generator=gen)
    batches = train[starts[..., None] + torch.arange(cfg.seq)]
    n_eval = cfg.eval_batches * cfg.batch
    eval_starts = torch.linspace(0, len(held_out) - cfg.seq - 1, n_eval).long()
    evals = held_out[eval_starts[:, None] + torch.arange(cfg.seq)].view(cfg.eval_batches, cfg.batch, cfg.seq)
    return batches, evals


# ----------------------------------------------------------------------------- training


def build_model(cfg: Config, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq, use_cache=False, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_one_way(way: str, init_model, batches, evals, cfg: Config, device: torch.device) -> dict:
    torch.compiler.reset()
    model = copy.deepcopy(init_model).to(device).train()
    use_amp = device.type == "cuda"  # bf16 autocast on the GPU, float32 on the CPU

    def loss_fn(ids):  # the training code: unmodified model, HF's own loss
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            return model(input_ids=ids, labels=ids).loss

    rewritten = None
    if way in ("eager", "eager_reseeded"):
        step_fn = loss_fn
    elif way == "compile":
        step_fn = torch.compile(loss_fn)
    else:
        options = {"exact": way == "cce_exact"}  # explicit: "cce" is the filtered (opt-in) mode
        step_fn = torch.compile(loss_fn, backend="cce", options=options)
        with cce_inductor.enable(**options):  # what the rewrite does to this training step
            report = cce_inductor.explain(loss_fn, batches[0].to(device))
        rewritten = {"sites_rewritten": len(report.rewritten), "report": str(report)}
        print(f"  explain(): {len(report.rewritten)} of {len(report.sites)} loss call(s) rewritten", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = torch.zeros(cfg.steps, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed_from = min(10, cfg.steps - 1)  # steps before this one include compilation and warm-up
    sync()
    start = time.perf_counter()
    for step, ids in enumerate(batches):
        if step == timed_from:
            sync()
            timed_start = time.perf_counter()
        loss = step_fn(ids.to(device, non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[step] = loss.detach()
        if step == 0:
            sync()
            first_step_s = time.perf_counter() - start
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            print(f"  {way:9s} step {step + 1:4d}/{cfg.steps}  loss {loss.item():.4f}", flush=True)
    sync()
    end = time.perf_counter()
    timed_tokens = (cfg.steps - timed_from) * cfg.batch * cfg.seq

    model.eval()
    with torch.no_grad():
        eval_loss = sum(loss_fn(ids.to(device)).item() for ids in evals)  # eager, the same for all ways
    skipped = None
    if way == "cce" and device.type == "cuda":  # how much the filter skips on this model's held-out data
        skipped = {"initial": filter_skipped_fraction(init_model.to(device), evals[0].to(device)),
                   "trained": filter_skipped_fraction(model, evals[0].to(device))}
        init_model.cpu()
        print(f"  filter: fraction of backward tiles skipped, held-out batch: {skipped}", flush=True)
    return {
        "filter_skipped_fraction": skipped,
        "losses": losses.tolist(),
        "explain": rewritten,
        "eval_loss": eval_loss / len(evals),
        "wall_s": end - start,
        "first_step_s": first_step_s,
        "tokens_per_s": timed_tokens / (end - timed_start),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


@torch.no_grad()
def filter_skipped_fraction(model, ids) -> float:
    """Fraction s of (token, vocabulary) tiles whose gradient GEMMs the filter skips for this model's
    head on one batch (bfloat16, as under autocast; HF's shifted labels)."""
    from cce_inductor import kernels

    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    e = hidden.reshape(-1, hidden.shape[-1]).to(torch.bfloat16)
    c = model.lm_head.weight.to(torch.bfloat16)
    return kernels.skipped_fraction(e, c, ids[:, 1:].reshape(-1))


# ----------------------------------------------------------------------------- report


def ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot(results: dict, path: pathlib.Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_diff) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(2, 1))
    base = ema(results["eager"]["losses"])
    styles = {"eager": "-", "compile": "-", "cce": "--", "cce_exact": ":", "eager_reseeded": "-"}  # overlaps stay visible
    for way, res in results.items():
        steps = range(1, len(res["losses"]) + 1)
        smooth = ema(res["losses"])
        color = "0.6" if way == "eager_reseeded" else None
        line, = ax_loss.plot(steps, smooth, styles[way], label=LABELS[way], linewidth=1.4, color=color)
        ax_loss.plot(steps, res["losses"], color=line.get_color(), alpha=0.15, linewidth=0.6)
        ax_diff.plot(steps, [s - b for s, b in zip(smooth, base)], styles[way], color=line.get_color(), linewidth=1.2)
    ax_loss.set_ylabel("training loss (thin: per step, bold: EMA 0.1)")
    ax_loss.set_title(title, fontsize=10)
    ax_loss.legend()
    ax_diff.axhline(0.0, color="gray", linewidth=0.5)
    ax_diff.set_ylabel("EMA loss - eager's")
    ax_diff.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions() -> dict:
    import tokenizers
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
           "cce_inductor": cce_inductor.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("convergence_out"))
    parser.add_argument("--small", action="store_true", help="tiny sizes for a CPU smoke test (automatic without a GPU)")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = SMALL if (args.small or device.type == "cpu") else Config()
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    texts, n_files = read_stdlib_sources(cfg.text_bytes)
    tok = train_tokenizer(texts, cfg.vocab)
    stream = tokenize(tok, texts)
    batches, evals = make_batches(stream, cfg)
    vocab = tok.get_vocab_size()
    data = {"source": "Python standard library .py files, sorted by path", "files_read": len(texts),
            "files_available": n_files, "characters": sum(map(len, texts)), "tokens": len(stream),
            "vocab_size": vocab, "sha256_of_tokens": hashlib.sha256(stream.numpy().tobytes()).hexdigest()[:16]}
    print(f"data: {data['files_read']} files, {data['characters']:,} chars -> {data['tokens']:,} tokens, "
          f"vocab {vocab} ({time.perf_counter() - t0:.1f}s)", flush=True)

    init_model = build_model(cfg, vocab, cfg.seed)
    n_params = sum(p.numel() for p in init_model.parameters())
    print(f"model: LlamaForCausalLM, {n_params / 1e6:.1f}M parameters, {cfg.layers} layers, hidden {cfg.hidden}; "
          f"batch {cfg.batch} x seq {cfg.seq}, {cfg.steps} steps, device {device}", flush=True)
    results = {}
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    record = {
        "what": "training loss of one Llama-style model trained four ways (same init, same batches), "
                "and eager from another init (noise scale)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "versions": versions(), "config": dataclasses.asdict(cfg),
        "dtype": "bf16 autocast, fp32 parameters" if device.type == "cuda" else "fp32",
        "parameters": n_params, "data": data, "results": results,
        "wall_s": None,
    }
    for way in args.ways:
        print(f"training: {LABELS[way]}", flush=True)
        init = build_model(cfg, vocab, cfg.seed + 1) if way == "eager_reseeded" else init_model
        results[way] = train_one_way(way, init, batches, evals, cfg, device)
        del init
        torch.compiler.reset()  # free what compiled code still holds of this way's model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record["wall_s"] = time.perf_counter() - t0
        (args.out / "convergence.json").write_text(json.dumps(record, indent=1))  # a partial run keeps its data
    written = [args.out / "convergence.json"]
    if "eager" in results and importlib.util.find_spec("matplotlib") is not None:  # the plot's one dependency
        plot(results, args.out / "convergence.png",
             f"LlamaForCausalLM {n_params / 1e6:.1f}M params, vocab {vocab}, {cfg.steps} steps, {device_name}")
        written.append(args.out / "convergence.png")
    elif "eager" in results:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]'); the data is in convergence.json")

    if "eager" in results:  # how far each curve is from eager's (compile vs eager = rounding; reseeded = run-to-run)
        base, base_ema = results["eager"]["losses"], ema(results["eager"]["losses"])
        for res in results.values():
            res["mean_abs_diff_to_eager"] = sum(abs(a - b) for a, b in zip(res["losses"], base)) / cfg.steps
            after_warmup = list(zip(ema(res["losses"]), base_ema))[cfg.warmup:]
            res["max_abs_ema_diff_to_eager_after_warmup"] = max((abs(a - b) for a, b in after_warmup), default=0.0)
        (args.out / "convergence.json").write_text(json.dumps(record, indent=1))
    tail = max(1, cfg.steps // 10)
    print(f"\n| way | mean loss, last {tail} steps | mean abs. difference to eager, per step "
          f"| max abs. difference of the EMA curves, steps > {cfg.warmup} | held-out loss "
          "| tokens/s | first step (s) | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for way, res in results.items():
        peak = f"{res['peak_memory_bytes'] / 1e9:.2f}" if res["peak_memory_bytes"] else "-"
        diffs = [res.get(k) for k in ("mean_abs_diff_to_eager", "max_abs_ema_diff_to_eager_after_warmup")]
        diffs = " | ".join("-" if d is None else f"{d:.4f}" for d in diffs)
        print(f"| {LABELS[way]} | {sum(res['losses'][-tail:]) / tail:.4f} | {diffs} | "
              f"{res['eval_loss']:.4f} | {res['tokens_per_s']:,.0f} | {res['first_step_s']:.1f} | {peak} |")
    print(f"\nwrote {' and '.join(map(str, written))} ({record['wall_s']:.0f}s in all)", flush=True)
    return record


if __name__ == "__main__":
    main()

"""Quick start: compile an unmodified model with backend="cce" and train it without the N x V logits.

    python examples/quickstart.py            # a real size on a GPU, a small one on the CPU
    python examples/quickstart.py --small    # the small size anywhere

The model is ordinary PyTorch -- an embedding, a few residual MLP blocks, a linear head and
F.cross_entropy -- and knows nothing of cce_inductor. The whole change to a training script is the
backend name; cce_inductor.explain() shows what the rewrite found.

Expected output: explain()'s report with one loss call, rewritten; a loss that falls at every step
from about ln(V) (9.0 on the CPU, 11.8 on a GPU) -- the data is one random batch trained on again at
every step, so the model memorizes it; the size of the N x V logits that were never materialized;
on a GPU, the measured peak memory of a training step with backend="cce" below plain torch.compile's.
"""

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import cce_inductor


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, targets):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def training_step(model, backend: str):
    """A plain training step; ``backend`` is the only thing that cce_inductor asks of it."""
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(tokens, targets) -> float:
        loss = compiled(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def peak_step_memory(model, backend: str, tokens, targets) -> int:
    """Peak CUDA memory of one training step above the weights and optimizer state (after warm-up)."""
    step = training_step(copy.deepcopy(model), backend)
    step(tokens, targets)  # compiles, allocates the AdamW state
    step(tokens, targets)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(tokens, targets)
    return torch.cuda.max_memory_allocated() - before


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CPU size (automatic without a GPU)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    vocab, dim, batch, seq = (8192, 64, 4, 64) if small else (128256, 2048, 8, 1024)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16

    torch.manual_seed(0)
    model = TinyLM(vocab, dim).to(device, dtype)
    tokens = torch.randint(0, vocab, (batch, seq), device=device)
    targets = torch.randint(0, vocab, (batch, seq), device=device)

    print("1. What the rewrite finds in the model (cce_inductor.explain):", flush=True)
    report = cce_inductor.explain(model, tokens, targets)
    print(report, flush=True)

    print(f'\n2. Training, compiled with torch.compile(model, backend="cce") on {device}:', flush=True)
    init = copy.deepcopy(model)  # for the memory comparison below, from the same weights
    step = training_step(model, "cce")
    losses = []
    for i in range(args.steps):
        losses.append(step(tokens, targets))
        print(f"  step {i}: loss {losses[-1]:.4f}", flush=True)

    logits_bytes = batch * seq * vocab * torch.finfo(dtype).bits // 8
    print(f"\n3. Memory: the {batch * seq} x {vocab} logits ({logits_bytes / 2**20:,.0f} MiB in {dtype}) are never "
          f"materialized; explain() estimates {report.bytes_avoided / 2**20:,.0f} MiB of N x V tensors avoided "
          "(the logits and what cross_entropy keeps of them for the backward).", flush=True)
    result = {"report": report, "losses": losses, "logits_bytes": logits_bytes}
    if device == "cuda":
        peaks = {backend: peak_step_memory(init, backend, tokens, targets) for backend in ("inductor", "cce")}
        print(f"   measured peak memory of a training step, above weights and optimizer state: "
              f"plain torch.compile {peaks['inductor'] / 2**30:.2f} GiB, "
              f'backend="cce" {peaks["cce"] / 2**30:.2f} GiB '
              f"(saved {(peaks['inductor'] - peaks['cce']) / 2**30:.2f} GiB)", flush=True)
        result["peak_bytes"] = peaks
    print(f"\nDone: {len(report.rewritten)} of {len(report.sites)} loss call(s) rewritten; loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f} over {len(losses)} steps (one batch trained on repeatedly, so it falls).", flush=True)
    return result


if __name__ == "__main__":
    main()

"""A classifier with tens of thousands of classes: nn.Linear + nn.CrossEntropyLoss, compiled with backend="cce".

    python examples/classifier.py            # 100,000 classes, batch 8192 on a GPU; 50,000 classes, batch 256 on the CPU
    python examples/classifier.py --small

Extreme classification (products, entities, face identities) has the same N x V problem as a
language model's head. The model below is a plain nn.Sequential; the loss is nn.CrossEntropyLoss
with label smoothing. The data is synthetic: each class has a random prototype, and an example is
its class's prototype plus noise.

Expected output: explain()'s report with one loss call (nn.CrossEntropyLoss with label smoothing,
a head with bias), rewritten; one loss per step, falling from about ln(classes) (10.8 on the CPU,
11.5 on a GPU) -- the loop trains on one batch again at every step, so the model memorizes it (with a
fresh batch per step, each class would be seen about once in hundreds of steps and the loss would not
move in a few); the size of the logits never materialized; on a GPU, the peak memory of a step with
backend="cce" against plain torch.compile's.
"""

import argparse

import torch
import torch.nn as nn

import cce_inductor


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CPU size (automatic without a GPU)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    classes, features, dim, batch = (50_000, 64, 64, 256) if small else (100_000, 512, 1024, 8192)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(features, dim), nn.GELU(), nn.LayerNorm(dim),
        nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim),
        nn.Linear(dim, classes),  # the classifier head, with bias
    ).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    prototypes = torch.randn(classes, features, device=device)

    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.randint(0, classes, (batch,), device=device, generator=gen)
    x = prototypes[y] + 0.5 * torch.randn(batch, features, device=device, generator=gen)

    def train_loss(x, y):  # the training step's loss: model and criterion as they are
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return criterion(model(x), y)

    report = cce_inductor.explain(train_loss, x, y)
    print(report, flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def train_step(step_fn) -> float:
        loss = step_fn(x, y)  # the same batch at every step
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step_fn = torch.compile(train_loss, backend="cce")
    losses = []
    for step in range(args.steps):
        losses.append(train_step(step_fn))
        print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
    print(f"{batch} x {classes:,} logits never materialized: explain() estimates "
          f"{report.bytes_avoided / 2**20:,.0f} MiB of N x V tensors avoided per step", flush=True)

    result = {"report": report, "losses": losses}
    if device == "cuda":  # peak memory of a step above weights and optimizer state, against plain torch.compile
        result["peak_bytes"] = {}
        for name, fn in (("torch.compile", torch.compile(train_loss)), ('backend="cce"', step_fn)):
            train_step(fn)  # compiles
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            train_step(fn)
            result["peak_bytes"][name] = torch.cuda.max_memory_allocated() - before
            print(f"peak memory of a training step, {name}: {result['peak_bytes'][name] / 2**30:.2f} GiB", flush=True)
    print(f"Done: {len(report.rewritten)} of {len(report.sites)} loss call(s) rewritten; loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f} over {len(losses)} steps (one batch trained on repeatedly, so it falls).", flush=True)
    return result


if __name__ == "__main__":
    main()

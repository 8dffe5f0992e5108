"""nanoGPT: a model whose forward returns (logits, loss), compiled with backend="cce" as it is.

    python examples/nanogpt.py            # GPT-2 small (124M) on a GPU (six compilations, a few minutes)
    python examples/nanogpt.py --small    # a tiny GPT (the default without a GPU)

The model is written the way karpathy/nanoGPT's model.py writes it: tied embeddings and a forward
that returns both the logits and the loss. The rewrite computes the loss with the CCE op, and
backend="cce" hands the logits back deferred (option defer_logits, on by default): a tensor whose
values are formed only when something reads them, with eager's values and gradients. nanoGPT's
training loop never reads them, so they are never formed; holding them across ``optimizer.step()``
costs a copy of the head's weight there (so that a later read still sees the forward's weights).
The alternatives: a training step that returns only the loss (no logits at all), and the options
detach_logits=True (no gradient through the returned logits) and defer_logits=False (logits formed
and returned as in eager mode, with an N x V gradient in the backward).

Expected output: two explain() reports with one loss call rewritten -- the first (the model as it
is) with a line saying the returned logits are deferred, the second (a step returning only the loss)
without -- then one line per training step, its loss falling from about ln(V) (9.0 on the CPU, 10.8
on a GPU; the model memorizes the one random batch it trains on) and "formed: False"; on a GPU, the
peak memory of a training step each way, the deferred and loss-only ways well below the others.
"""

import argparse
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cce_inductor


# ----------------------------------------------------------------------------- the model, as nanoGPT has it


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
            if p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position
            loss = None
        return logits, loss


# ----------------------------------------------------------------------------- the example


def peak_step_memory(step_fn, params, idx, targets) -> int:
    """Peak CUDA memory of a training step (forward, backward, AdamW) above weights and optimizer state."""
    opt = torch.optim.AdamW(params, lr=6e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step_fn(idx, targets)
        loss = out[1] if isinstance(out, tuple) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # compiles, allocates the AdamW state
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - before


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CPU size (automatic without a GPU)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    config = GPTConfig(block_size=64, vocab_size=8192, n_layer=2, n_head=2, n_embd=64) if small else GPTConfig()
    batch = 4 if small else 12
    torch.manual_seed(0)
    model = GPT(config).to(device)
    idx = torch.randint(0, config.vocab_size, (batch, config.block_size), device=device)
    targets = torch.randint(0, config.vocab_size, (batch, config.block_size), device=device)

    def train_loss(idx, targets):  # a training step that returns only the loss
        _, loss = model(idx, targets)
        return loss

    print("1. explain(model, idx, targets): the forward returns the logits", flush=True)
    returned = cce_inductor.explain(model, idx, targets)
    print(returned, flush=True)
    print("\n2. explain(train_loss, idx, targets): a step that returns only the loss", flush=True)
    loss_only = cce_inductor.explain(train_loss, idx, targets)
    print(loss_only, flush=True)

    print(f'\n3. Training the model as it is, torch.compile(model, backend="cce") on {device}:', flush=True)
    init = copy.deepcopy(model.state_dict())
    compiled = torch.compile(model, backend="cce")
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4)
    losses, formed = [], []
    for i in range(args.steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits, loss = compiled(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        formed.append(bool(getattr(logits, "formed", True)))  # deferred logits: formed only once read
        losses.append(loss.item())
        print(f"  step {i}: loss {losses[-1]:.4f}, logits formed: {formed[-1]}", flush=True)
    result = {"returned": returned, "loss_only": loss_only, "losses": losses, "logits_formed": formed}

    if device == "cuda":
        print(f"\n4. Peak memory of a training step (batch {batch} x {config.block_size}, bf16 autocast), "
              "above weights and optimizer state:", flush=True)
        peaks = {}
        for name, fn, options in (
            ("torch.compile(model)", None, None),
            ('backend="cce": logits deferred, never read', model, {}),
            ('backend="cce", train_loss: only the loss returned', train_loss, {}),
            ('backend="cce", detach_logits=True', model, {"detach_logits": True}),
            ('backend="cce", defer_logits=False', model, {"defer_logits": False}),
        ):
            torch.compiler.reset()
            model.load_state_dict(init)
            step_fn = torch.compile(model) if fn is None else torch.compile(fn, backend="cce", options=options)
            peaks[name] = peak_step_memory(step_fn, model.parameters(), idx, targets)
            print(f"   {name:52s} {peaks[name] / 2**30:6.2f} GiB", flush=True)
        result["peak_bytes"] = peaks
    deferred = bool(returned.rewritten and returned.rewritten[0].deferred)
    print(f"\nDone: loss calls rewritten: {len(returned.rewritten)} in 1 (returned logits "
          f"{'deferred' if deferred else 'not deferred'}), {len(loss_only.rewritten)} in 2; loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f} over {len(losses)} steps (one batch trained on repeatedly, so it falls); "
          f"logits formed in {sum(formed)} of {len(formed)} steps.", flush=True)
    return result


if __name__ == "__main__":
    main()

"""GRPO with backend="cce": per-token log-probs and an entropy bonus without the N x V logits.

    python examples/grpo.py            # a real vocabulary on a GPU, a small one on the CPU
    python examples/grpo.py --small    # the small size anywhere (seconds on a CPU)

A tiny policy (an embedding, one residual MLP block, a linear head) samples groups of completions
for a few prompts; a toy reward counts the completion's even token ids; advantages are the rewards
normalized within each group (GRPO). The loss is what RL code writes by hand from the logits --
``gather(log_softmax(logits / temperature), -1, ids)``, the ratio to the sampling policy's
log-probs clipped PPO-style, times the advantages, minus an entropy bonus from
``torch.distributions.Categorical(logits=...).entropy()``, a masked mean over completion tokens --
and knows nothing of cce_inductor. Compiled with ``backend="cce"``, the log-probs, the log-sum-exp
and the entropy come from one call of ``cce_inductor.token_stats.linear_token_stats``.

Expected output: explain()'s report with one token_stats site, rewritten (statistics: the gather as
a logprob, Categorical's logsumexp and its sum as the entropy); the compiled loss equal to eager's
to float32 rounding; then one line per iteration whose mean reward starts near half the completion
length (random tokens are even half the time) and, at the small size, rises well above it within
the six iterations as the policy learns to emit even ids.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import cce_inductor


class TinyPolicy(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.block(h)
        return self.head(self.norm(h))


def grpo_loss(policy, seqs, mask, old_logp, advantages, temperature: float, clip: float = 0.2, beta: float = 0.01):
    """The clipped policy-gradient loss with an entropy bonus, over the completion tokens (``mask``)."""
    logits = policy(seqs[:, :-1]) / temperature
    targets = seqs[:, 1:]
    logp = torch.gather(logits.log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    pg = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    return ((pg - beta * entropy) * mask).sum() / mask.sum()


def token_logprobs(policy, seqs, temperature: float):
    """Log-probabilities of the sampled tokens under ``policy`` (the old policy's, for the ratio)."""
    logits = policy(seqs[:, :-1]) / temperature
    return torch.gather(logits.log_softmax(-1), -1, seqs[:, 1:].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample(policy, prompts, group: int, length: int, temperature: float, gen: torch.Generator):
    """``group`` completions of ``length`` tokens per prompt, sampled token by token (eagerly)."""
    seqs = prompts.repeat_interleave(group, dim=0)
    for _ in range(length):
        logits = policy(seqs)[:, -1] / temperature
        nxt = torch.multinomial(F.softmax(logits.float(), -1), 1, generator=gen)
        seqs = torch.cat([seqs, nxt], dim=1)
    return seqs


def rewards_and_advantages(seqs, prompt_len: int, group: int):
    """Toy reward: the number of even token ids in the completion; advantages normalized per group."""
    reward = (seqs[:, prompt_len:] % 2 == 0).float().sum(-1)
    grouped = reward.view(-1, group)
    adv = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-4)
    return reward, adv.view(-1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CPU size (automatic without a GPU)")
    parser.add_argument("--iterations", type=int, default=6)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    vocab, dim, prompts_n, group, prompt_len, length = (
        (512, 32, 4, 8, 4, 8) if small else (151936, 1024, 8, 8, 32, 128)
    )
    temperature = 0.9
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    policy = TinyPolicy(vocab, dim).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-2 if small else 1e-3)
    compiled_loss = torch.compile(grpo_loss, backend="cce")
    compiled_logprobs = torch.compile(token_logprobs, backend="cce")

    prompts = torch.randint(0, vocab, (prompts_n, prompt_len), device=device, generator=gen)
    seqs = sample(policy, prompts, group, length, temperature, gen)
    mask = torch.zeros(seqs.shape[0], seqs.shape[1] - 1, device=device)
    mask[:, prompt_len - 1:] = 1.0  # the positions that predict completion tokens
    _, adv = rewards_and_advantages(seqs, prompt_len, group)
    with torch.no_grad():
        old = token_logprobs(policy, seqs, temperature)
    batch = (policy, seqs, mask, old, adv, temperature)
    report = cce_inductor.explain(grpo_loss, *batch)
    print(report)
    eager = grpo_loss(*batch)
    compiled = compiled_loss(*batch)
    rel = (compiled - eager).abs().item() / max(eager.abs().item(), 1e-12)
    print(f"loss: eager {eager.item():.6f}, backend='cce' {compiled.item():.6f} (relative difference {rel:.1e})")

    mean_rewards, losses = [], []
    for it in range(args.iterations):
        seqs = sample(policy, prompts, group, length, temperature, gen)
        reward, adv = rewards_and_advantages(seqs, prompt_len, group)
        with torch.no_grad():
            old = compiled_logprobs(policy, seqs, temperature)
        for _ in range(4):  # several updates per batch of samples: the ratio moves away from 1
            loss = compiled_loss(policy, seqs, mask, old, adv, temperature)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        mean_rewards.append(reward.mean().item())
        losses.append(loss.item())
        print(f"iteration {it}: mean reward {mean_rewards[-1]:.2f} of {length}, loss {losses[-1]:+.4f}")
    return {"report": report, "relative_difference": rel, "rewards": mean_rewards, "losses": losses,
            "length": length}


if __name__ == "__main__":
    main()

"""Inputs for tests and benchmarks in two data regimes, and the statistics that describe them.

* ``uniform``: logits ~ N(0, 1) -- a near-uniform softmax, as in an untrained model.
* ``lm``: a peaked softmax like a trained language model's. Rows of C are random unit vectors; each
  token has 64 distinct plausible next tokens drawn from a Zipf distribution over the vocabulary,
  with weights 15 - 2.4 ln k + N(0, 1.5^2) for the k-th; e = sum_k weight_k C[token_k] + N(0, 0.3^2);
  the target is sampled from the resulting softmax.

Everything is generated in chunks of tokens, so that no N x V tensor is ever held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

REGIMES = ("uniform", "lm")
_CHUNK_ELEMENTS = 2**27


@dataclass(frozen=True)
class Inputs:
    e: Tensor  # (N, D)
    c: Tensor  # (V, D)
    targets: Tensor  # (N,) int64


def make_inputs(regime: str, n: int, d: int, v: int, *, dtype=torch.bfloat16, device="cpu", seed: int = 0,
                plausible: int = 64) -> Inputs:
    """Embeddings, classifier and targets of the given regime, in ``dtype`` on ``device``."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    gen = torch.Generator(device=device).manual_seed(seed)
    if regime == "uniform":
        c = torch.randn(v, d, generator=gen, device=device)
        e = torch.randn(n, d, generator=gen, device=device) / math.sqrt(d)
        targets = torch.randint(0, v, (n,), generator=gen, device=device)
        return Inputs(e.to(dtype), c.to(dtype), targets)

    c = torch.randn(v, d, generator=gen, device=device)
    c = c / c.norm(dim=1, keepdim=True)
    k = min(plausible, v)
    zipf = 1.0 / torch.arange(1, v + 1, device=device, dtype=torch.float32) ** 1.1
    e = torch.empty(n, d, device=device)
    rows = max(1, _CHUNK_ELEMENTS // v)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        tokens = torch.multinomial(zipf.expand(n1 - n0, v), k, replacement=False, generator=gen)
        rank = torch.arange(1, k + 1, device=device, dtype=torch.float32)
        weight = 15.0 - 2.4 * torch.log(rank) + 1.5 * torch.randn(n1 - n0, k, generator=gen, device=device)
        e[n0:n1] = torch.einsum("nk,nkd->nd", weight, c[tokens]) + 0.3 * torch.randn(n1 - n0, d, generator=gen, device=device)
    e, c = e.to(dtype), c.to(dtype)
    return Inputs(e, c, sample_targets(e, c, gen))


def _logit_chunks(e: Tensor, c: Tensor):
    rows = max(1, _CHUNK_ELEMENTS // c.shape[0])
    for n0 in range(0, e.shape[0], rows):
        yield n0, (e[n0 : n0 + rows].float() @ c.float().T)


def sample_targets(e: Tensor, c: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """A target per token sampled from softmax(e @ c.T) (Gumbel-max, chunk by chunk)."""
    out = torch.empty(e.shape[0], dtype=torch.long, device=e.device)
    for n0, z in _logit_chunks(e, c):
        u = torch.rand(z.shape, generator=gen, device=z.device).clamp_min_(1e-20)
        out[n0 : n0 + z.shape[0]] = (z - torch.log(-torch.log(u))).argmax(dim=1)
    return out


def regime_stats(e: Tensor, c: Tensor, threshold: float = 2.0**-12) -> dict:
    """Mean softmax entropy (nats) and the fraction of probabilities >= threshold."""
    entropy, above, count = 0.0, 0, 0
    for _, z in _logit_chunks(e, c):
        logp = torch.log_softmax(z, dim=1)
        entropy += float(-(logp.exp() * logp).sum())
        above += int((logp >= math.log(threshold)).sum())
        count += z.shape[0]
    return {"mean_entropy_nats": entropy / count, "frac_p_ge_2^-12": above / (count * c.shape[0])}

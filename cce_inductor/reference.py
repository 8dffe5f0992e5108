"""The readable reference and the memory-bounded pure-torch path.

Two things live here, both pure torch:

* ``naive_linear_cross_entropy`` -- the definition of the op, written the obvious way: it builds the
  full N x V logits (in float64 by default) and calls ``F.cross_entropy``. Tests and benchmarks use it
  as the gold; it is never on a fast path.
* ``chunked_forward`` / ``chunked_backward`` -- the ``impl="torch"`` path of the op: the vocabulary
  (and the tokens) are walked in chunks with an online log-sum-exp, so the extra memory is one
  chunk of logits, never N x V. It is the default on the CPU and the fallback where Triton cannot
  run. Both functions work on flattened, already shifted inputs (e: (N, D), targets: (N,)); the
  public function in ``ops.py`` does the flattening, shifting and reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of one logits chunk (float32): 2**22 * 4 B = 16 MiB; the backward holds about four
# chunk-sized temporaries at a time.
CHUNK_ELEMENTS = 2**22
TOKEN_CHUNK = 1024


def naive_linear_cross_entropy(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: int = 0,
    label_smoothing: float = 0.0,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float64,
):
    """The op's definition: materialize the logits in ``compute_dtype`` and call F.cross_entropy."""
    if shift:
        e = e[..., :-shift, :]
        targets = targets[..., shift:]
    z = e.to(compute_dtype) @ c.to(compute_dtype).T
    if bias is not None:
        z = z + bias.to(compute_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(
        z.reshape(-1, c.shape[0]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if reduction == "none":
        loss = loss.view(targets.shape)
    if return_lse:
        return loss, torch.logsumexp(z, dim=-1)
    return loss


def _logits(e_chunk: Tensor, c_chunk: Tensor, b_chunk: Tensor | None, softcap: float):
    """float32 logits of one chunk; with softcap also tanh(u / cap), which the backward needs."""
    z = e_chunk.float() @ c_chunk.float().T  # [n, v]
    if b_chunk is not None:
        z = z + b_chunk.float()
    if softcap:
        t = torch.tanh(z / softcap)
        return softcap * t, t
    return z, None


def _chunks(n: int, size: int):
    return ((start, min(start + size, n)) for start in range(0, n, size))


def _vocab_chunk(num_tokens: int, vocab: int) -> int:
    return max(1, min(vocab, CHUNK_ELEMENTS // max(1, num_tokens)))


def chunked_forward(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """Per-token loss and log-sum-exp, float32, shape (N,). The loss is 0 where the target is
    ignore_index and NaN where it is outside [0, V)."""
    num_tokens, vocab = e.shape[0], c.shape[0]
    loss = torch.empty(num_tokens, dtype=torch.float32, device=e.device)
    lse = torch.empty_like(loss)
    for n0, n1 in _chunks(num_tokens, TOKEN_CHUNK):
        e_chunk, t = e[n0:n1], targets[n0:n1]
        run_max = torch.full((n1 - n0,), float("-inf"), device=e.device)
        run_sum = torch.zeros(n1 - n0, device=e.device)
        target_logit = torch.zeros(n1 - n0, device=e.device)
        logit_sum = torch.zeros(n1 - n0, device=e.device)
        for v0, v1 in _chunks(vocab, _vocab_chunk(n1 - n0, vocab)):
            z, _ = _logits(e_chunk, c[v0:v1], None if bias is None else bias[v0:v1], softcap)
            new_max = torch.maximum(run_max, z.amax(dim=1))
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(1)
            run_max = new_max
            # Take the target logit from the same matmul as the log-sum-exp, so that a confident
            # token's loss (lse - z_y, a small difference of large numbers) cancels exactly.
            in_chunk = (t >= v0) & (t < v1)
            local = (t - v0).clamp(0, v1 - v0 - 1)
            target_logit = torch.where(in_chunk, z.gather(1, local[:, None])[:, 0], target_logit)
            if label_smoothing:
                logit_sum = logit_sum + z.sum(1)
        chunk_lse = run_max + torch.log(run_sum)
        chunk_loss = chunk_lse - (1.0 - label_smoothing) * target_logit
        if label_smoothing:
            chunk_loss = chunk_loss - (label_smoothing / vocab) * logit_sum
        valid = t != ignore_index
        out_of_range = valid & ((t < 0) | (t >= vocab))
        chunk_loss = torch.where(valid, chunk_loss, torch.zeros_like(chunk_loss))
        loss[n0:n1] = torch.where(out_of_range, torch.full_like(chunk_loss, float("nan")), chunk_loss)
        lse[n0:n1] = chunk_lse
    return loss, lse


def chunked_backward(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    grad_loss: Tensor,
    grad_lse: Tensor,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
    needs_e: bool,
    needs_c: bool,
    needs_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of sum(grad_loss * loss + grad_lse * lse) w.r.t. e, c and bias (None where not
    needed). With z the (capped) logits and p = softmax(z):
    dz = (grad_loss + grad_lse) * p - grad_loss * ((1 - ls) * onehot(y) + ls / V),
    times (1 - tanh^2) under a softcap; dE = dz @ C, dC = dz^T @ E, dbias = sum_n dz."""
    num_tokens, vocab = e.shape[0], c.shape[0]
    valid = targets != ignore_index
    coef_loss = torch.where(valid, grad_loss.float(), torch.zeros_like(grad_loss, dtype=torch.float32))
    coef_p = coef_loss + grad_lse.float()
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).clamp(0, vocab - 1)

    # The vocabulary is the outer loop so that each chunk of dC is finished before the next starts:
    # float32 accumulators are one vocab chunk of dC plus dE (N x D), never V x D.
    de = torch.zeros(e.shape, dtype=torch.float32, device=e.device) if needs_e else None
    dc = torch.empty_like(c) if needs_c else None
    dbias = torch.empty_like(bias) if needs_bias else None
    vocab_step = _vocab_chunk(min(num_tokens, TOKEN_CHUNK), vocab)
    for v0, v1 in _chunks(vocab, vocab_step):
        c_chunk = c[v0:v1]
        b_chunk = None if bias is None else bias[v0:v1]
        dc_chunk = torch.zeros(v1 - v0, c.shape[1], device=e.device) if needs_c else None
        db_chunk = torch.zeros(v1 - v0, device=e.device) if needs_bias else None
        for n0, n1 in _chunks(num_tokens, TOKEN_CHUNK):
            z, t = _logits(e[n0:n1], c_chunk, b_chunk, softcap)
            g = coef_p[n0:n1, None] * torch.exp(z - lse[n0:n1, None])
            if label_smoothing:
                g = g - coef_loss[n0:n1, None] * (label_smoothing / vocab)
            y = safe_targets[n0:n1]
            in_chunk = (y >= v0) & (y < v1)
            onehot = torch.where(in_chunk, coef_loss[n0:n1] * (1.0 - label_smoothing), torch.zeros_like(coef_loss[n0:n1]))
            g = g.scatter_add(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None], -onehot[:, None])
            if softcap:
                g = g * (1.0 - t * t)
            if needs_e:
                de[n0:n1] += g @ c_chunk.float()
            if needs_c:
                dc_chunk += g.T @ e[n0:n1].float()
            if needs_bias:
                db_chunk += g.sum(0)
        if needs_c:
            dc[v0:v1] = dc_chunk
        if needs_bias:
            dbias[v0:v1] = db_chunk
    return (de.to(e.dtype) if needs_e else None), dc, dbias

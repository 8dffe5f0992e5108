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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs. float32 (and float64) inputs are computed in float64: a confident
    token's gradient p_y - 1 and loss log(1 + small) lose ~1e-5 of their value to float32 rounding
    of the log-sum-exp, and this path is the accuracy reference that the kernels are held to."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _logits(e_chunk: Tensor, c_chunk: Tensor, b_chunk: Tensor | None, softcap: float):
    """Logits of one chunk, e_chunk and c_chunk given in the compute dtype (the callers convert each
    chunk once); with softcap also d(capped)/d(uncapped) = sech^2(u / cap), which the backward needs.
    It is computed as 4a / (1 + a)^2 with a = exp(-2|u / cap|): the textbook 1 - tanh^2 cancels
    catastrophically where the cap saturates."""
    z = e_chunk @ c_chunk.T  # [n, v]
    if b_chunk is not None:
        z.add_(b_chunk.to(z.dtype))
    if softcap:
        u = z / softcap
        a = torch.exp(-2.0 * u.abs())
        return softcap * torch.tanh(u), 4.0 * a / (1.0 + a) ** 2
    return z, None


def _chunks(n: int, size: int):
    return ((start, min(start + size, n)) for start in range(0, n, size))


def _vocab_chunk(num_tokens: int, vocab: int) -> int:
    return max(1, min(vocab, CHUNK_ELEMENTS // max(1, num_tokens)))


def _token_coefficients(targets: Tensor, grad_loss: Tensor, grad_lse: Tensor, ignore_index: int, vocab: int,
                        dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Per token, in ``dtype``: g_loss (0 where the target is ignored), g_p = g_loss + grad_lse, and
    the target clamped into [0, V) (ignored tokens: 0)."""
    valid = targets != ignore_index
    g_loss = torch.where(valid, grad_loss.to(dtype), torch.zeros((), dtype=dtype, device=targets.device))
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).clamp(0, vocab - 1)
    return g_loss, g_loss + grad_lse.to(dtype), safe_targets


def _logit_grad(e_rows: Tensor, c_chunk: Tensor, b_chunk: Tensor | None, v0: int, vocab: int, softcap: float,
                label_smoothing: float, lse: Tensor, g_loss: Tensor, g_p: Tensor, safe_targets: Tensor) -> Tensor:
    """dz of these rows over vocabulary ids [v0, v0 + len(c_chunk)), in the compute dtype (that of
    e_rows and c_chunk): g_p * p - g_loss * ((1 - ls) * onehot(y) + ls / V), times sech^2(u / cap)
    under a softcap."""
    z, dcap = _logits(e_rows, c_chunk, b_chunk, softcap)
    # In place on the chunk's fresh logits: each step would otherwise allocate (and fault in) another
    # chunk-sized temporary. The same operations as out of place, so the same values.
    g = z.sub_(lse[:, None]).exp_().mul_(g_p[:, None])
    if label_smoothing:
        g.sub_(g_loss[:, None] * (label_smoothing / vocab))
    v1 = v0 + c_chunk.shape[0]
    in_chunk = (safe_targets >= v0) & (safe_targets < v1)
    onehot = torch.where(in_chunk, g_loss * (1.0 - label_smoothing), torch.zeros((), dtype=g.dtype, device=g.device))
    g.scatter_add_(1, (safe_targets - v0).clamp(0, v1 - v0 - 1)[:, None], -onehot[:, None])
    if softcap:
        g.mul_(dcap)
    return g


def chunked_forward(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """Per-token loss (float32) and log-sum-exp (in the compute dtype: the backward needs it to
    full precision), shape (N,). The loss is 0 where the target is ignore_index and NaN where it
    is outside [0, V)."""
    num_tokens, vocab = e.shape[0], c.shape[0]
    acc = dict(dtype=_compute_dtype(e.dtype), device=e.device)
    loss = torch.empty(num_tokens, dtype=torch.float32, device=e.device)
    lse = torch.empty(num_tokens, **acc)
    for n0, n1 in _chunks(num_tokens, TOKEN_CHUNK):
        e_chunk, t = e[n0:n1].to(acc["dtype"]), targets[n0:n1]
        run_max = torch.full((n1 - n0,), float("-inf"), **acc)
        run_sum = torch.zeros(n1 - n0, **acc)
        target_logit = torch.zeros(n1 - n0, **acc)
        logit_sum = torch.zeros(n1 - n0, **acc)
        for v0, v1 in _chunks(vocab, _vocab_chunk(n1 - n0, vocab)):
            z, _ = _logits(e_chunk, c[v0:v1].to(acc["dtype"]), None if bias is None else bias[v0:v1], softcap)
            # Take the target logit from the same matmul as the log-sum-exp, so that a confident
            # token's loss (lse - z_y, a small difference of large numbers) cancels exactly.
            in_chunk = (t >= v0) & (t < v1)
            local = (t - v0).clamp(0, v1 - v0 - 1)
            target_logit = torch.where(in_chunk, z.gather(1, local[:, None])[:, 0], target_logit)
            if label_smoothing:
                logit_sum = logit_sum + z.sum(1)
            new_max = torch.maximum(run_max, z.amax(dim=1))
            # exp(z - max) in place on the chunk's logits (read above for the last time)
            run_sum = run_sum * torch.exp(run_max - new_max) + z.sub_(new_max[:, None]).exp_().sum(1)
            run_max = new_max
        chunk_lse = run_max + torch.log(run_sum)
        chunk_loss = chunk_lse - (1.0 - label_smoothing) * target_logit
        if label_smoothing:
            chunk_loss = chunk_loss - (label_smoothing / vocab) * logit_sum
        valid = t != ignore_index
        out_of_range = valid & ((t < 0) | (t >= vocab))
        chunk_loss = torch.where(valid, chunk_loss, torch.zeros_like(chunk_loss))
        loss[n0:n1] = torch.where(out_of_range, torch.full_like(chunk_loss, float("nan")), chunk_loss).float()
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
    times sech^2(u / cap) under a softcap; dE = dz @ C, dC = dz^T @ E, dbias = sum_n dz.
    The gradients are contiguous, in the dtypes of e, c and bias."""
    vocab, dtype = c.shape[0], _compute_dtype(e.dtype)
    coef_loss, coef_p, safe_targets = _token_coefficients(targets, grad_loss, grad_lse, ignore_index, vocab, dtype)
    lse = lse.to(dtype)

    def logit_grad(e_rows, c_chunk, b_chunk, v0, v1, rows):
        return _logit_grad(e_rows, c_chunk, b_chunk, v0, vocab, softcap, label_smoothing, lse[rows],
                           coef_loss[rows], coef_p[rows], safe_targets[rows])

    return chunked_gradients(e, c, bias, logit_grad, needs_e, needs_c, needs_bias)


def chunked_gradients(e: Tensor, c: Tensor, bias: Tensor | None, logit_grad, needs_e: bool, needs_c: bool,
                      needs_bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """dE = G @ C, dC = G^T @ E, dbias = sum_n G (None where not needed) for a logits' gradient G
    formed block by block: ``logit_grad(e_rows, c_chunk, b_chunk, v0, v1, rows)`` returns the block
    of G for the tokens ``rows`` (a slice) and the vocabulary [v0, v1), with e_rows and c_chunk
    already in the compute dtype. The gradients are contiguous, in the dtypes of e, c and bias."""
    num_tokens, vocab = e.shape[0], c.shape[0]
    acc = dict(dtype=_compute_dtype(e.dtype), device=e.device)
    # The vocabulary is the outer loop so that each chunk of dC is finished before the next starts:
    # the accumulators are one vocab chunk of dC plus dE (N x D), never V x D.
    de = torch.zeros(e.shape, **acc) if needs_e else None
    # Contiguous whatever the inputs' strides (the op's fakes promise it; empty_like would keep the
    # strides of a transposed c, e.g. W.t() of a weight stored (D, V)).
    dc = c.new_empty(c.shape) if needs_c else None
    dbias = bias.new_empty(bias.shape) if needs_bias else None
    for v0, v1 in _chunks(vocab, _vocab_chunk(min(num_tokens, TOKEN_CHUNK), vocab)):
        c_chunk = c[v0:v1].to(acc["dtype"])
        b_chunk = None if bias is None else bias[v0:v1]
        dc_chunk = torch.zeros(v1 - v0, c.shape[1], **acc) if needs_c else None
        db_chunk = torch.zeros(v1 - v0, **acc) if needs_bias else None
        for n0, n1 in _chunks(num_tokens, TOKEN_CHUNK):
            e_rows = e[n0:n1].to(acc["dtype"])
            g = logit_grad(e_rows, c_chunk, b_chunk, v0, v1, slice(n0, n1))
            if needs_e:
                de[n0:n1] += g @ c_chunk
            if needs_c:
                dc_chunk += g.T @ e_rows
            if needs_bias:
                db_chunk += g.sum(0)
        if needs_c:
            dc[v0:v1] = dc_chunk
        if needs_bias:
            dbias[v0:v1] = db_chunk
    return (de.to(e.dtype) if needs_e else None), dc, dbias


def filtered_backward(
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
    eps: float,
    tile_n: int,
    tile_v: int,
    dc_filter: str,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The kernels' gradient filter, written plainly (float64, the full N x V dz: small inputs only;
    the kernels' fast paths are tested against it). Tiles of tile_n tokens x tile_v vocabulary ids,
    from 0 in both. A tile is skipped iff for every token i of it
        sum_{j in tile} |dz_ij| < (eps / V) * |tile| * (|g_i + grad_lse_i| + |g_i|),
    |tile| = its number of vocabulary ids (fewer at the last), g_i = grad_loss_i (0 where ignored).
    A skipped tile is dropped from dE. dC by ``dc_filter``: "exact" (nothing dropped), "dropped" (as
    dE), or "corrected" (dropped, and replaced by the rank-1 term colsum_i(dz)^T mean_i(E) of the
    tile: its column sums of dz times the mean of its rows of E). dbias is never filtered.
    Returns (dE, dC, dbias or None, keep), float64, keep a bool (token tiles, vocab tiles) tensor."""
    if dc_filter not in ("exact", "dropped", "corrected"):
        raise ValueError(f"dc_filter must be 'exact', 'dropped' or 'corrected', got {dc_filter!r}")
    f64 = torch.float64
    num_tokens, vocab = e.shape[0], c.shape[0]
    e64, c64 = e.to(f64), c.to(f64)
    g_loss, g_p, safe = _token_coefficients(targets, grad_loss, grad_lse, ignore_index, vocab, f64)
    dz = _logit_grad(e64, c64, None if bias is None else bias.to(f64), 0, vocab, softcap, label_smoothing,
                     lse.to(f64), g_loss, g_p, safe)

    tiles_n, tiles_v = -(-num_tokens // tile_n), -(-vocab // tile_v)
    keep = torch.zeros(tiles_n, tiles_v, dtype=torch.bool, device=e.device)
    scale = g_p.abs() + g_loss.abs()
    for a in range(tiles_n):
        rows = slice(a * tile_n, (a + 1) * tile_n)
        for b in range(tiles_v):
            cols = slice(b * tile_v, (b + 1) * tile_v)
            mass = dz[rows, cols].abs().sum(1)
            width = min(tile_v, vocab - b * tile_v)
            keep[a, b] = bool(((mass >= eps / vocab * width * scale[rows]) & (mass > 0)).any())

    mask = keep.repeat_interleave(tile_n, 0)[:num_tokens].repeat_interleave(tile_v, 1)[:, :vocab]
    kept = torch.where(mask, dz, torch.zeros((), dtype=f64, device=e.device))
    de = kept @ c64
    dc = (dz if dc_filter == "exact" else kept).T @ e64
    if dc_filter == "corrected":
        for a in range(tiles_n):
            rows = slice(a * tile_n, (a + 1) * tile_n)
            skipped_colsums = (dz[rows] - kept[rows]).sum(0)  # [V]: zero in the kept tiles
            dc += skipped_colsums[:, None] * e64[rows].mean(0)[None, :]
    dbias = dz.sum(0) if bias is not None else None
    return de, dc, dbias, keep

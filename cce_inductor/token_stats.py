"""Per-token statistics of a linear classifier's softmax -- log-probability of a given token, entropy,
arg-max, log-sum-exp -- with their gradients, never holding the N x V logits.

For token i with logits z_i = (e_i @ c.T + bias), softcapped (cap * tanh(z / cap)) where asked, then
divided by a temperature, and p_i = softmax(z_i):
    logprob_i = z_iy - lse_i                (y = targets_i; 0 where y == ignore_index)
    entropy_i = -sum_j p_ij log p_ij = lse_i - S_i,   S_i = sum_j p_ij z_ij
    argmax_i  = the first j with the largest z_ij (as torch.argmax); no gradient
    lse_i     = log sum_j exp z_ij
Their gradients w.r.t. the logits, formed together in one recompute of the logits (of those not kept
from the forward: ``max_workspace_bytes``):
    dz_ij = g_lp_i (onehot_ij - p_ij) + g_H_i p_ij (S_i - z_ij) + g_lse_i p_ij
          = g_lp_i onehot_ij + p_ij (g_lse_i - g_lp_i + g_H_i ((lse_i - z_ij) - H_i))
then times 1 / temperature, and under a softcap times 1 - tanh^2; dE = dz @ C, dC = dz^T @ E, dbias = sum_i dz.

Layers, bottom up (as ``ops.py``):
  ``naive_token_stats``  the definition: the full logits in float64 (tests and benchmarks only)
  ``chunked_stats_forward`` / ``chunked_stats_backward``  the torch path: the vocabulary walked in
      chunks with an online log-sum-exp (bounded memory; float64 accumulation for float32 inputs)
  ``kernels/token_stats.py``  the Triton path (CUDA; the CPU under TRITON_INTERPRET=1)
  ``kernels/token_stats_workspace.py``  its ``max_workspace_bytes`` mode: the first tokens' logits
      kept from the forward, the backward recomputing only the rest
  ``cce_inductor::token_stats_forward`` / ``token_stats_backward``  the torch.library custom ops
  ``linear_token_stats``  the public function: validation, temperature, shift, reshaping

The entropy is accumulated relative to the running max m: with s = sum_j exp(z_j - m) and
T = sum_j exp(z_j - m) (z_j - m) <= 0, H = log s - T / s, a sum of two non-negative terms: no
cancellation for a peaked softmax (lse - S would lose the entropy to the rounding of lse).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from .reference import TOKEN_CHUNK, _chunks, _compute_dtype, _logits, _vocab_chunk, chunked_gradients



class TokenStats(NamedTuple):
    """What ``linear_token_stats`` returns; the fields not asked for are None."""

    logprob: Tensor | None  # float32, differentiable
    entropy: Tensor | None  # float32, differentiable
    argmax: Tensor | None  # int64, no gradient
    lse: Tensor | None  # float32, differentiable


# ----------------------------------------------------------------------------- the definition


def naive_token_stats(
    e: Tensor,
    c: Tensor,
    targets: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float | Tensor | None = None,
    shift: int = 0,
    compute_dtype: torch.dtype = torch.float64,
) -> TokenStats:
    """The definition, written plainly: the full logits in ``compute_dtype``, every field computed."""
    if shift:
        e = e[..., :-shift, :]
        targets = None if targets is None else targets[..., shift:]
        if isinstance(temperature, Tensor) and temperature.dim() >= 2 and temperature.shape[-2] > 1:
            temperature = temperature[..., :-shift, :]  # one per token
    z = e.to(compute_dtype) @ c.to(compute_dtype).T
    if bias is not None:
        z = z + bias.to(compute_dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature is not None:
        z = z / (temperature.to(compute_dtype) if isinstance(temperature, Tensor) else temperature)
    logp = torch.log_softmax(z, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    logprob = None
    if targets is not None:
        valid = targets != ignore_index
        picked = logp.gather(-1, torch.where(valid, targets, 0).long()[..., None])[..., 0]
        logprob = torch.where(valid, picked, torch.zeros((), dtype=picked.dtype))
    return TokenStats(logprob, entropy, z.argmax(-1), torch.logsumexp(z, dim=-1))


# ----------------------------------------------------------------------------- the torch path


def _argmax_view(z: Tensor, dtype: torch.dtype) -> Tensor:
    """The logits the arg-max is taken over: for 16-bit inputs rounded to their dtype, as eager's
    logits are (F.linear returns them in it), so that ties are broken as eager breaks them."""
    return z if dtype in (torch.float32, torch.float64) else z.to(dtype)


def chunked_stats_forward(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor | None,
    ignore_index: int,
    softcap: float,
    inv_temp: float,
    want_logprob: bool,
    want_entropy: bool,
    want_argmax: bool,
    want_variance: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor, Tensor | None]:
    """(logprob float32, entropy, argmax int64, lse, variance) of flattened inputs (e (N, D), targets
    (N,)); entropy, lse and variance (of z under p: sum_j p_j (z_j - S)^2, which a learnable
    temperature's gradient needs) in the compute dtype (float64 for float32 inputs); None for what is
    not wanted. logprob is 0 where the target is ignore_index and NaN where it is outside [0, V)."""
    num_tokens, vocab = e.shape[0], c.shape[0]
    acc = dict(dtype=_compute_dtype(e.dtype), device=e.device)
    lse = torch.empty(num_tokens, **acc)
    logprob = torch.empty(num_tokens, dtype=torch.float32, device=e.device) if want_logprob else None
    entropy = torch.empty(num_tokens, **acc) if want_entropy else None
    argmax = torch.empty(num_tokens, dtype=torch.int64, device=e.device) if want_argmax else None
    variance = torch.empty(num_tokens, **acc) if want_variance else None
    moments = want_entropy or want_variance
    for n0, n1 in _chunks(num_tokens, TOKEN_CHUNK):
        n = n1 - n0
        e_chunk = e[n0:n1].to(acc["dtype"])
        t = targets[n0:n1] if want_logprob else None
        run_max = torch.full((n,), float("-inf"), **acc)
        run_sum = torch.zeros(n, **acc)
        run_t = torch.zeros(n, **acc)  # sum exp(z - run_max) (z - run_max)
        run_q = torch.zeros(n, **acc)  # sum exp(z - run_max) (z - run_max)^2
        target_logit = torch.zeros(n, **acc)
        best = torch.full((n,), float("-inf"), **acc)
        best_id = torch.zeros(n, dtype=torch.int64, device=e.device)
        for v0, v1 in _chunks(vocab, _vocab_chunk(n, vocab)):
            z, _ = _logits(e_chunk, c[v0:v1].to(acc["dtype"]), None if bias is None else bias[v0:v1], softcap)
            if inv_temp != 1.0:
                z.mul_(inv_temp)
            if want_logprob:  # from the same matmul as the log-sum-exp (see reference.chunked_forward)
                in_chunk = (t >= v0) & (t < v1)
                local = (t - v0).clamp(0, v1 - v0 - 1)
                target_logit = torch.where(in_chunk, z.gather(1, local[:, None])[:, 0], target_logit)
            if want_argmax:  # strictly greater: an earlier chunk keeps a tie (the first index wins)
                zr = _argmax_view(z, e.dtype)
                chunk_id = zr.argmax(dim=1)
                chunk_best = zr.gather(1, chunk_id[:, None])[:, 0].to(acc["dtype"])
                better = chunk_best > best
                best = torch.where(better, chunk_best, best)
                best_id = torch.where(better, chunk_id + v0, best_id)
            new_max = torch.maximum(run_max, z.amax(dim=1))
            alpha = torch.exp(run_max - new_max)  # 0 at the first chunk (run_max = -inf)
            if moments:  # re-base the running moments on the new max; at the first chunk run_sum = 0
                delta = torch.where(run_sum > 0, run_max - new_max, torch.zeros_like(new_max))
                if want_variance:  # (x + delta)^2 = x^2 + 2 delta x + delta^2, with the old t
                    run_q = alpha * (run_q + 2.0 * delta * run_t + delta * delta * run_sum)
                run_t = alpha * (run_t + delta * run_sum)
            z.sub_(new_max[:, None])  # z - m, in place on the chunk's logits
            p = torch.exp(z)
            run_sum = run_sum * alpha + p.sum(1)
            if moments:
                pz = p.mul_(z)
                run_t = run_t + pz.sum(1)
                if want_variance:
                    run_q = run_q + pz.mul_(z).sum(1)
            run_max = new_max
        log_sum = torch.log(run_sum)
        lse[n0:n1] = run_max + log_sum
        if want_entropy:
            entropy[n0:n1] = log_sum - run_t / run_sum
        if want_variance:  # E[(z - m)^2] - E[z - m]^2
            mean = run_t / run_sum
            variance[n0:n1] = (run_q / run_sum - mean * mean).clamp_min(0.0)
        if want_argmax:
            argmax[n0:n1] = best_id
        if want_logprob:
            lp = target_logit - lse[n0:n1]
            valid = t != ignore_index
            out_of_range = valid & ((t < 0) | (t >= vocab))
            lp = torch.where(valid, lp, torch.zeros_like(lp))
            logprob[n0:n1] = torch.where(out_of_range, torch.full_like(lp, float("nan")), lp).float()
    return logprob, entropy, argmax, lse, variance


def _stat_coefficients(targets, lse, entropy, grad_logprob, grad_entropy, grad_lse, ignore_index, vocab, dtype):
    """Per token, in ``dtype``: g_lp (0 where ignored or no logprob), a = g_lse - g_lp, g_H (0
    without entropy), the clamped target (or None) -- dz = g_lp onehot + p (a + g_H ((lse - z) - H))."""
    zeros = torch.zeros_like(lse, dtype=dtype)
    g_lp, safe = zeros, None
    if grad_logprob is not None and targets is not None:
        valid = targets != ignore_index
        g_lp = torch.where(valid, grad_logprob.to(dtype), zeros)
        safe = torch.where(valid, targets, torch.zeros_like(targets)).clamp(0, vocab - 1)
    g_h = zeros if grad_entropy is None else grad_entropy.to(dtype)
    a = (zeros if grad_lse is None else grad_lse.to(dtype)) - g_lp
    h = zeros if entropy is None or grad_entropy is None else entropy.to(dtype)
    return g_lp, a, g_h, h, safe


def chunked_stats_backward(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor | None,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logprob: Tensor | None,
    grad_entropy: Tensor | None,
    grad_lse: Tensor | None,
    ignore_index: int,
    softcap: float,
    inv_temp: float,
    needs_e: bool,
    needs_c: bool,
    needs_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of sum(g_lp * logprob + g_H * entropy + g_lse * lse) w.r.t. e, c, bias (None where
    not needed; a missing upstream gradient counts as 0), from the forward's lse and entropy; the
    vocabulary is the outer loop (``reference.chunked_gradients``). Contiguous, in the inputs'
    dtypes."""
    vocab = c.shape[0]
    dtype = _compute_dtype(e.dtype)
    lse = lse.to(dtype)
    g_lp, a, g_h, h, safe = _stat_coefficients(targets, lse, entropy, grad_logprob, grad_entropy, grad_lse,
                                               ignore_index, vocab, dtype)
    with_entropy = grad_entropy is not None

    def logit_grad(e_rows, c_chunk, b_chunk, v0, v1, rows):
        z, dcap = _logits(e_rows, c_chunk, b_chunk, softcap)
        if inv_temp != 1.0:
            z.mul_(inv_temp)
        gap = z.neg_().add_(lse[rows, None])  # lse - z >= 0, in place
        g = torch.exp(-gap)  # p
        if with_entropy:
            g.mul_(a[rows, None] + g_h[rows, None] * (gap - h[rows, None]))
        else:
            g.mul_(a[rows, None])
        if safe is not None:
            t = safe[rows]
            in_chunk = (t >= v0) & (t < v1)
            onehot = torch.where(in_chunk, g_lp[rows], torch.zeros_like(g_lp[rows]))
            g.scatter_add_(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None], onehot[:, None])
        if inv_temp != 1.0:
            g.mul_(inv_temp)
        if softcap:
            g.mul_(dcap)
        return g

    return chunked_gradients(e, c, bias, logit_grad, needs_e, needs_c, needs_bias)


# ----------------------------------------------------------------------------- custom ops


def stat_dtype(dtype: torch.dtype, impl: str) -> torch.dtype:
    """The dtype of the forward op's entropy and lse: float64 for float32 inputs on the torch path
    (as ``ops.lse_dtype``: that path is the accuracy reference), else float32."""
    return ops.lse_dtype(dtype, impl)


def _triton_stats():
    from .kernels import token_stats as kernels

    return kernels


def _triton_stats_workspace():
    from .kernels import token_stats_workspace as kernels

    return kernels


@torch.library.custom_op("cce_inductor::token_stats_forward", mutates_args=())
def token_stats_forward(
    e: Tensor,
    c: Tensor,
    targets: Tensor | None,
    bias: Tensor | None,
    ignore_index: int,
    softcap: float,
    inv_temp: float,
    logprob: bool,
    entropy: bool,
    argmax: bool,
    variance: bool,
    impl: str,
    max_workspace_bytes: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """e (N, D), c (V, D), targets (N,) int64 or None (needed with ``logprob``), bias (V,) or None;
    softcap 0 means none; the logits are multiplied by ``inv_temp`` after the softcap.
    Returns (logprob (N,) float32, entropy (N,), argmax (N,) int64, lse (N,), variance (N,), kept);
    entropy, lse and variance (of the logits under the softmax; not differentiable: a learnable
    temperature's gradient coefficient) in ``stat_dtype(e.dtype, impl)``; an empty tensor (of the same
    dtype) for each of logprob, entropy, argmax and variance not asked for. ``kept``: the logits of the
    first ``num_kept(...)`` tokens (K, V) in e's dtype, for the backward (``max_workspace_bytes``: 0
    none, ``ops._AUTO`` "auto", else a budget in bytes; Triton, bfloat16 and float32 only; see
    ``kernels/token_stats_workspace.py``). Targets are checked as ``ops.lce_forward`` checks them."""
    k = num_kept(e, c, bias, impl, max_workspace_bytes)
    with ops._on_device_of(e):
        if logprob:
            ops._check_targets(targets, c.shape[0], ignore_index)
        if k:
            out = _triton_stats_workspace().stats_forward_kept(e, c, bias, targets, ignore_index, softcap, inv_temp,
                                                               logprob, entropy, argmax, variance, k)
        elif impl == "triton":
            out = (*_triton_stats().stats_forward(e, c, bias, targets, ignore_index, softcap, inv_temp, logprob,
                                                  entropy, argmax, variance), None)
        else:
            out = (*chunked_stats_forward(e, c, bias, targets, ignore_index, softcap, inv_temp, logprob, entropy,
                                          argmax, variance), None)
    lp, h, am, lse, var, kept = out
    sd = stat_dtype(e.dtype, impl)
    return (
        e.new_empty(0, dtype=torch.float32) if lp is None else lp.contiguous(),
        e.new_empty(0, dtype=sd) if h is None else h.contiguous(),
        e.new_empty(0, dtype=torch.int64) if am is None else am.contiguous(),
        lse.contiguous(),
        e.new_empty(0, dtype=sd) if var is None else var.contiguous(),
        e.new_empty(0, c.shape[0]) if kept is None else kept,
    )


@token_stats_forward.register_fake
def _(e, c, targets, bias, ignore_index, softcap, inv_temp, logprob, entropy, argmax, variance, impl,
      max_workspace_bytes=0):
    n, sd = e.shape[0], stat_dtype(e.dtype, impl)
    return (
        e.new_empty(n if logprob else 0, dtype=torch.float32),
        e.new_empty(n if entropy else 0, dtype=sd),
        e.new_empty(n if argmax else 0, dtype=torch.int64),
        e.new_empty(n, dtype=sd),
        e.new_empty(n if variance else 0, dtype=sd),
        e.new_empty(num_kept(e, c, bias, impl, max_workspace_bytes), c.shape[0]),
    )


def num_kept(e: Tensor, c: Tensor, bias: Tensor | None, impl: str, max_workspace_bytes: int):
    """The tokens whose logits ``token_stats_forward`` keeps for the backward (a SymInt under fake
    tensors): ``kernels/token_stats_workspace.kept_rows`` on the Triton path for bfloat16 and float32
    inputs of one dtype (the dtype the op computes in: autocast may have cast them), else 0."""
    one_dtype = c.dtype == e.dtype and (bias is None or bias.dtype == e.dtype)
    if not max_workspace_bytes or impl != "triton" or e.dtype not in (torch.bfloat16, torch.float32) \
            or not one_dtype:
        return 0
    return _triton_stats_workspace().kept_rows(e.shape[0], c.shape[0], e.element_size(), max_workspace_bytes,
                                               ops._device_memory(e.device))


@torch.library.custom_op("cce_inductor::token_stats_backward", mutates_args=())
def token_stats_backward(
    e: Tensor,
    c: Tensor,
    targets: Tensor | None,
    bias: Tensor | None,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logprob: Tensor | None,
    grad_entropy: Tensor | None,
    grad_lse: Tensor | None,
    ignore_index: int,
    softcap: float,
    inv_temp: float,
    impl: str,
    needs_e: bool,
    needs_c: bool,
    needs_bias: bool,
    kept: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_logprob * logprob + grad_entropy * entropy + grad_lse * lse) w.r.t. e, c,
    bias in one recompute of the logits not kept (a None upstream gradient: that output gets none; entropy is
    the forward's, needed with grad_entropy); an empty tensor for each gradient not needed. ``kept``:
    the forward's kept logits; with rows, the backward of ``kernels/token_stats_workspace.py``
    (which recomputes lse and entropy from them, and does not modify them)."""
    needs_bias = needs_bias and bias is not None
    with ops._on_device_of(e):
        if kept is not None and kept.shape[0] > 0:
            g_lp, a, g_h, _, _ = _stat_coefficients(targets, lse, entropy, grad_logprob, grad_entropy, grad_lse,
                                                   ignore_index, c.shape[0], torch.float32)
            grads = _triton_stats_workspace().stats_backward_kept(
                e, c, bias, targets, kept, g_lp if grad_logprob is not None and targets is not None else None, a,
                g_h if grad_entropy is not None else None, ignore_index, softcap, inv_temp, needs_e, needs_c,
                needs_bias)
        elif impl == "triton":
            grads = _triton_stats().stats_backward(e, c, bias, targets, lse, entropy, grad_logprob, grad_entropy,
                                                   grad_lse, ignore_index, softcap, inv_temp, needs_e, needs_c,
                                                   needs_bias)
        else:
            grads = chunked_stats_backward(e, c, bias, targets, lse, entropy, grad_logprob, grad_entropy, grad_lse,
                                           ignore_index, softcap, inv_temp, needs_e, needs_c, needs_bias)
    return tuple(ops._dense(g, e) for g in grads)


@token_stats_backward.register_fake
def _(e, c, targets, bias, lse, entropy, grad_logprob, grad_entropy, grad_lse, ignore_index, softcap, inv_temp,
      impl, needs_e, needs_c, needs_bias, kept=None):
    return (
        ops._dense_like(e) if needs_e else e.new_empty(0),
        ops._dense_like(c) if needs_c else e.new_empty(0),
        ops._dense_like(bias) if (needs_bias and bias is not None) else e.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    e, c, targets, bias, ignore_index, softcap, inv_temp, logprob, entropy, argmax, variance, impl = inputs[:12]
    _, h, am, lse, var, kept = output
    ctx.mark_non_differentiable(am, var, kept)
    # an unused output's gradient stays None: materialized, the kept logits' would be K x V zeros
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(e, c, targets, bias, lse, h, kept)
    ctx.options = (ignore_index, softcap, inv_temp, impl)
    ctx.outputs = (logprob, entropy)


def _grad_or_none(grad: Tensor | None, like: Tensor) -> Tensor | None:
    """An upstream gradient made dense in ``like``'s dtype (a sum's arrives expanded, stride 0)."""
    return None if grad is None else grad.to(like.dtype).contiguous()


def _backward(ctx, grad_logprob, grad_entropy, _grad_argmax, grad_lse, _grad_variance, _grad_kept):
    e, c, targets, bias, lse, h, kept = ctx.saved_tensors
    want_logprob, want_entropy = ctx.outputs
    grad_logprob = _grad_or_none(grad_logprob, lse) if want_logprob else None
    grad_entropy = _grad_or_none(grad_entropy, lse) if want_entropy else None
    grad_lse = _grad_or_none(grad_lse, lse)
    needs_e, needs_c, _, needs_bias = ctx.needs_input_grad[:4]
    if grad_logprob is None and grad_entropy is None and grad_lse is None:
        grads = (None, None, None)
    else:
        grads = token_stats_backward(e, c, targets, bias, lse, h if want_entropy else None, grad_logprob,
                                     grad_entropy, grad_lse, *ctx.options, needs_e, needs_c, needs_bias, kept)
    de, dc, dbias = grads
    return (
        de if needs_e else None,
        dc if needs_c else None,
        None,
        dbias if needs_bias else None,
        None, None, None, None, None, None, None, None, None,
    )


token_stats_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "cce_inductor.linear_token_stats does not support double backward (create_graph=True through its "
        "outputs); compute the statistics from plain F.linear logits for that."
    )


token_stats_backward.register_autograd(_no_double_backward, setup_context=ops._setup_nothing)

for _device_type in ("cpu", "cuda"):
    ops._register_autocast(token_stats_forward, _device_type)
    ops._register_autocast(token_stats_backward, _device_type, cast=False)  # its inputs are the forward's


# ----------------------------------------------------------------------------- public function


def describe_mode(num_tokens: int | None, vocab: int, dtype: torch.dtype, device: torch.device, grads: bool,
                  impl: str = "auto", max_workspace_bytes=None) -> str:
    """How ``linear_token_stats`` computes statistics of this shape, in words (explain());
    ``num_tokens`` None: unknown (dynamic)."""
    impl = ops.resolve_impl(impl, device)
    if impl == "torch":
        return "torch path (chunked over the vocabulary)"
    if not grads:
        return "fused forward (no gradient), O(N + V) memory"
    budget = _workspace_budget(max_workspace_bytes)
    auto = " (auto)" if budget == ops._AUTO else ""
    if budget and dtype in (torch.bfloat16, torch.float32):
        if num_tokens is None:
            return f"kept logits{auto}: the first tokens' logits kept for the backward, chosen per call"
        kept = _triton_stats_workspace().kept_rows(num_tokens, vocab, dtype.itemsize, budget,
                                                   ops._device_memory(device))
        if kept:
            return (f"kept logits{auto}: {kept} of {num_tokens} tokens' logits "
                    f"({kept * vocab * dtype.itemsize / 1e6:.1f} MB) kept for the backward, which recomputes "
                    f"the rest in chunks of {kept} tokens")
    return "fused forward, one fused recompute in the backward, O(N + V) memory"


def _workspace_budget(max_workspace_bytes) -> int:
    """The op's encoding of ``max_workspace_bytes``: 0 none, ``ops._AUTO``, or a number of bytes."""
    if max_workspace_bytes == "auto":
        return ops._AUTO
    return int(max_workspace_bytes or 0)


def _check_inputs(e, c, targets, bias, ignore_index, softcap, temperature, shift, wants, impl, max_workspace_bytes):
    ops.check_operands(e, c, targets, bias, ignore_index, shift, impl, targets_are="token ids")
    if not (max_workspace_bytes is None or max_workspace_bytes == "auto" or (
            isinstance(max_workspace_bytes, int) and not isinstance(max_workspace_bytes, bool)
            and max_workspace_bytes >= 0)):
        raise ValueError(f'max_workspace_bytes must be None, "auto" or an int >= 0, got {max_workspace_bytes!r}')
    if c.shape[0] == 0:
        raise ValueError("the vocabulary is empty (c has 0 rows)")
    for name, want in zip(("logprob", "entropy", "argmax", "lse"), wants):
        if not isinstance(want, bool):
            raise TypeError(f"{name} must be a bool, got {want!r}")
    if not any(wants):
        raise ValueError("ask for at least one of logprob, entropy, argmax, lse")
    if targets is None and wants[0]:
        raise ValueError("logprob=True needs targets (the token ids whose log-probabilities to return)")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap must be None or a number > 0, got {softcap!r}")
    if isinstance(temperature, Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"a temperature tensor must be floating point, got {temperature.dtype}")
        if temperature.device != e.device and temperature.dim() > 0:
            raise ValueError(f"the temperature must be on e's device {e.device} (or 0-dim), got {temperature.device}")
    elif temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                      or not temperature > 0):
        raise ValueError(f"temperature must be None, a number > 0 or a tensor, got {temperature!r}")


def _apply_tensor_temperature(e: Tensor, bias: Tensor | None, temperature: Tensor, softcap):
    """z / T as (e / T) @ c.T + bias / T: exact, and autograd carries T's gradient through the two
    divisions. T: 0-dim (or one element), or one per token (shaped like e's leading dims with a
    trailing 1, broadcastable to them)."""
    if softcap is not None:
        raise NotImplementedError(
            "linear_token_stats: a tensor temperature with a softcap is not supported (cap * tanh(z / cap) / T "
            "does not fold into e / T); pass the temperature as a Python number, or apply it outside"
        )
    if temperature.numel() == 1:
        t = temperature.reshape(())
    else:
        if temperature.dim() == 0 or temperature.shape[-1] != 1 \
                or torch.broadcast_shapes(temperature.shape, e.shape[:-1] + (1,)) != e.shape[:-1] + (1,):
            raise ValueError(
                f"a temperature tensor must have one element or one per token (shape {tuple(e.shape[:-1]) + (1,)} "
                f"or broadcastable to it), got {tuple(temperature.shape)}"
            )
        if bias is not None:
            raise NotImplementedError("linear_token_stats: a per-token temperature with a bias is not supported "
                                      "(bias / T would be N x V); use a 0-dim temperature")
        t = temperature
    scaled_e = e / t
    if scaled_e.dtype != e.dtype:  # a float32 per-token T would promote 16-bit e
        scaled_e = scaled_e.to(e.dtype)
    scaled_bias = None if bias is None else (bias / t).to(bias.dtype)
    return scaled_e, scaled_bias


def linear_token_stats(
    e: Tensor,
    c: Tensor,
    targets: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float | Tensor | None = None,
    shift: int = 0,
    logprob: bool = True,
    entropy: bool = False,
    argmax: bool = False,
    lse: bool = False,
    impl: str = "auto",
    max_workspace_bytes: int | str | None = None,
) -> TokenStats:
    """Per-token statistics of softmax(z), z = e @ c.T + bias (softcapped, then divided by the
    temperature), computed without the N x V logits, in one pass over the vocabulary (and one
    recompute, of the logits not kept from the forward, for all the gradients).

    Equals, with ``logits = z`` materialized: ``logprob = log_softmax(z).gather(-1, targets)`` (0
    where targets == ignore_index), ``entropy = -(softmax(z) * log_softmax(z)).sum(-1)``,
    ``argmax = z.argmax(-1)``, ``lse = z.logsumexp(-1)``.

    Args:
        e: hidden states (..., D); float32, bfloat16 or float16. c: classifier (V, D), e's dtype.
            Any strides. Under ``torch.autocast`` the op computes in the autocast dtype.
        targets: token ids shaped like e's leading dims, any integer dtype; needed with
            ``logprob``. A target outside [0, V) that is not ignore_index is an error (as
            ``ops.linear_cross_entropy``: raised on the CPU, a device-side assert on a GPU).
        bias: optional (V,).
        softcap: ``cap * tanh(z / cap)`` before the temperature; None for none.
        temperature: None, a number > 0, or a tensor (e.g. a learnable one; gradients flow to it):
            one element, or one per token (shaped like e's leading dims with a trailing 1, and then no
            bias). A number is applied inside the op (any softcap); a tensor as (e / T) and
            (bias / T) before it, which is exact -- not supported with a softcap (NotImplementedError).
            A tensor that requires grad gets its gradient from per-token float32 statistics of the
            same pass (the entropy, and the logits' variance under the softmax where the entropy is
            asked for), not from the 16-bit dE (``_temperature_gradient``).
        shift: pair e[..., t, :] with targets[..., t + shift] (the causal-LM shift) without copying
            e; every returned field then covers the first T - shift positions of the token dim.
        logprob, entropy, argmax, lse: which fields to compute; at least one.
        impl: "triton", "torch" (chunked pure torch) or "auto" (Triton for CUDA tensors).
        max_workspace_bytes: where a gradient is to be formed (Triton path, bfloat16 or float32):
            ``"auto"`` (the backend's default) keeps the logits of half of the tokens (at
            most 1/32 of the GPU's memory) from the forward for the backward, which then recomputes
            only the rest, through a buffer of the same size (cuBLAS logits and a row kernel:
            ``kernels/token_stats_workspace.py``); an int keeps as many rows as fit in that many
            bytes, at most half the tokens (none below 128 rows); None or 0 (the default): the
            minimum memory, O(N + V), one fused recompute of every logit in the backward. Kept
            logits live as long as the outputs' autograd graph, backward or not: compute
            statistics that are not differentiated (e.g. a reference policy's) under no_grad.

    Returns:
        ``TokenStats(logprob, entropy, argmax, lse)``, each shaped like the (shifted) targets, None
        where not asked for: logprob, entropy and lse float32 and differentiable w.r.t. e, c, bias
        (and a tensor temperature); argmax int64 -- over the logits rounded to e's dtype for 16-bit
        inputs, as eager's logits are, ties to the first index.
    """
    wants = (logprob, entropy, argmax, lse)
    _check_inputs(e, c, targets, bias, ignore_index, softcap, temperature, shift, wants, impl, max_workspace_bytes)
    impl = ops.resolve_impl(impl, e.device)
    inv_temp = 1.0
    learnable = isinstance(temperature, Tensor) and temperature.requires_grad and torch.is_grad_enabled()
    if isinstance(temperature, Tensor):
        # a learnable temperature's gradient comes from per-token statistics (_temperature_gradient),
        # not through e / T: that would form it from the op's dE in e's dtype, where it cancels
        e, bias = _apply_tensor_temperature(e, bias, temperature.detach() if learnable else temperature, softcap)
    elif temperature is not None:
        inv_temp = 1.0 / float(temperature)

    flat_targets = None
    if targets is not None and logprob:
        aligned = targets.long()  # int64 before padding (see ops.linear_cross_entropy)
        if shift:
            pad = aligned.new_full((*targets.shape[:-1], shift), ignore_index)
            aligned = torch.cat([aligned[..., shift:], pad], dim=-1)
        flat_targets = aligned.reshape(-1)
    e2d = e.reshape(-1, e.shape[-1])
    with_h = entropy or (learnable and (logprob or lse))  # the temperature's coefficients need H
    grads = torch.is_grad_enabled() and (logprob or entropy or lse) and any(
        t is not None and t.requires_grad for t in (e, c, bias))
    budget = _workspace_budget(max_workspace_bytes) if grads else 0
    lp, h, am, out_lse, var, _ = token_stats_forward(e2d, c, flat_targets, bias, ignore_index, float(softcap or 0.0),
                                                     inv_temp, logprob, with_h, argmax, learnable and entropy, impl,
                                                     budget)
    shape = e.shape[:-1]
    out = TokenStats(
        ops._unshift(lp, shape, shift) if logprob else None,
        ops._unshift(h.float(), shape, shift) if entropy else None,
        ops._unshift(am, shape, shift) if argmax else None,
        ops._unshift(out_lse.float(), shape, shift) if lse else None,
    )
    if not learnable:
        return out
    unshift = lambda t: ops._unshift(t.float(), shape, shift)  # noqa: E731
    valid = None if flat_targets is None else ops._unshift(flat_targets != ignore_index, shape, shift)
    return _temperature_gradient(out, temperature, unshift(h), unshift(out_lse),
                                 unshift(var) if entropy else None, valid, shape, shift)


def _temperature_gradient(out: TokenStats, temperature: Tensor, h: Tensor, lse: Tensor, var: Tensor | None,
                          valid: Tensor | None, shape, shift: int) -> TokenStats:
    """The outputs, unchanged in value, carrying their exact gradient w.r.t. a learnable temperature T
    (the op ran on e / T.detach()). With z' = z / T, S = sum_j p_j z'_j = lse - H:
        d lse / dT = -S / T,   d logprob / dT = -(z'_y - S) / T = -(logprob + H) / T,
        d H / dT = Var_p(z') / T,
    from per-token float32 statistics of the same pass (no N x V term), each added as
    (T - T.detach()) / T.detach() * coefficient -- zero in value, the coefficient / T in gradient."""
    t = temperature.reshape(()) if temperature.numel() == 1 else temperature.squeeze(-1)
    if shift and t.dim():
        t = t.expand(shape)[..., : shape[-1] - shift]
    rate = (t - t.detach()) / t.detach()  # 0, with d/dT = 1 / T
    logprob, entropy, argmax, out_lse = out
    if logprob is not None:  # 0 (a constant) at ignored targets: no gradient there
        logprob = logprob - rate * torch.where(valid, logprob + h, torch.zeros_like(h)).detach()
    if out_lse is not None:
        out_lse = out_lse - rate * (lse - h).detach()
    if entropy is not None:
        entropy = entropy + rate * var.detach()
    return TokenStats(logprob, entropy, argmax, out_lse)


__all__ = ["TokenStats", "linear_token_stats", "naive_token_stats", "chunked_stats_forward",
           "chunked_stats_backward"]

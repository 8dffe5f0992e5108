"""Token statistics for a training step over a logits workspace: cuBLAS logits, one row kernel.

Used by ``linear_token_stats(..., max_workspace_bytes=...)`` (the backend's default "auto") where a
gradient is to be formed, on the Triton path, for bfloat16 and float32 inputs. The statistics'
upstream gradients (one per token and output: a clipped ratio makes them depend on the log-probs)
are known only in the backward, so unlike cross-entropy's workspace path (``workspace.py``) the
gradients cannot be formed in the forward; a recompute of the logits stays. What this path saves is
part of that recompute, and the Triton recompute's small buffer (``token_stats.py``'s backward):

Forward, the first K tokens (``kept_rows``: half of them under "auto", within 1/32 of the
device's memory; under a budget in bytes as many as fit, at most half; see ``kept_rows``):
  1. Z = E[:K] @ C^T (+ bias)                         cuBLAS, in the input dtype      # [K, V]
     -- returned by the op and kept by autograd for the backward;
  2. ``_rows_kernel`` (STATS) reads each row of Z once: online max, sum of exp, the entropy's and the
     variance's moments re-based as the max grows (as ``token_stats.py``), the arg-max, the target
     logit -> logprob, entropy, argmax, lse, variance of the row.
  The other tokens, [K, N): the fused forward of ``token_stats.py`` (no logits in memory).
Backward, with one more buffer W of K rows:
  the kept rows: ``_rows_kernel`` (GRAD) sweeps each row of Z twice: sweep 1 recomputes lse and the
  entropy from the same rounded logits (so that the softmax sums to one as in a plain bf16
  computation -- the forward's fused statistics of other rows come from float32 logits), sweep 2
  (blocks in reverse, the latest still in L2) writes
      dz = g_lp onehot(y) + p (g_lse - g_lp + g_H ((lse - z) - H)),    p = exp(z - lse)
  times inv_temp, times dz/du under a softcap, into W; dE[:K] = W @ C, dC = W^T @ E[:K] (cuBLAS).
  Then the tokens [K, N) in chunks of K rows: W = E[chunk] @ C^T (+ bias), the same kernel in place,
  dE[chunk] = W @ C, dC += W^T @ E[chunk]; dbias += W.sum(0) (float32) with a bias.
Z is read, never written, by the backward: a second backward (retain_graph=True) sees the same
logits.

Cost (counting): forward (K/N) T by cuBLAS plus one read of Z, and (1 - K/N) T fused; backward
(1 - K/N) T of recompute, 2T of gradient GEMMs and three passes over each row (read, read, write).
Memory: Z (K rows) from forward to backward, W (K rows) during the backward, O(N + V) floats.
Memory held: Z lives as long as the outputs' autograd graph, whether or not a backward runs (compute
statistics that are not differentiated under ``torch.no_grad()``: then nothing is kept).
Limits: dC's 16-bit running sum is rounded once per chunk (two chunks under "auto", more
where the device share binds); the logits of the first K rows are rounded to the input dtype before
the softmax (as a plain bf16 torch computation; float32 inputs go through cuBLAS with torch's TF32
setting); the arg-max compares the logits as eager does (capped and scaled, rounded to a 16-bit
input dtype). Row offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import prepare_inputs
from .token_stats import stats_forward
from .workspace import (
    AUTO_DEVICE_SHARE, _capped_log2, _load_block, _round_by_hand, _store_rounded, add_chunk_gradients, logits_into,
    row_launch,
)

# Of the tokens, the most whose logits the forward keeps under any budget (half: never all the logits),
# and the share "auto" keeps: also half. The path costs about 3 T + (1 - K/N) T plus its row passes,
# and torch.compile of the plain loss about 4 T, so "auto" must keep enough to beat it: at a Qwen-like
# head K = N/4 ran slower than torch.compile, K = N/2 faster, in a fraction of its memory
# (docs/RESULTS.md, "Per-token log-probs and entropy").
KEPT_SHARE_MAX = 2
KEPT_SHARE_AUTO = KEPT_SHARE_MAX
# A budget (or a device share) of fewer rows keeps none: each chunk rounds dC's running sum once more
# (16-bit) and small GEMMs are slow; the fused recompute is then the better path. Half of few tokens
# is still kept (two chunks).
MIN_BUDGET_ROWS = 128


def kept_rows(num_tokens, vocab: int, element_size: int, max_workspace_bytes: int, device_memory: int | None):
    """K, the tokens whose logits the forward keeps: ``max_workspace_bytes`` -1 ("auto"): half
    of the tokens, at most 1/AUTO_DEVICE_SHARE of ``device_memory`` (as cross-entropy's "auto"; None:
    no device limit); > 0: as many rows as fit in that many bytes (no device share), at most half the
    tokens; 0: none; and none where the budget or the device share holds fewer than MIN_BUDGET_ROWS. ``num_tokens`` may be a SymInt (the op's
    fake): no comparison of it is made, only ``torch.sym_min``."""
    row_bytes = vocab * element_size
    if max_workspace_bytes == 0 or row_bytes == 0:
        return 0
    if max_workspace_bytes < 0:
        rows = num_tokens // KEPT_SHARE_AUTO
        if device_memory is not None:
            fit = device_memory // AUTO_DEVICE_SHARE // row_bytes
            rows = torch.sym_min(rows, fit) if fit >= MIN_BUDGET_ROWS else 0
        return rows
    fit = max_workspace_bytes // row_bytes
    return torch.sym_min(num_tokens // KEPT_SHARE_MAX, fit) if fit >= MIN_BUDGET_ROWS else 0


@triton.jit
def _rows_kernel(
    # data: Z the logits (read), G the gradient rows (written; may be Z itself)
    Z, G, Targets, GradLogProb, GradSoftmax, GradEntropy, LogProb, Entropy, Argmax, Lse, Variance,
    # shapes
    M, V, stride_zm, stride_gm,
    # constants
    ignore_index, softcap, inv_temp,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, LOGPROB: tl.constexpr,
    ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, CAPPED_ARGMAX: tl.constexpr, ROUND_ARGMAX: tl.constexpr,
    VARIANCE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr, FAST_RCP: tl.constexpr,
):
    """STATS (WRITE_GRAD false): per row, the statistics asked for. GRAD: per row, dz into G from the
    per-row coefficients g_lp (GradLogProb, 0 where ignored), a = g_lse - g_lp (GradSoftmax) and g_H
    (GradEntropy, read with ENTROPY). Logits in base-2 units (z2 = z log2 e) as workspace.py's
    row kernel: one exp2 per logit and sweep."""
    pid = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0)
    num_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(0, tl.cdiv(M - tl.program_id(0), num_programs)):
        row = pid + i * num_programs  # int64
        z_row = Z + row * stride_zm
        target = -1
        if LOGPROB:
            target = tl.load(Targets + row)

        # Sweep 1: max m, s = sum 2^(z2 - m), t = sum 2^(z2 - m) (z2 - m), q = sum 2^(z2 - m) (z2 - m)^2,
        # re-based when m grows (delta = m - m': t <- a (t + delta s), q <- a (q + 2 delta t + delta^2 s),
        # a = 2^delta); the first of the largest logits.
        run_max = tl.full((), float("-inf"), tl.float32)
        run_sum = tl.zeros((), tl.float32)
        run_t = tl.zeros((), tl.float32)
        run_q = tl.zeros((), tl.float32)
        best = tl.full((), float("-inf"), tl.float32)
        best_id = tl.zeros((), tl.int64)
        # the next block's load issued before this block's math: two loads in flight per program
        raw_next = _load_block(z_row, 0, V, BLOCK_V, False)
        for b in range(0, num_blocks):
            offs_v = b * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
            mask_v = offs_v < V
            raw = raw_next
            raw_next = _load_block(z_row, b + 1, V, BLOCK_V, False)
            u = raw.to(tl.float32)
            z2, _ = _capped_log2(u, softcap, HAS_SOFTCAP, FAST_RCP)
            if HAS_TEMP:
                z2 = z2 * inv_temp
            z2 = tl.where(mask_v, z2, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z2, axis=0))
            alpha = tl.exp2(run_max - new_max)  # 0 at the first block
            below = z2 - new_max  # <= 0; -inf in masked lanes
            p = tl.exp2(below)
            if ENTROPY or VARIANCE:
                delta = tl.where(run_sum > 0.0, run_max - new_max, 0.0)
                below = tl.where(mask_v, below, 0.0)  # finite: p = 0 there
                p_below = p * below
                if VARIANCE:
                    run_q = alpha * (run_q + 2.0 * delta * run_t + delta * delta * run_sum) + tl.sum(p_below * below)
                run_t = alpha * (run_t + delta * run_sum) + tl.sum(p_below)
            run_sum = run_sum * alpha + tl.sum(p)
            run_max = new_max
            if ARGMAX:
                if CAPPED_ARGMAX:  # the capped / scaled logits, as eager compares them
                    z_cmp = z2 * 0.6931471805599453
                    if ROUND_ARGMAX:  # rounded to the input dtype, as eager holds them
                        z_cmp = z_cmp.to(Z.dtype.element_ty).to(tl.float32)
                else:  # the stored logits themselves
                    z_cmp = u
                z_cmp = tl.where(mask_v, z_cmp, float("-inf"))
                block_best = tl.max(z_cmp, axis=0)
                better = block_best > best  # strictly: an earlier block keeps a tie
                block_id = tl.argmax(z_cmp, axis=0, tie_break_left=True).to(tl.int64)
                best_id = tl.where(better, b * BLOCK_V + block_id, best_id)
                best = tl.where(better, block_best, best)
        log2_sum = tl.log2(run_sum)
        lse2 = run_max + log2_sum
        entropy = (log2_sum - run_t / run_sum) * 0.6931471805599453  # two terms >= 0: no cancellation

        if not WRITE_GRAD:
            tl.store(Lse + row, lse2 * 0.6931471805599453)
            if ENTROPY:
                tl.store(Entropy + row, entropy)
            if VARIANCE:  # Var(z) = ln2^2 (q / s - (t / s)^2)
                mean = run_t / run_sum
                variance2 = tl.maximum(run_q / run_sum - mean * mean, 0.0)
                tl.store(Variance + row, variance2 * (0.6931471805599453 * 0.6931471805599453))
            if ARGMAX:
                tl.store(Argmax + row, best_id)
            if LOGPROB:  # the target logit from the same stored value as the sweep saw
                valid = target != ignore_index
                in_range = (target >= 0) & (target < V)
                u_t = tl.load(z_row + tl.where(valid & in_range, target, 0)).to(tl.float32)
                z2_t, _ = _capped_log2(u_t, softcap, HAS_SOFTCAP, FAST_RCP)
                if HAS_TEMP:
                    z2_t = z2_t * inv_temp
                logprob = tl.where(in_range, (z2_t - lse2) * 0.6931471805599453, float("nan"))
                tl.store(LogProb + row, tl.where(valid, logprob, 0.0))
        else:
            # Sweep 2, last block first: dz = g_lp [j == y] + p (a + g_H ((lse - z) - H)).
            a = tl.load(GradSoftmax + row)
            g_lp = 0.0
            if LOGPROB:
                g_lp = tl.load(GradLogProb + row)
            g_h = 0.0
            if ENTROPY:
                g_h = tl.load(GradEntropy + row)
            g_row = G + row * stride_gm
            raw_next = _load_block(z_row, num_blocks - 1, V, BLOCK_V, True)
            for b in range(0, num_blocks):
                offs_v = (num_blocks - 1 - b) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
                mask_v = offs_v < V
                raw = raw_next
                raw_next = _load_block(z_row, num_blocks - 2 - b, V, BLOCK_V, True)
                u = raw.to(tl.float32)
                z2, slope = _capped_log2(u, softcap, HAS_SOFTCAP, FAST_RCP)
                if HAS_TEMP:
                    z2 = z2 * inv_temp
                p = tl.exp2(z2 - lse2)
                if ENTROPY:
                    g = p * (a + g_h * ((lse2 - z2) * 0.6931471805599453 - entropy))
                else:
                    g = p * a
                if LOGPROB:
                    g = tl.where(offs_v == target, g + g_lp, g)
                if HAS_TEMP:
                    g = g * inv_temp
                if HAS_SOFTCAP:
                    g = g * slope
                _store_rounded(g_row + offs_v, g, mask_v, ROUND_BF16, True)


def _launch_rows(z: Tensor, g: Tensor | None, targets: Tensor | None, coefficients, outputs, ignore_index: int,
                 softcap: float, inv_temp: float, logprob: bool, entropy: bool, argmax: bool, variance: bool,
                 *, block_bytes: int | None = None, warps: int | None = None,
                 programs_per_sm: int | None = None):
    """The row kernel over z's rows: statistics into ``outputs`` (logprob, entropy, argmax, lse,
    variance; None where not asked for) when ``g`` is None, else the gradient rows into g with
    ``coefficients`` (g_lp, a, g_H; float32, one per row). Keywords for measurements, on a GPU:
    ``block_bytes`` of a row per block load, ``warps``, ``programs_per_sm`` (None: the defaults)."""
    rows, vocab = z.shape
    if rows == 0:
        return
    block_v, programs, warps = row_launch(z, block_bytes, warps, programs_per_sm)  # as workspace.py's
    write_grad = g is not None
    g_lp, a, g_h = coefficients if write_grad else (z, z, z)
    lp, h, am, lse, var = outputs if not write_grad else (z,) * 5
    dummy = z  # never read or written where its flag is off
    _rows_kernel[(programs,)](
        z, g if write_grad else dummy, targets if targets is not None else dummy,
        g_lp if g_lp is not None else dummy, a, g_h if g_h is not None else dummy,
        lp if lp is not None else dummy, h if h is not None else dummy, am if am is not None else dummy,
        lse, var if var is not None else dummy,
        rows, vocab, z.stride(0), g.stride(0) if write_grad else 0,
        ignore_index, float(softcap), float(inv_temp),
        BLOCK_V=block_v, HAS_SOFTCAP=softcap != 0.0, HAS_TEMP=inv_temp != 1.0, LOGPROB=logprob, ENTROPY=entropy,
        ARGMAX=argmax, CAPPED_ARGMAX=softcap != 0.0 or inv_temp != 1.0,
        ROUND_ARGMAX=z.dtype in (torch.bfloat16, torch.float16), VARIANCE=variance, WRITE_GRAD=write_grad,
        ROUND_BF16=_round_by_hand(g if write_grad else z), FAST_RCP=z.device.type == "cuda", num_warps=warps,
    )


def stats_forward_kept(e: Tensor, c: Tensor, bias: Tensor | None, targets: Tensor | None, ignore_index: int,
                       softcap: float, inv_temp: float, want_logprob: bool, want_entropy: bool, want_argmax: bool,
                       want_variance: bool, num_kept: int):
    """(logprob, entropy, argmax, lse, variance, kept): the statistics of ``token_stats.stats_forward``
    (None where not asked for) and the logits of the first ``num_kept`` tokens, (num_kept, V) in e's
    dtype, for ``stats_backward_kept``."""
    num_tokens = e.shape[0]
    if targets is None:  # never read without LOGPROB; prepare_inputs wants one
        targets = torch.empty(num_tokens, dtype=torch.int64, device=e.device)
    e, c, bias, targets = prepare_inputs(e, c, bias, targets)
    if bias is not None and bias.dtype != e.dtype:  # one dtype for addmm
        bias = bias.to(e.dtype)
    k = num_kept
    kept = torch.empty(k, c.shape[0], dtype=e.dtype, device=e.device)
    f32 = dict(dtype=torch.float32, device=e.device)
    head = (
        torch.empty(k, **f32) if want_logprob else None,
        torch.empty(k, **f32) if want_entropy else None,
        torch.empty(k, dtype=torch.int64, device=e.device) if want_argmax else None,
        torch.empty(k, **f32),
        torch.empty(k, **f32) if want_variance else None,
    )
    if k:
        logits_into(kept, e[:k], c, bias)
        _launch_rows(kept, None, targets[:k], None, head, ignore_index, softcap, inv_temp, want_logprob,
                     want_entropy, want_argmax, want_variance)
    if k == num_tokens:
        return (*head, kept)
    tail = stats_forward(e[k:], c, bias, targets[k:], ignore_index, softcap, inv_temp, want_logprob, want_entropy,
                         want_argmax, want_variance)
    out = tuple(None if h is None else torch.cat([h, t]) for h, t in zip(head, tail))
    return (*out, kept)


def stats_backward_kept(e: Tensor, c: Tensor, bias: Tensor | None, targets: Tensor | None, kept: Tensor,
                        grad_logprob: Tensor | None, grad_softmax: Tensor, grad_entropy: Tensor | None,
                        ignore_index: int, softcap: float, inv_temp: float, needs_e: bool, needs_c: bool,
                        needs_bias: bool):
    """(dE, dC, dbias) in the inputs' dtypes (None where not needed), from the forward's kept logits
    and the per-token float32 coefficients g_lp (None without logprob; 0 where ignored),
    a = g_lse - g_lp and g_H (None without an entropy gradient). ``kept`` is not modified."""
    num_tokens = e.shape[0]
    if targets is None:
        targets = torch.empty(num_tokens, dtype=torch.int64, device=e.device)
    e, c, bias, targets = prepare_inputs(e, c, bias, targets)
    if bias is not None and bias.dtype != e.dtype:
        bias = bias.to(e.dtype)
    needs_bias = needs_bias and bias is not None
    k, vocab = kept.shape
    if not (needs_e or needs_c or needs_bias):
        return None, None, None
    de = torch.empty(num_tokens, e.shape[1], dtype=e.dtype, device=e.device) if needs_e else None
    dc = torch.empty(vocab, c.shape[1], dtype=c.dtype, device=e.device) if needs_c else None
    dbias32 = torch.zeros(vocab, dtype=torch.float32, device=e.device) if needs_bias else None
    work = torch.empty_like(kept)
    with_logprob, with_entropy = grad_logprob is not None, grad_entropy is not None
    for n0 in range(0, num_tokens, k):
        n1 = min(num_tokens, n0 + k)
        g, e_rows = work[: n1 - n0], e[n0:n1]
        if n0 == 0:
            z = kept
        else:
            z = g
            logits_into(z, e_rows, c, bias)
        coefficients = tuple(None if t is None else t[n0:n1] for t in (grad_logprob, grad_softmax, grad_entropy))
        _launch_rows(z, g, targets[n0:n1] if with_logprob else None, coefficients, None, ignore_index, softcap,
                     inv_temp, with_logprob, with_entropy, False, False)
        add_chunk_gradients(g, e_rows, c, n0, de, dc, dbias32)
    return de, dc, (dbias32.to(bias.dtype) if needs_bias else None)


__all__ = ["KEPT_SHARE_AUTO", "KEPT_SHARE_MAX", "kept_rows", "stats_backward_kept", "stats_forward_kept"]

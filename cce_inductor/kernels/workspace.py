"""The workspace path: a reduced loss and its gradients formed in one pass over a bounded logits buffer.

Used by ``linear_cross_entropy(..., max_workspace_bytes=B)`` when the loss is reduced ("mean" or
"sum") and no lse is returned: the only upstream gradient is then one scalar g, so the gradients of
L = sum_i w_i loss_i (w_i = 1 for "sum", 1 / #non-ignored for "mean", 0 where ignored) can be formed
in the forward and merely scaled by g in the backward. How Liger's fused linear cross-entropy and
QuACK's work; it costs three GEMMs (floor 3T) instead of a recompute's four, for B bytes of memory.

Algorithm, tokens in chunks of M rows (``workspace_rows``), one M x V buffer Z reused by every chunk:
  1. Z = E[chunk] @ C^T (+ bias)                         cuBLAS, in the input dtype  # [M, V]
  2. ``_fused_rows_kernel``, one program per row (grid-stride over the rows, about one program per
     SM). Sweep 1 (vocabulary blocks in order) reads the row: z = softcap * tanh(u / softcap) (when
     set), online max and sum of exp(z - max) -> lse; the target logit z_y is read from the same row,
     and with label smoothing the sum of the logits. Loss per row as the rest of the op:
     lse - (1 - ls) z_y - (ls / V) sum_j z_j; 0 where the target is ignore_index, NaN where it is
     outside [0, V). Sweep 2 (blocks in reverse order, so that the most recently read blocks are
     still in L2) overwrites the row in place with
         dz_j = w_i * (softmax_j - (1 - ls) [j == y] - ls / V)   (* sech^2(u_j / cap) under softcap)
     computed in float32 (sech^2 as 4a / (1 + a)^2 with a = exp(-2|u / cap|): the textbook
     1 - tanh^2 cancels where the cap saturates) and stored in Z's dtype.
  3. dE[chunk] = Z @ C (cuBLAS, written into dE);  dC += Z^T @ E[chunk] (cuBLAS addmm into dC, in
     C's dtype: cuBLAS accumulates each chunk in float32 and rounds the running sum once per chunk);
     dbias += Z.sum(0) (a float32 accumulator of V floats; an extra read of Z, only with a bias).
Each GEMM is skipped when its gradient is not needed; without any, the kernel only computes the loss.

Memory: Z (at most B bytes; at least one row), the gradients themselves, O(N + V) floats.
Time (counting): three GEMMs of N x V x D (3T) plus three passes of Z through HBM in the row kernel
(read, read, write: 6 bytes per logit for 16-bit Z, fewer where the second read hits L2) plus one
read-modify-write of dC per chunk after the first in the addmm epilogue.
Limits: float32 inputs go through cuBLAS with torch's own TF32 setting; the logits are rounded to the
input dtype before the softmax (as a plain bf16 torch computation); dC's rounding error grows like
sqrt(chunks); V < 2^31 (row offsets are int64). Launch (on a GPU): 16 KB of the row per block load,
8 warps, two programs per SM, the next block's load issued before this block's math (``PREFETCH``),
evict_first on the second sweep (``EVICT_SWEEP2``); no register spills for sm_90 (checked offline by
a test); 16-byte loads and stores when V % 16 == 0 (other V: narrower accesses). The launcher's
keywords (the schedule) leave the results bit for bit, but for the block size and warps (the order
of a row's sums). Its measured times are in docs/PERF_NOTES.md.
``scale_`` multiplies the gradients by the upstream scalar in the backward: float32 math, one
rounding, and no memory traffic at all when the scalar is 1 (read on the device, no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch import Tensor

from .common import prepare_inputs, sm_count

# Row kernel on a GPU: 16 KB of the row per block load (8192 16-bit or 4096 float32 logits, 32 or
# 16 per thread with 8 warps), two programs per SM, each walking rows with a grid stride; the row's
# second sweep runs backwards, so its first blocks are the ones the first sweep read last (still in
# L2). Two 8-warp programs, each with two loads in flight (PREFETCH), keep more bytes in flight per SM
# than one 16-warp program of 32 KB blocks, and measured faster (docs/PERF_NOTES.md); evict_first on
# the second sweep, as the row is not read again.
_GPU_BLOCK_BYTES = 16 * 1024
_GPU_WARPS = 8
_GPU_PROGRAMS_PER_SM = 2
# Interpreter: tiny blocks, so that small test rows span several blocks and the masked tail.
_INTERPRETER_BLOCK_V = 16
_INTERPRETER_PROGRAMS = 3
# Chunk sizes are rounded up to a multiple of this where the budget allows (GEMM tiles, alignment).
_ROW_ALIGN = 128


# ``max_workspace_bytes="auto"`` (the backend's default): the budget follows the problem and the device.
# A quarter of the logits: at the anchor shapes (N >= 8192) chunks of >= 2048 rows, the smallest at
# which the path kept torch.compile's speed (smaller chunks pay a read-modify-write of dC per chunk;
# docs/PERF_NOTES.md, "The default's workspace size").
# At most 1/32 of the device's memory, so that a huge N x V stays a bounded buffer; at least
# AUTO_MIN_ROWS rows (short inputs: small logits anyway), and where even those do not fit in the
# device's share, no workspace (the exact mode, O(N + V) memory).
AUTO_LOGITS_SHARE = 4
AUTO_DEVICE_SHARE = 32
AUTO_MIN_ROWS = 512


def auto_fits(vocab: int, element_size: int, device_memory: int | None) -> bool:
    """Whether the "auto" workspace applies: AUTO_MIN_ROWS rows of logits fit in the device's share.
    ``device_memory`` None (a CPU under the interpreter): no device limit."""
    return device_memory is None or AUTO_MIN_ROWS * vocab * element_size <= device_memory // AUTO_DEVICE_SHARE


def auto_workspace_bytes(num_tokens: int, vocab: int, element_size: int, device_memory: int | None) -> int:
    """The "auto" budget: a quarter of the logits' bytes, at least AUTO_MIN_ROWS rows (or all of them),
    at most 1/AUTO_DEVICE_SHARE of ``device_memory``. Deterministic for a device and a shape.
    E.g. (8192, 256000, bf16, 80 GB): 2048 rows, 1.05 GB."""
    row_bytes = vocab * element_size
    rows = max(-(-num_tokens // AUTO_LOGITS_SHARE), min(num_tokens, AUTO_MIN_ROWS), 1)
    budget = rows * row_bytes
    if device_memory is not None:
        budget = min(budget, max(row_bytes, device_memory // AUTO_DEVICE_SHARE))
    return budget


def workspace_rows(num_tokens: int, vocab: int, element_size: int, max_workspace_bytes: int) -> int:
    """Tokens per chunk: as many as fit in ``max_workspace_bytes`` (at least one), spread evenly over
    the chunks that needs, rounded up to a multiple of 128 where that still fits.
    E.g. (8192, 256000, bf16, 1 GiB): 2097 fit -> 4 chunks of 2048."""
    if num_tokens <= 0:
        return 0
    fit = max(1, max_workspace_bytes // (vocab * element_size))
    chunks = -(-num_tokens // fit)
    rows = -(-num_tokens // chunks)
    aligned = min(num_tokens, -(-rows // _ROW_ALIGN) * _ROW_ALIGN)
    return aligned if aligned <= fit else rows


# The row kernel works in base-2 units (z * log2(e); the constants below are log2(e) and ln(2)), so
# that each exponential is one exp2: Triton lowers tl.exp to a multiply by log2(e) and an ex2 with a
# denormal range fix-up (five instructions on sm_90), tl.exp2 to the ex2 alone, which flushes
# results below 2^-126 to zero (no sum of exponentials, and no gradient entry that is then rounded
# to bf16 next to entries of order 1 / #tokens, keeps them). With a softcap, 1 / (1 + a) is
# ``fast_dividef`` on a GPU: a in (0, 1], so div.full's range fix-up for huge divisors is dead code.
# Fewer instructions and a faster row pass than base-e math (docs/PERF_NOTES.md); the last bits of
# loss and dz differ from base-e math (the sums are rounded in another unit).


@triton.jit
def _capped_log2(u, softcap, HAS_SOFTCAP: tl.constexpr, FAST_RCP: tl.constexpr):
    """(z * log2(e), dz/du) for z = softcap * tanh(u / softcap), tanh and sech^2 from one exp2;
    (u * log2(e), 1) without a softcap."""
    if HAS_SOFTCAP:
        a = tl.exp2(tl.abs(u) * (-2.0 * 1.4426950408889634 / softcap))  # exp(-2|u| / cap), in (0, 1]
        if FAST_RCP:
            r = libdevice.fast_dividef(1.0, 1.0 + a)
        else:
            r = 1.0 / (1.0 + a)
        t = (1.0 - a) * r  # tanh(|u| / cap)
        return (softcap * 1.4426950408889634) * tl.where(u < 0, -t, t), 4.0 * a * r * r
    else:
        return u * 1.4426950408889634, 1.0


@triton.jit
def _store_rounded(ptrs, x, mask, ROUND_BF16: tl.constexpr, EVICT_FIRST: tl.constexpr = False):
    """Store float32 x in the pointee dtype, rounded to nearest even. The Triton interpreter's
    float32 -> bfloat16 cast truncates instead (a GPU rounds), so there the rounding is done by hand."""
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    if EVICT_FIRST:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask, eviction_policy="evict_first")
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _load(ptrs, mask, EVICT_FIRST: tl.constexpr):
    if EVICT_FIRST:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_block(z_row, block, V, BLOCK_V: tl.constexpr, EVICT_FIRST: tl.constexpr):
    """PREFETCH's load: block ``block`` of a row, lanes outside [0, V) masked, so that the block after
    the last or before the first loads nothing. (Offsets from the block index rather than from the
    current block's offsets: the latter spilled at 16 warps with softcap and label smoothing,
    offline for sm_90.)"""
    offs_v = block * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
    return _load(z_row + offs_v, (offs_v >= 0) & (offs_v < V), EVICT_FIRST)


@triton.jit
def _fused_rows_kernel(
    # data
    Z, Targets, Weight, Loss,
    # shapes
    M, V, stride_zm,
    # constants
    ignore_index, softcap, target_weight, uniform_weight,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ROUND_BF16: tl.constexpr, PREFETCH: tl.constexpr, EVICT_SWEEP2: tl.constexpr, FAST_RCP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0)
    num_blocks = tl.cdiv(V, BLOCK_V)
    weight = tl.load(Weight)  # w of a non-ignored row: 1 (sum) or 1 / #non-ignored (mean)
    for i in range(0, tl.cdiv(M - tl.program_id(0), num_programs)):
        row = pid + i * num_programs  # int64
        z_row = Z + row * stride_zm
        target = tl.load(Targets + row)
        valid = target != ignore_index
        in_range = (target >= 0) & (target < V)

        # Sweep 1: lse (online max and sum of exp) and, with label smoothing, the sum of the logits,
        # all in base-2 units. With PREFETCH the next block's load is issued before this block is
        # reduced, so that two blocks are in flight per program instead of one.
        run_max = tl.full((), float("-inf"), tl.float32)
        run_sum = tl.zeros((), tl.float32)
        logit_sum = tl.zeros((), tl.float32)
        if PREFETCH:
            raw_next = _load_block(z_row, 0, V, BLOCK_V, False)
        for b in range(0, num_blocks):
            offs_v = b * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
            mask_v = offs_v < V
            if PREFETCH:
                raw = raw_next
                raw_next = _load_block(z_row, b + 1, V, BLOCK_V, False)
            else:
                raw = _load(z_row + offs_v, mask_v, False)
            u = raw.to(tl.float32)
            z2, _ = _capped_log2(u, softcap, HAS_SOFTCAP, FAST_RCP)
            z2 = tl.where(mask_v, z2, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z2, axis=0))
            run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(tl.exp2(z2 - new_max), axis=0)
            run_max = new_max
            if HAS_SMOOTHING:
                logit_sum += tl.sum(tl.where(mask_v, z2, 0.0), axis=0)
        lse2 = run_max + tl.log2(run_sum)

        # The target logit from the same stored value as the sweep saw.
        safe_target = tl.where(valid & in_range, target, 0)
        z2_target, _ = _capped_log2(tl.load(z_row + safe_target).to(tl.float32), softcap, HAS_SOFTCAP, FAST_RCP)
        loss2 = lse2 - target_weight * z2_target
        if HAS_SMOOTHING:
            loss2 -= uniform_weight * logit_sum
        loss = tl.where(in_range, loss2 * 0.6931471805599453, float("nan"))
        tl.store(Loss + row, tl.where(valid, loss, 0.0))

        # Sweep 2, last block first: overwrite the row with w * (p - (1 - ls) onehot - ls / V).
        if WRITE_GRAD:
            if PREFETCH:
                raw_next = _load_block(z_row, num_blocks - 1, V, BLOCK_V, EVICT_SWEEP2)
            for b in range(0, num_blocks):
                offs_v = (num_blocks - 1 - b) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
                mask_v = offs_v < V
                if PREFETCH:
                    raw = raw_next
                    raw_next = _load_block(z_row, num_blocks - 2 - b, V, BLOCK_V, EVICT_SWEEP2)
                else:
                    raw = _load(z_row + offs_v, mask_v, EVICT_SWEEP2)
                u = raw.to(tl.float32)
                z2, slope = _capped_log2(u, softcap, HAS_SOFTCAP, FAST_RCP)
                g = tl.exp2(z2 - lse2) - uniform_weight
                g = tl.where(offs_v == target, g - target_weight, g) * weight
                if HAS_SOFTCAP:
                    g = g * slope
                g = tl.where(valid, g, 0.0)  # ignored rows: exactly 0 (their logits are overwritten too)
                _store_rounded(z_row + offs_v, g, mask_v, ROUND_BF16, EVICT_SWEEP2)


@triton.jit
def _scale_kernel(X, Scale, numel, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    """X *= Scale[0] in float32, grid-stride; nothing is read or written when the scale is 1."""
    scale = tl.load(Scale).to(tl.float32)
    if scale != 1.0:
        pid = tl.program_id(0).to(tl.int64)
        num_programs = tl.num_programs(0)
        for i in range(0, tl.cdiv(numel - pid * BLOCK, num_programs * BLOCK)):
            offs = (pid + i * num_programs) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
            mask = offs < numel
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            _store_rounded(X + offs, x * scale, mask, ROUND_BF16)


def _round_by_hand(t: Tensor) -> bool:
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def _gpu_block_v(vocab: int, element_size: int, block_bytes: int | None = None) -> int:
    """Logits per block load on a GPU: ``block_bytes`` (None: _GPU_BLOCK_BYTES) of a row, at most the row."""
    return min(triton.next_power_of_2(vocab), (block_bytes or _GPU_BLOCK_BYTES) // element_size)


def row_launch(z: Tensor, block_bytes: int | None = None, warps: int | None = None,
               programs_per_sm: int | None = None) -> tuple[int, int, int]:
    """(logits per block load, programs, warps) of a row kernel over z's rows: on a GPU
    ``block_bytes`` of a row per load (None: _GPU_BLOCK_BYTES), ``programs_per_sm`` programs per SM
    (None: _GPU_PROGRAMS_PER_SM) of ``warps`` warps (None: _GPU_WARPS), grid-striding over the rows;
    under the interpreter tiny blocks and a few programs."""
    rows, vocab = z.shape
    if z.device.type != "cuda":
        return _INTERPRETER_BLOCK_V, min(rows, _INTERPRETER_PROGRAMS), 1
    programs = min(rows, (programs_per_sm or _GPU_PROGRAMS_PER_SM) * sm_count(z.device))
    return _gpu_block_v(vocab, z.element_size(), block_bytes), programs, warps or _GPU_WARPS


def _launch_rows(z: Tensor, targets: Tensor, weight: Tensor, loss: Tensor, ignore_index: int, softcap: float,
                 label_smoothing: float, write_grad: bool, *, block_bytes: int | None = None,
                 warps: int | None = None, programs_per_sm: int | None = None, prefetch: bool = True,
                 evict_sweep2: bool = True):
    """The row kernel over z's rows; returns the launched kernel. Keywords for measurements (the
    study script benchmarks/workspace_rows.py at commit f0bb5f2), on a GPU: ``block_bytes`` of a row per block load (None:
    _GPU_BLOCK_BYTES), ``warps`` (None: _GPU_WARPS), ``programs_per_sm`` (None:
    _GPU_PROGRAMS_PER_SM), ``prefetch`` (the next block's load before this block's math),
    ``evict_sweep2`` (evict_first on the second sweep's loads and stores); both on by default.
    ``prefetch``, ``evict_sweep2`` and ``programs_per_sm`` leave the results bit for bit;
    ``block_bytes`` and ``warps`` change the order of the row's sums (the last bits)."""
    rows, vocab = z.shape
    block_v, programs, warps = row_launch(z, block_bytes, warps, programs_per_sm)
    return _fused_rows_kernel[(programs,)](
        z, targets, weight, loss,
        rows, vocab, z.stride(0),
        ignore_index, float(softcap), 1.0 - label_smoothing, label_smoothing / vocab,
        BLOCK_V=block_v, HAS_SOFTCAP=softcap != 0.0, HAS_SMOOTHING=label_smoothing != 0.0, WRITE_GRAD=write_grad,
        ROUND_BF16=_round_by_hand(z), PREFETCH=prefetch, EVICT_SWEEP2=evict_sweep2,
        FAST_RCP=z.device.type == "cuda", num_warps=warps,
    )


def logits_into(out: Tensor, e_rows: Tensor, c: Tensor, bias: Tensor | None) -> None:
    """out = e_rows @ c.T (+ bias), cuBLAS, in out's dtype (bias in e's dtype)."""
    if bias is None:
        torch.mm(e_rows, c.T, out=out)
    else:
        torch.addmm(bias, e_rows, c.T, out=out)


def add_chunk_gradients(g: Tensor, e_rows: Tensor, c: Tensor, n0: int, de: Tensor | None, dc: Tensor | None,
                        dbias32: Tensor | None) -> None:
    """From the logits' gradient g of the tokens [n0, n0 + len(g)): dE's rows written
    (de[n0:] = g @ C), dC formed at the first chunk (n0 == 0) and added to after (cuBLAS addmm: one
    rounding of the running sum per chunk), float32 dbias added to; None: not needed."""
    if de is not None:
        torch.mm(g, c, out=de[n0 : n0 + g.shape[0]])
    if dc is not None:
        if n0 == 0:
            torch.mm(g.T, e_rows, out=dc)
        else:
            dc.addmm_(g.T, e_rows)
    if dbias32 is not None:
        dbias32 += g.sum(0, dtype=torch.float32)


def lce_fused_reduced(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
    mean: bool,
    max_workspace_bytes: int,
    needs_e: bool,
    needs_c: bool,
    needs_bias: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss, dE, dC, dbias): the mean (over non-ignored targets) or sum of the per-token losses, a
    0-dim float32 tensor, and its gradients w.r.t. e (N, D), c (V, D), bias (V,) in their dtypes
    (None where not needed); the logits live chunk by chunk in a buffer of at most
    ``max_workspace_bytes`` (at least one row). No host sync."""
    e, c, bias, targets = prepare_inputs(e, c, bias, targets)
    num_tokens, dim = e.shape
    vocab = c.shape[0]
    needs_bias = needs_bias and bias is not None
    if bias is not None and bias.dtype != e.dtype:  # one dtype for addmm (the public function ensures it)
        bias = bias.to(e.dtype)

    count = (targets != ignore_index).sum()
    weight = (1.0 / count.float()) if mean else torch.ones((), dtype=torch.float32, device=e.device)
    loss_rows = torch.empty(num_tokens, dtype=torch.float32, device=e.device)
    de = torch.empty(num_tokens, dim, dtype=e.dtype, device=e.device) if needs_e else None
    dc = torch.empty(vocab, dim, dtype=c.dtype, device=e.device) if needs_c else None
    dbias32 = torch.zeros(vocab, dtype=torch.float32, device=e.device) if needs_bias else None
    write_grad = needs_e or needs_c or needs_bias

    rows = workspace_rows(num_tokens, vocab, e.element_size(), max_workspace_bytes)
    workspace = torch.empty(rows, vocab, dtype=e.dtype, device=e.device)
    for n0 in range(0, num_tokens, max(rows, 1)):
        n1 = min(num_tokens, n0 + rows)
        z, e_chunk = workspace[: n1 - n0], e[n0:n1]
        logits_into(z, e_chunk, c, bias)
        _launch_rows(z, targets[n0:n1], weight, loss_rows[n0:n1], ignore_index, softcap, label_smoothing,
                     write_grad)
        add_chunk_gradients(z, e_chunk, c, n0, de, dc, dbias32)
    if needs_c and num_tokens == 0:
        dc.zero_()

    total = loss_rows.sum()
    loss = total / count if mean else total
    return loss, de, dc, (dbias32.to(bias.dtype) if needs_bias else None)


def scale_(x: Tensor, scale: Tensor) -> None:
    """In place: x *= scale (a one-element tensor on x's device), float32 math, one rounding; no
    memory traffic when the scale is 1. x must be contiguous."""
    if x.numel() == 0:
        return
    if not x.is_contiguous():
        raise ValueError("scale_ needs a contiguous tensor")
    block = 4096 if x.device.type == "cuda" else 64
    programs = min(triton.cdiv(x.numel(), block), 4 * sm_count(x.device))
    _scale_kernel[(programs,)](x, scale.reshape(1), x.numel(), BLOCK=block, ROUND_BF16=_round_by_hand(x),
                               num_warps=8 if x.device.type == "cuda" else 1)


__all__ = ["add_chunk_gradients", "auto_fits", "auto_workspace_bytes", "lce_fused_reduced", "logits_into", "row_launch",
           "scale_", "workspace_rows"]

"""Backward of cut cross-entropy: dE, dC, dbias from recomputed logit tiles; this module chooses how.

``lce_backward`` returns the gradients of sum(grad_loss * loss + grad_lse * lse) w.r.t. e, c and bias
from the forward's lse (the semantics of ``reference.chunked_backward``) without forming the N x V
logits in memory; with ``filter_grad`` it skips the products of blocks whose gradient is negligible,
within a per-token bound (``FILTER_EPS``; the rule and its bound in backward_shared.py).

Strategies, one module each (its header states the algorithm, tiles and limits):
  * buffered (backward_buffered.py; 16-bit inputs, wherever ``buffered_path_applies``): a persistent
    dz kernel writes the logit gradient of a window of tokens x a chunk of the vocabulary into a
    bounded buffer, and cuBLAS forms dE and dC from it. With the filter:
      - the filtered dE GEMM (backward_filtered_de.py) forms dE over the kept tiles, its last partial
        wave of output tiles split into pieces along K (SPLIT_LAST_DE_WAVE);
      - the filtered dC GEMM (backward_filtered_dc.py) forms dC over them where dC is filtered too:
        ``dc_filter="corrected"`` (a rank-1 stand-in for each skipped tile), or with the forward's keep
        flags (``keep``: the dz kernel recomputes only the kept tiles; dC's skipped terms dropped).
  * atomic (backward_atomic.py): float32 inputs, a vocabulary order, ``dc_filter="dropped"`` and torch
    builds without a mixed-precision addmm: one kernel forms dE and dC with float32 atomics.
Both call the helpers of backward_shared.py. The measurements behind the choices made here and in
those modules are in docs/PERF_NOTES.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backward_atomic import WINDOW_BYTES, atomic_backward, default_vocab_order
from .backward_buffered import BUFFER_BYTES, buffered_backward
from .backward_shared import BackwardCall
from .common import TileConfig, as_f32, backward_config, buffered_config, prepare_inputs
from .forward import keep_shape

# Dropped gradient mass per token is < FILTER_EPS * w_i (backward_shared.py); with eps < 1/2 a uniform
# softmax is never filtered. On LM-like data the tail of the softmax (a small share of the mass spread
# over the whole vocabulary) sits between 2^-3 and 2^-2: no bounded rule skips a tile without dropping
# its share of that tail, so 2^-2 skips most tiles and 2^-3 few. 2^-2 was the default until a
# convergence run on real text put the filtered training loss measurably above eager's: the dropped
# tail is biased, not noise. 2^-3 drops at most 1/8 of each token's gradient scale.
FILTER_EPS = 2.0**-3
# What filtering does to dC where the caller does not say: "exact" (dC never filtered: cuBLAS over
# the whole buffer) or "corrected" (the buffered path only: a skipped tile's dC terms replaced by the
# rank-1 stand-in colsum(dz)^T mean(E rows), dC by the filtered dC GEMM over the kept tiles);
# "dropped" (the atomic kernel only, for measurements) drops a skipped tile's dC terms with no
# stand-in. "exact": the corrected dC measured faster only where much is skipped (its Triton GEMM is
# slower than cuBLAS's), and both are within bf16 rounding of float64 math.
DC_FILTER = "exact"
DC_FILTERS = ("exact", "corrected", "dropped")
# Whether filtering walks the vocabulary in backward_atomic.default_vocab_order: off, as it measured
# to skip fewer tiles on LM-like data, whose ids are already frequency-ranked (ordering by the batch's
# mean logit scatters them). ``vocab_order=True`` turns it on.
DEFAULT_ORDER = False
# torch builds with a mixed-precision addmm (16-bit operands, float32 result): the buffered path's
# dE accumulator needs it on CUDA (torch >= 2.8 or so; older builds take the atomic path).
_HAS_ADDMM_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


def buffered_path_applies(e: Tensor, order, dropped_dc: bool = False) -> bool:
    """The buffered path serves 16-bit gradients, exact or filtered (dC exact or corrected): float32
    inputs keep the kernel's IEEE dots (cuBLAS would follow torch's TF32 setting), a vocabulary order
    and a dropped dC (dc_filter="dropped") need the atomic kernel, and on CUDA it needs torch's
    mixed-precision addmm."""
    if e.dtype == torch.float32 or order is not None or dropped_dc:
        return False
    return e.device.type != "cuda" or _HAS_ADDMM_DTYPE


def lce_backward(
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
    filter_grad: bool,
    needs_e: bool,
    needs_c: bool,
    needs_bias: bool,
    *,
    config: TileConfig | None = None,
    filter_eps: float = FILTER_EPS,
    dc_filter: str | None = None,
    vocab_order: bool | Tensor | None = None,
    window_bytes: int = WINDOW_BYTES,
    tile_counts: Tensor | None = None,
    buffered: bool | None = None,
    buffer_bytes: int = BUFFER_BYTES,
    keep: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of sum(grad_loss * loss + grad_lse * lse) w.r.t. e, c, bias (None where not needed);
    semantics of reference.chunked_backward, plus filtering when ``filter_grad``.

    ``dc_filter``: what the filter does to dC (``DC_FILTERS``; None: ``DC_FILTER`` in the buffered
    path, "exact" in the atomic one): "corrected" (buffered path only) skips a tile's dC GEMM and adds
    its rank-1 stand-in, "dropped" (the atomic path, or the buffered one with ``keep``; no relative
    bound on dC) skips it, "exact" never does. ``vocab_order``: None = ``DEFAULT_ORDER`` when
    filtering, True/False to force, or an explicit (V,) permutation of the vocabulary (atomic path;
    ``window_bytes`` bounds its float32 scratch). ``tile_counts``: optional int32 (2,) tensor
    that receives [tiles computed, tiles filtered] (added to its contents). ``buffered``: None =
    the buffered path where ``buffered_path_applies`` (exact 16-bit), True/False to force it (for
    tests and measurements); ``buffer_bytes`` bounds its scratch.

    ``keep``: the filter's keep flags from the forward (``forward.lce_forward_with_keep``, int8
    (token tiles, vocab tiles) of the dz kernel's tiles; needs ``filter_grad``, the buffered path and
    no dbias): the dz kernel then recomputes only the kept tiles (backward_buffered.py, LISTED),
    dE is the filtered dE GEMM's and dC the filtered dC GEMM's without stand-ins (a skipped tile's dC
    terms are dropped: there are no column sums without its recompute; ``dc_filter`` None or
    "dropped"). The flags are the filter's rule only where grad_lse is 0: the caller's to ensure."""
    orig_e_dtype, orig_c_dtype = e.dtype, c.dtype
    e, c, bias, targets = prepare_inputs(e, c, bias, targets)
    vocab = c.shape[0]
    needs_bias = needs_bias and bias is not None
    if not (needs_e or needs_c or needs_bias):
        return None, None, None
    if e.shape[0] == 0:
        return (
            torch.zeros_like(e, dtype=orig_e_dtype) if needs_e else None,
            torch.zeros_like(c, dtype=orig_c_dtype) if needs_c else None,
            torch.zeros_like(bias) if needs_bias else None,
        )
    order = _vocab_order(vocab_order, e, c, filter_grad)
    if dc_filter is not None and dc_filter not in DC_FILTERS:
        raise ValueError(f"dc_filter must be one of {DC_FILTERS} or None, got {dc_filter!r}")
    if keep is not None:
        _check_keep(keep, e, vocab, filter_grad, needs_bias, dc_filter, order, buffered)
        buffered = True
    dropped_dc = bool(filter_grad) and dc_filter == "dropped" and keep is None
    if tile_counts is not None and (tile_counts.dtype != torch.int32 or tile_counts.numel() < 2):
        raise ValueError("tile_counts must be an int32 tensor with 2 elements")
    call = BackwardCall(
        e, c, bias, targets, as_f32(lse), as_f32(grad_loss), as_f32(grad_lse), ignore_index, softcap,
        label_smoothing, bool(filter_grad), filter_eps / vocab, needs_e, needs_c, needs_bias,
        torch.zeros(vocab, dtype=torch.float32, device=e.device) if needs_bias else None, tile_counts,
    )

    if buffered is None:
        buffered = buffered_path_applies(e, order, dropped_dc) and (needs_e or needs_c)
    elif buffered and (order is not None or dropped_dc):
        raise ValueError("the buffered path walks the vocabulary in id order and never drops dC without its "
                         "stand-in: buffered=True needs no vocab_order and dc_filter other than 'dropped'")
    if not buffered and filter_grad and dc_filter == "corrected":
        raise ValueError("dc_filter='corrected' runs in the buffered path only (16-bit inputs, no vocab_order, "
                         "a torch with a mixed-precision addmm)")
    if buffered:
        de, dc = buffered_backward(call, buffer_bytes, keep, (dc_filter or DC_FILTER) == "corrected")
    else:
        de, dc = atomic_backward(call, order, config or backward_config(e), dropped_dc, window_bytes)
    return (
        de.to(orig_e_dtype) if needs_e else None,
        dc.to(orig_c_dtype) if needs_c else None,
        call.dbias.to(bias.dtype) if needs_bias else None,
    )


def _vocab_order(vocab_order: bool | Tensor | None, e: Tensor, c: Tensor, filter_grad: bool) -> Tensor | None:
    """The vocabulary order the call asks for (``lce_backward``'s ``vocab_order``), or None: id order."""
    if isinstance(vocab_order, Tensor):
        order = vocab_order.to(device=e.device, dtype=torch.int64).contiguous()
        if order.shape != (c.shape[0],):
            raise ValueError(f"vocab_order must have shape ({c.shape[0]},), got {tuple(order.shape)}")
        return order
    if vocab_order or (vocab_order is None and filter_grad and DEFAULT_ORDER):
        return default_vocab_order(e, c)
    return None


def _check_keep(keep: Tensor, e: Tensor, vocab: int, filter_grad: bool, needs_bias: bool, dc_filter: str | None,
                order: Tensor | None, buffered: bool | None) -> None:
    """Raises ValueError unless the forward's keep flags can serve this call (``lce_backward``'s ``keep``)."""
    if not filter_grad or needs_bias or dc_filter not in (None, "dropped") or order is not None:
        raise ValueError("keep flags from the forward need filter_grad=True, no dbias, dc_filter None or "
                         "'dropped' and no vocab_order")
    if buffered is False or (buffered is None and not buffered_path_applies(e, None)):
        raise ValueError("keep flags from the forward run in the buffered path only (16-bit inputs, a torch "
                         "with a mixed-precision addmm)")
    tiles_shape = keep_shape(e.shape[0], vocab, buffered_config(e))
    if keep.dtype != torch.int8 or tuple(keep.shape) != tiles_shape or keep.stride(1) != 1:
        raise ValueError(f"keep must be an int8 tensor of shape {tiles_shape} with unit column stride, got "
                         f"{keep.dtype} {tuple(keep.shape)}")

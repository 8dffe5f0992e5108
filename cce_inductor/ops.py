"""The linear-cross-entropy custom ops and the public function built on them.

Layers, bottom up:
  ``cce_inductor::lce_forward``  (e2d, c, targets1d, bias, ...) -> (loss per token, lse per token,
      the filter's keep flags where the forward forms them, else an empty tensor)
  ``cce_inductor::lce_backward`` (..., lse, grad_loss, grad_lse, keep, ...) -> (dE, dC, dbias)
  ``cce_inductor::lce_fused_reduced`` (e2d, c, targets1d, bias, ..., max_workspace_bytes) ->
      (reduced loss, dE, dC, dbias): the ``max_workspace_bytes`` path (Triton only), gradients formed
      in the forward and scaled by the upstream scalar in the backward (``lce_scale_``).
All are ``torch.library`` custom ops with fake implementations, so torch.compile sees them as
opaque calls (no graph break, symbolic sizes). The forward op has a registered autograd that calls
the backward op. Every op runs with autocast off; the forward ops' autocast rule first casts their
floating inputs to the autocast dtype, so that they compute in it as F.linear would.

Every tensor the ops return is contiguous (row-major), whatever the strides of their inputs, and
their fakes say so: Inductor checks a custom op's real outputs against its fake's sizes and strides,
so the two must agree for every input layout, a transposed e or c included (``F.linear(x.t(), W)``;
``h @ W`` with W stored (D, V), which the rewrite passes as ``c = W.t()``). The forward ops check the
targets (``_check_targets``): one outside [0, V) that is not ignore_index is an error, in eager mode
and under torch.compile alike, never a loss or gradient of another class.

``linear_cross_entropy`` validates the arguments, flattens the leading dims, turns ``shift`` into a
shifted view of the targets (e is never copied), picks the implementation and applies the reduction.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from . import filter_choice, reference

REDUCTIONS = ("none", "sum", "mean")
_AUTO = -1  # lce_fused_reduced's encoding of max_workspace_bytes="auto"
IMPLS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_kernels():
    """The Triton kernels, or None where they cannot be imported."""
    try:
        from . import kernels
    except ImportError:  # triton missing (e.g. not Linux)
        return None
    return kernels if kernels.AVAILABLE else None


def _triton_runs_on(device: torch.device) -> bool:
    if _triton_kernels() is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """``impl`` with "auto" resolved: Triton for CUDA tensors where the kernels import, else torch."""
    if impl != "auto":
        return impl
    return "triton" if device.type == "cuda" and _triton_runs_on(device) else "torch"


def _on_device_of(t: Tensor):
    """Makes t's CUDA device current for the call. Triton launches on the current device and its
    current stream, not on the tensors' device: a model split over GPUs (e.g. device_map="auto")
    calls the op with tensors on cuda:1 while cuda:0 is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dense_like(t: Tensor) -> Tensor:
    """An uninitialized contiguous tensor of t's shape, dtype and device: the layout of every gradient
    the ops return (the fakes' outputs; ``torch.empty_like`` would keep a transposed input's strides)."""
    return t.new_empty(t.shape)


def _dense(t: Tensor | None, like: Tensor) -> Tensor:
    """A real output in the fakes' layout: t made contiguous (a no-op for what the kernels and the
    torch path allocate), or an empty tensor where there is none."""
    return like.new_empty(0) if t is None else t.contiguous()


class TargetOutOfRangeError(IndexError, ValueError):
    """A target outside [0, V) that is not ignore_index. An IndexError, as eager F.cross_entropy
    raises, and a ValueError, as the op's other argument errors are."""


def _check_targets(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """Targets must lie in [0, vocab) or equal ignore_index. In the op's body, which runs eagerly even
    under torch.compile, so the check holds for compiled programs too. CPU tensors: a host check
    (host memory: no device sync) that raises TargetOutOfRangeError. Other devices:
    ``torch._assert_async``, a device-side assert (a CUDA error at the next synchronization, as
    Inductor's own index checks give) -- no host sync on the op path."""
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.device.type == "cpu":
        if bad.any():
            raise TargetOutOfRangeError(
                f"targets must be in [0, V={vocab}) or equal ignore_index={ignore_index}; found "
                f"{int(targets[bad][0])}"
            )
    else:
        torch._assert_async(~bad.any(), f"cce_inductor: a target is outside [0, V={vocab}) and not ignore_index")


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("cce_inductor::lce_forward", mutates_args=())
def lce_forward(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
    impl: str,
    filter_grad: bool,
    filter_dc: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """e (N, D), c (V, D), targets (N,), bias (V,) or None; softcap 0 means none.
    Returns loss (N,), float32, lse (N,) in ``lse_dtype(e.dtype, impl)``, and the backward filter's
    keep flags (int8, ``keep_flags_shape``) where ``forward_flags_apply``, else an empty int8 tensor.
    ``filter_grad`` and ``filter_dc`` are the backward's (``filter_dc``: the caller never
    differentiates lse -- the flags are the filter's rule only where grad_lse is 0).
    A target outside [0, V) that is not ignore_index raises on the CPU and device-asserts elsewhere
    (``_check_targets``)."""
    with _on_device_of(e):
        _check_targets(targets, c.shape[0], ignore_index)
        if forward_flags_apply(e, bias, softcap, label_smoothing, impl, filter_grad, filter_dc):
            from .kernels.backward import FILTER_EPS
            from .kernels.forward import lce_forward_with_keep

            return lce_forward_with_keep(e, c, bias, targets, ignore_index, FILTER_EPS)
        none = e.new_empty(0, dtype=torch.int8)
        if impl == "triton":
            return (*_triton_kernels().lce_forward(e, c, bias, targets, ignore_index, softcap, label_smoothing), none)
        return (*reference.chunked_forward(e, c, bias, targets, ignore_index, softcap, label_smoothing), none)


def forward_flags_apply(e: Tensor, bias: Tensor | None, softcap: float, label_smoothing: float, impl: str,
                        filter_grad: bool, filter_dc: bool) -> bool:
    """Whether the forward forms the filter's keep flags, so that the backward skips the skipped
    tiles' recompute (``kernels.backward.lce_backward(keep=...)``): dC filtered too, the Triton path,
    16-bit inputs, no bias (dbias needs every tile), no softcap and no label smoothing (the flags come
    from each token's tile log-sum-exps, which give the filter's mass only for the plain loss)."""
    if not (filter_grad and filter_dc and impl == "triton" and bias is None and softcap == 0.0
            and label_smoothing == 0.0 and e.dtype in (torch.bfloat16, torch.float16)):
        return False
    from .kernels.backward import buffered_path_applies

    return buffered_path_applies(e, None)


def keep_flags_shape(e: Tensor, c: Tensor) -> tuple:
    """(token tiles, vocab tiles) of the forward's keep flags."""
    from .kernels.common import forward_config
    from .kernels.forward import keep_shape

    return keep_shape(e.shape[0], c.shape[0], forward_config(e))


def lse_dtype(dtype: torch.dtype, impl: str) -> torch.dtype:
    """The torch path keeps float32 inputs' log-sum-exp in float64 (see reference._compute_dtype)."""
    return torch.float64 if impl == "torch" and dtype == torch.float32 else torch.float32


@lce_forward.register_fake
def _(e, c, targets, bias, ignore_index, softcap, label_smoothing, impl, filter_grad, filter_dc):
    flags = forward_flags_apply(e, bias, softcap, label_smoothing, impl, filter_grad, filter_dc)
    return (e.new_empty(e.shape[0], dtype=torch.float32), e.new_empty(e.shape[0], dtype=lse_dtype(e.dtype, impl)),
            e.new_empty(keep_flags_shape(e, c) if flags else (0,), dtype=torch.int8))


@torch.library.custom_op("cce_inductor::lce_backward", mutates_args=())
def lce_backward(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    grad_loss: Tensor,
    grad_lse: Tensor,
    keep: Tensor,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
    impl: str,
    filter_grad: bool,
    needs_e: bool,
    needs_c: bool,
    needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_loss * loss + grad_lse * lse); an empty tensor for each not needed.
    ``keep``: the forward's keep flags (``lce_forward`` with filter_dc), which the Triton backward
    then follows, dC filtered like dE; empty: none, dC exact. ``filter_grad``: the Triton backward
    runs filtered where the filter has lately skipped enough to pay, else exact (``filter_choice``)."""
    needs_bias = needs_bias and bias is not None
    with _on_device_of(e):
        if impl == "triton":
            choice = filter_choice.choose(c) if filter_grad else filter_choice.Choice(False)
            flags = {"keep": keep, "dc_filter": "dropped"} if keep.numel() and choice.filtered else {}
            grads = _triton_kernels().lce_backward(
                e, c, bias, targets, lse, grad_loss, grad_lse, ignore_index, softcap, label_smoothing,
                choice.filtered, needs_e, needs_c, needs_bias, tile_counts=choice.counts, **flags,
            )
            choice.record()
        else:
            grads = reference.chunked_backward(
                e, c, bias, targets, lse, grad_loss, grad_lse, ignore_index, softcap, label_smoothing,
                needs_e, needs_c, needs_bias,
            )
    return tuple(_dense(g, e) for g in grads)


@lce_backward.register_fake
def _(e, c, targets, bias, lse, grad_loss, grad_lse, keep, ignore_index, softcap, label_smoothing, impl,
      filter_grad, needs_e, needs_c, needs_bias):
    return (
        _dense_like(e) if needs_e else e.new_empty(0),
        _dense_like(c) if needs_c else e.new_empty(0),
        _dense_like(bias) if (needs_bias and bias is not None) else e.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    e, c, targets, bias, ignore_index, softcap, label_smoothing, impl, filter_grad, _filter_dc = inputs
    _, lse, keep = output
    ctx.mark_non_differentiable(keep)
    ctx.save_for_backward(e, c, targets, bias, lse, keep)
    ctx.options = (ignore_index, softcap, label_smoothing, impl, filter_grad)  # filter_dc: in keep


def _backward(ctx, grad_loss, grad_lse, _grad_keep):
    e, c, targets, bias, lse, keep = ctx.saved_tensors
    # Upstream gradients of a sum/mean arrive as expanded stride-0 tensors: make them dense.
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.to(lse.dtype).contiguous()
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype).contiguous()
    needs_e, needs_c, _, needs_bias = ctx.needs_input_grad[:4]
    de, dc, dbias = lce_backward(
        e, c, targets, bias, lse, grad_loss, grad_lse, keep, *ctx.options, needs_e, needs_c, needs_bias
    )
    return (
        de if needs_e else None,
        dc if needs_c else None,
        None,
        dbias if needs_bias else None,
        None, None, None, None, None, None,
    )


lce_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "cce_inductor.linear_cross_entropy does not support double backward (create_graph=True "
        "through the loss); compute the loss with plain F.linear + F.cross_entropy for that."
    )


def _setup_nothing(ctx, inputs, output):
    pass


lce_backward.register_autograd(_no_double_backward, setup_context=_setup_nothing)


def _register_autocast(op, device_type: str, cast: bool = True):
    """Under autocast, cast the floating inputs to the autocast dtype in effect at the call (as
    F.linear does; ``cast=False``: leave them as they are) and run the op with autocast off, so that
    its body computes in the dtypes it chose (a backward called inside an autocast region would
    otherwise run the torch path's logit matmuls in the autocast dtype). ``torch.library.register_autocast``
    takes one fixed dtype, so the rule is registered at the dispatcher directly."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))
    overload = op._opoverload
    namespace, name = overload._schema.name.split("::")

    def kernel(_keyset, *args):
        if cast:
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return overload(*args)

    _LIB.impl(name, kernel, key_name, with_keyset=True)


_LIB = torch.library.Library("cce_inductor", "FRAGMENT")
for _device_type in ("cpu", "cuda"):
    _register_autocast(lce_forward, _device_type)
    _register_autocast(lce_backward, _device_type, cast=False)  # its inputs are the forward's


# ----------------------------------------------------------------------------- workspace path


@torch.library.custom_op("cce_inductor::lce_fused_reduced", mutates_args=())
def lce_fused_reduced(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
    mean: bool,
    max_workspace_bytes: int,
    needs_e: bool,
    needs_c: bool,
    needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reduced loss (0-dim float32: mean over non-ignored targets, or sum) and its gradients
    w.r.t. e, c, bias (an empty tensor for each not needed), formed in the forward chunk by chunk in
    a logits buffer of at most ``max_workspace_bytes`` (see ``kernels/workspace.py``; ``_AUTO``:
    the "auto" budget, from the number of tokens, the vocabulary and the device's memory). Triton only.
    Its backward scales the returned gradient tensors in place (no second copy of dC), so a caller of
    the raw op must not keep them; ``linear_cross_entropy`` returns only the loss. Targets are checked
    as in ``lce_forward``."""
    from .kernels import workspace

    with _on_device_of(e):
        _check_targets(targets, c.shape[0], ignore_index)
        if max_workspace_bytes == _AUTO:
            max_workspace_bytes = workspace.auto_workspace_bytes(e.shape[0], c.shape[0], e.element_size(),
                                                                 _device_memory(e.device))
        out = workspace.lce_fused_reduced(e, c, bias, targets, ignore_index, softcap, label_smoothing, mean,
                                          max_workspace_bytes, needs_e, needs_c, needs_bias)
    return tuple(_dense(t, e) for t in out)


@lce_fused_reduced.register_fake
def _(e, c, targets, bias, ignore_index, softcap, label_smoothing, mean, max_workspace_bytes, needs_e, needs_c,
      needs_bias):
    return (
        e.new_empty((), dtype=torch.float32),
        _dense_like(e) if needs_e else e.new_empty(0),
        _dense_like(c) if needs_c else e.new_empty(0),
        _dense_like(bias) if (needs_bias and bias is not None) else e.new_empty(0),
    )


@torch.library.custom_op("cce_inductor::lce_scale_", mutates_args=("grad",))
def lce_scale_(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale (one element) in float32 math; no memory traffic when the scale is 1."""
    from .kernels import workspace

    with _on_device_of(grad):
        workspace.scale_(grad, scale)


@lce_scale_.register_fake
def _(grad, scale):
    return None


def _fused_setup_context(ctx, inputs, output):
    _, de, dc, dbias = output
    ctx.mark_non_differentiable(de, dc, dbias)
    ctx.set_materialize_grads(False)
    # Held as attributes, not saved tensors: the backward takes them, scales them in place and hands
    # them to autograd, which can then keep them as .grad without a copy (peak: one set of gradients).
    ctx.grads = (de, dc, dbias)


def _fused_backward(ctx, grad_loss, *_):
    if torch.is_grad_enabled():
        _no_double_backward(ctx)
    if ctx.grads is None:
        raise RuntimeError(
            "linear_cross_entropy(max_workspace_bytes=...) forms its gradients in the forward and hands "
            "them over in the one backward: a second backward through the same graph (retain_graph=True) "
            "is not supported; pass max_workspace_bytes=0 for that."
        )
    grads, ctx.grads = ctx.grads, None
    scale = grad_loss.reshape(1).float()  # 0-dim; dense (an expanded grad is copied here, one element)
    out = []
    for grad, needed in zip(grads, (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])):
        if needed and grad.numel():
            lce_scale_(grad, scale)
        out.append(grad if needed else None)
    de, dc, dbias = out
    return de, dc, None, dbias, None, None, None, None, None, None, None, None


lce_fused_reduced.register_autograd(_fused_backward, setup_context=_fused_setup_context)
for _device_type in ("cpu", "cuda"):
    _register_autocast(lce_fused_reduced, _device_type)
    _register_autocast(lce_scale_, _device_type, cast=False)


def _device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device (a property: no sync); None elsewhere (the interpreter)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def _workspace_applies(e: Tensor, c: Tensor, reduction: str, return_lse: bool, impl: str, exact: bool,
                       max_workspace_bytes) -> bool:
    autocast = e.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(e.device.type)
    dtype = torch.get_autocast_dtype(e.device.type) if autocast else e.dtype
    grads = torch.is_grad_enabled() and (e.requires_grad or c.requires_grad)
    return workspace_mode(c.shape[0], dtype, e.device, reduction, return_lse, impl, exact, grads,
                          max_workspace_bytes)


def workspace_mode(vocab: int, dtype: torch.dtype, device: torch.device, reduction: str, return_lse: bool,
                   impl: str, exact: bool, grads: bool, max_workspace_bytes) -> bool:
    """Whether the workspace path runs: a budget was given (a positive int, or "auto" with exact=True
    where a gradient of e or c is to be formed and ``workspace.auto_fits``), for a reduced loss
    without lse on the Triton path (``impl`` resolved), in bfloat16 or float32: float16 gradients
    formed before the upstream scalar (a GradScaler's loss scale) is known would underflow."""
    if max_workspace_bytes is None or max_workspace_bytes == 0:
        return False
    if not (reduction != "none" and not return_lse and impl == "triton" and dtype != torch.float16):
        return False
    if max_workspace_bytes == "auto":  # only where gradients are formed: a loss alone is the exact forward
        from .kernels import workspace

        return grads and exact and workspace.auto_fits(vocab, dtype.itemsize, _device_memory(device))
    return True


def describe_mode(num_tokens: int | None, vocab: int, dtype: torch.dtype, device: torch.device, reduction: str,
                  grads: bool, impl: str = "auto", exact: bool = True, filter_dc: bool = False,
                  max_workspace_bytes="auto") -> str:
    """How ``linear_cross_entropy`` computes a loss of this shape with these options, in words
    (explain()); ``num_tokens`` None: unknown (dynamic)."""
    impl = resolve_impl(impl, device)
    if impl == "torch":
        return "torch path (chunked over the vocabulary, exact)"
    if workspace_mode(vocab, dtype, device, reduction, False, impl, exact, grads, max_workspace_bytes):
        from .kernels import workspace

        auto = max_workspace_bytes == "auto"
        if num_tokens is None:
            return "workspace" + (" (auto: a quarter of the logits' bytes, per call)" if auto else
                                  f" of at most {max_workspace_bytes} bytes")
        budget = (workspace.auto_workspace_bytes(num_tokens, vocab, dtype.itemsize, _device_memory(device))
                  if auto else max_workspace_bytes)
        rows = workspace.workspace_rows(num_tokens, vocab, dtype.itemsize, budget)
        chunks = -(-num_tokens // max(rows, 1))
        return (f"workspace{' (auto)' if auto else ''}: {chunks} chunk(s) of {rows} tokens, "
                f"{rows * vocab * dtype.itemsize / 1e6:.1f} MB of logits; gradients formed in the forward")
    if not grads:
        return "exact forward (no gradient), O(N + V) memory"
    if not exact:
        return "filtered recompute" + (" (dE and dC)" if filter_dc else " (dE)") + ", O(N + V) memory"
    return "exact recompute, O(N + V) memory"


# ----------------------------------------------------------------------------- public function


def check_operands(e, c, targets, bias, ignore_index, shift, impl, targets_are="class indices") -> None:
    """The checks every linear-head op makes of its operands: e (..., D), c (V, D), integer targets
    shaped like e's leading dims (or None), bias (V,) or None, one float dtype (outside autocast),
    one device; ignore_index an int; shift in range; impl known and runnable."""
    if not isinstance(e, Tensor) or e.dim() < 1:
        raise ValueError(f"e must be a tensor of shape (..., D), got {getattr(e, 'shape', type(e))}")
    if not isinstance(c, Tensor) or c.dim() != 2:
        raise ValueError(f"c must be a tensor of shape (V, D), got {getattr(c, 'shape', type(c))}")
    if e.shape[-1] != c.shape[1]:
        raise ValueError(f"D of e ({e.shape[-1]}) differs from D of c ({c.shape[1]})")
    if targets is not None:
        if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex() \
                or targets.dtype == torch.bool:
            raise TypeError(f"targets must be an integer tensor of {targets_are}, got "
                            f"{getattr(targets, 'dtype', type(targets))}")
        if tuple(targets.shape) != tuple(e.shape[:-1]):
            raise ValueError(f"targets' shape {tuple(targets.shape)} must equal e's leading dims {tuple(e.shape[:-1])}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (c.shape[0],)):
        raise ValueError(f"bias must be a tensor of shape (V,) = ({c.shape[0]},), got {getattr(bias, 'shape', type(bias))}")
    for name, t in (("e", e), ("c", c), ("bias", bias)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    autocast = e.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(e.device.type)
    if not autocast:  # autocast casts them to one dtype
        for name, t in (("c", c), ("bias", bias)):
            if t is not None and t.dtype != e.dtype:
                raise TypeError(f"{name} must have e's dtype {e.dtype}, got {t.dtype} (or use torch.autocast)")
    tensors = [(n, t) for n, t in (("e", e), ("c", c), ("targets", targets), ("bias", bias)) if t is not None]
    if len({t.device for _, t in tensors}) > 1:
        raise ValueError("e, c, targets and bias must be on one device, got " + ", ".join(f"{n} on {t.device}" for n, t in tensors))
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(shift, int) or isinstance(shift, bool) or shift < 0:
        raise ValueError(f"shift must be an int >= 0, got {shift!r}")
    if shift and (e.dim() < 2 or shift >= e.shape[-2]):
        raise ValueError(
            f"shift={shift} is out of range: it needs a token dim (the second-to-last of e) longer "
            f"than shift, e has shape {tuple(e.shape)}"
        )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and not _triton_runs_on(e.device):
        raise ValueError(
            f"impl='triton' needs CUDA tensors and importable Triton kernels (or TRITON_INTERPRET=1 "
            f"on the CPU); got tensors on {e.device}"
        )


def _check_inputs(e, c, targets, bias, ignore_index, softcap, reduction, shift, label_smoothing, impl):
    if targets is None:
        raise TypeError("targets must be an integer tensor of class indices, got None")
    check_operands(e, c, targets, bias, ignore_index, shift, impl)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    try:  # a non-number fails the comparison: name the argument rather than the operator
        softcap_ok = softcap is None or softcap > 0
    except TypeError:
        raise TypeError(f"softcap must be None or a number > 0, got {softcap!r}") from None
    if not softcap_ok:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    try:  # as F.cross_entropy: above 1 is an error, anything else not above 0 (NaN too) means none
        smoothing_too_large = label_smoothing > 1.0
    except TypeError:
        raise TypeError(f"label_smoothing must be a number <= 1, got {label_smoothing!r}") from None
    if smoothing_too_large:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def linear_cross_entropy(
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
    weight: Tensor | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    exact: bool = True,
    filter_dc: bool = False,
    max_workspace_bytes: int | str | None = None,
):
    """Cross-entropy of the linear classifier ``e @ c.T + bias`` without materializing the logits.

    Equals ``F.cross_entropy(z.flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)`` with ``z = e @ c.T + bias`` (and
    ``z = softcap * tanh(z / softcap)`` when ``softcap`` is set), computed with float32 accumulation;
    the loss is float32. Under ``torch.autocast`` it computes in the autocast dtype, as F.linear would.
    Any strides are accepted (a transposed e or c, e.g. ``c = W.t()`` for a weight stored (D, V));
    the gradients the op forms are contiguous.

    Args:
        e: embeddings, shape (..., D); float32, bfloat16 or float16.
        c: classifier weight, shape (V, D), the dtype of e.
        targets: class indices, shape e.shape[:-1], any integer dtype. Targets equal to
            ``ignore_index`` (any int, also a valid class id) contribute nothing. Any other target
            outside [0, V) is an error, as for torch -- in eager mode and under torch.compile alike,
            never a loss or gradient of another class: on the CPU a ``TargetOutOfRangeError`` (an
            IndexError and a ValueError) is raised; on a GPU a device-side assert fires (checking
            on the host would need a device sync), which surfaces as a CUDA error at the next
            synchronization and leaves the CUDA context unusable, as torch's own device asserts do.
        bias: optional (V,), the dtype of e.
        softcap: logit soft-capping ``cap * tanh(z / cap)`` (Gemma 2); None for none.
        reduction: "mean" (over non-ignored targets; NaN when all are ignored, as torch),
            "sum", or "none" (per-token losses shaped like the shifted targets, 0 where ignored).
        shift: pair e[..., t, :] with targets[..., t + shift] along the token dim (the
            second-to-last dim of e) -- the causal-LM label shift -- without copying e. Targets
            shifted out (the first ``shift`` of each row) are not read.
        label_smoothing: as in F.cross_entropy: above 1.0 raises a ValueError; 0, a negative value
            or NaN means no smoothing (torch treats them so), so that a call torch accepts is never
            an error here.
        weight: per-class weights (V,), as F.cross_entropy's ``weight``: a token's loss is scaled by
            w[y] (with label smoothing: (1 - ls) w[y] (lse - z_y) + ls / V sum_j w_j (lse - z_j)), and
            "mean" divides by the sum of w[y] over the non-ignored tokens (NaN when that is 0, as
            torch). Exact gradients (w.r.t. weight too). The smoothing term uses
            sum_j w_j z_j = e . (w @ c) + w . bias, which a softcap breaks: weight with softcap and
            label smoothing together raises NotImplementedError. max_workspace_bytes is not used
            with weights (the exact path runs).
        return_lse: also return the per-token log-sum-exp of the logits (e.g. for z-loss), shaped
            like the per-token loss; it is defined at ignored positions too and is differentiable.
        impl: "triton" (the CUDA kernels), "torch" (chunked pure torch, the CPU path) or "auto"
            (Triton for CUDA tensors, torch otherwise).
        exact: a bool; True (the default): no gradient filtering. ``exact=False`` lets the Triton backward
            skip the dE product of a (token tile, vocab tile) block when every token's gradient mass
            in it is below ``kernels.FILTER_EPS`` (1/8) times its share |tile|/V: the mass dropped
            from any token is then < 1/8 of its gradient scale, whatever the data (a near-uniform
            softmax is never filtered); dC and dbias stay exact. The filtered backward (a Triton dE
            GEMM over the kept tiles) is faster than the exact one only where it skips enough, so
            each backward counts the blocks it skips and, where the latest count (read without a
            device sync, so from an earlier call) is under ``filter_choice.MIN_SKIPPED``, the calls
            run exact -- every ``filter_choice.PROBE_EVERY``-th still filtered, to count again; the
            first call, and every call under ``torch.use_deterministic_algorithms(True)`` or a CUDA
            graph capture, filters (``cce_inductor.filter_choice``). Either way each token loses
            less than 1/8 of its gradient scale. The dropped mass is biased (it is always the small
            probabilities that go), so a filtered training run's loss can stray from an exact one's
            (docs/RESULTS.md has a convergence run). The torch path is always exact.
        filter_dc: a bool, only with ``exact=False`` (else a ValueError); False (the default): dC
            stays exact. True: a skipped block is dropped from dC too, and where the forward can tell
            which blocks the filter will skip -- the Triton path, bfloat16 or float16, no bias, no
            softcap, no label smoothing, return_lse=False -- it forms the filter's keep flags itself
            (from each token's log-sum-exp over each vocabulary block of the forward's tiles; one
            byte per (token tile, vocabulary tile) kept for the backward), so that the backward
            recomputes only the kept blocks. Elsewhere dC stays exact. dC's dropped terms have no
            relative bound (they add up along the tokens), so its error grows with N. Where little
            is skipped it runs exact as ``exact=False`` does (above), its forward still forming
            the flags.
        max_workspace_bytes: memory for speed. None or 0 (the default: off): the exact recompute,
            O(N + V) memory. A positive int: the Triton path may hold the logits of a chunk of
            tokens in a buffer of at most this many bytes (at least one token's row), and then forms
            the gradients in the forward, in the same pass as the logits: three GEMMs instead of a
            recompute's four; always exact. ``"auto"`` (the default of ``backend="cce"``): the budget
            is chosen per call from the shapes and the device (``kernels.workspace.auto_workspace_bytes``:
            a quarter of the logits' bytes, at least 512 rows, at most 1/32 of the device's memory;
            deterministic for a device and a shape); it applies only with exact=True and where a
            gradient of e or c is to be formed (a loss alone is the exact forward: one GEMM, O(N)
            memory), and where 512 rows of logits exceed the device's share the exact mode runs. The gradients are
            held from the forward to the backward, which scales them by the upstream gradient; in
            eager a second backward through the same graph (retain_graph=True) and double backward
            raise (a compiled backward copies the gradients before scaling them). Used only when
            reduction is "mean" or "sum", return_lse=False, impl resolves to "triton" and the
            compute dtype is bfloat16 or float32 (float16 gradients formed before a GradScaler's
            loss scale is known would underflow); otherwise ignored: the exact path runs, with the
            same results up to rounding. Anything but None, "auto" or an int >= 0 raises. Rounding:
            dC is accumulated across chunks in C's dtype, one rounding per chunk, so its rounding
            error grows like sqrt(chunks).

    Returns:
        The loss, or ``(loss, lse)`` with ``return_lse=True``.

    Example::

        >>> e = torch.randn(2, 8, 64, requires_grad=True)
        >>> c = torch.randn(1000, 64, requires_grad=True)
        >>> y = torch.randint(0, 1000, (2, 8))
        >>> loss = linear_cross_entropy(e, c, y, shift=1)  # == causal-LM loss of e @ c.T
        >>> loss.backward()
    """
    _check_inputs(e, c, targets, bias, ignore_index, softcap, reduction, shift, label_smoothing, impl)
    smoothing = float(label_smoothing) if label_smoothing > 0.0 else 0.0  # NaN and negatives: none, as torch
    if weight is not None:
        return _weighted_cross_entropy(e, c, targets, bias, weight, ignore_index=ignore_index, softcap=softcap,
                                       reduction=reduction, shift=shift, label_smoothing=smoothing,
                                       return_lse=return_lse, impl=impl, exact=exact, filter_dc=filter_dc)
    if not isinstance(exact, bool):  # exact=None would silently turn the gradient filter on
        raise TypeError(f"exact must be a bool, got {exact!r}")
    if not isinstance(filter_dc, bool):
        raise TypeError(f"filter_dc must be a bool, got {filter_dc!r}")
    if filter_dc and exact:
        raise ValueError("filter_dc=True filters dC as well as dE: it needs exact=False")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if max_workspace_bytes is not None and max_workspace_bytes != "auto" and (
        not isinstance(max_workspace_bytes, int) or isinstance(max_workspace_bytes, bool) or max_workspace_bytes < 0
    ):
        raise ValueError(f'max_workspace_bytes must be None, "auto" or an int >= 0, got {max_workspace_bytes!r}')
    impl = resolve_impl(impl, e.device)

    # int64 before padding: ignore_index (e.g. -100) may not fit a narrower dtype (uint8 wraps it
    # into a valid class id).
    aligned = targets.long()
    if shift:
        pad = aligned.new_full((*targets.shape[:-1], shift), ignore_index)
        aligned = torch.cat([aligned[..., shift:], pad], dim=-1)
    e2d = e.reshape(-1, e.shape[-1])
    flat_targets = aligned.reshape(-1)
    if _workspace_applies(e, c, reduction, return_lse, impl, exact, max_workspace_bytes):
        grad_on = torch.is_grad_enabled()
        needs = [grad_on and t is not None and t.requires_grad for t in (e, c, bias)]
        out, *_ = lce_fused_reduced(e2d, c, flat_targets, bias, ignore_index, float(softcap or 0.0), smoothing,
                                    reduction == "mean", _AUTO if max_workspace_bytes == "auto" else max_workspace_bytes,
                                    *needs)
        return out
    # an lse returned to the caller may be differentiated: the forward's keep flags assume it is not
    loss, lse, _ = lce_forward(
        e2d, c, flat_targets, bias, ignore_index, float(softcap or 0.0), smoothing, impl, not exact,
        filter_dc and not return_lse,
    )

    if reduction == "mean":
        out = loss.sum() / (flat_targets != ignore_index).sum()
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = _unshift(loss, targets.shape, shift)
    if return_lse:
        return out, _unshift(lse.float(), targets.shape, shift)
    return out


def _weighted_cross_entropy(e, c, targets, bias, weight, *, ignore_index, softcap, reduction, shift,
                            label_smoothing, return_lse, impl, exact, filter_dc):
    """``linear_cross_entropy`` with class weights, from the unweighted per-token losses and lse:
        loss_i = (1 - ls) w[y_i] (lse_i - z_iy) + (ls / V) (W lse_i - e_i . (w @ c) - w . bias),  W = sum_j w_j,
    0 where y_i is ignored; "mean" divides the sum by sum_i w[y_i] over the non-ignored tokens
    (F.cross_entropy's formulas). Autograd carries the weighting into the op's backward (its
    grad_loss and grad_lse), so the gradients stay exact."""
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (c.shape[0],) or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor of shape (V,) = ({c.shape[0]},), got "
                         f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
    if weight.device != e.device:
        raise ValueError(f"weight must be on e's device {e.device}, got {weight.device}")
    if label_smoothing and softcap is not None:
        raise NotImplementedError(
            "linear_cross_entropy: weight with label_smoothing and a softcap together is not supported (the "
            "smoothing term's weighted sum of the capped logits has no closed form); drop one of the three"
        )
    loss, lse = linear_cross_entropy(e, c, targets, bias, ignore_index=ignore_index, softcap=softcap,
                                     reduction="none", shift=shift, return_lse=True, impl=impl, exact=exact,
                                     filter_dc=filter_dc and not label_smoothing)
    y = (targets[..., shift:] if shift else targets).long()
    valid = y != ignore_index
    w = weight.float()
    w_y = torch.where(valid, w[torch.where(valid, y, 0).clamp(0, c.shape[0] - 1)], 0.0)
    per_token = (1.0 - label_smoothing) * w_y * loss
    if label_smoothing:
        w_c = weight.to(c.dtype) @ c  # (D,): sum_j w_j c_j
        weighted_logits = (e @ w_c.to(e.dtype))[..., : e.shape[-2] - shift] if shift else e @ w_c.to(e.dtype)
        weighted_logits = weighted_logits.float()
        if bias is not None:
            weighted_logits = weighted_logits + (w * bias.float()).sum()
        smooth = w.sum() * lse - weighted_logits
        per_token = per_token + (label_smoothing / c.shape[0]) * torch.where(valid, smooth, 0.0)
    if reduction == "mean":
        out = per_token.sum() / w_y.sum()
    elif reduction == "sum":
        out = per_token.sum()
    else:
        out = per_token
    return (out, lse) if return_lse else out


def _unshift(per_token: Tensor, shape, shift: int) -> Tensor:
    per_token = per_token.view(shape)
    return per_token[..., : shape[-1] - shift] if shift else per_token

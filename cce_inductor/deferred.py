"""Logits that are formed only when they are read.

A compiled region that returns its logits next to a loss (every Hugging Face model does) would
otherwise compute the N x V projection, keep it alive as long as the caller keeps the output, and
receive an N x V zero gradient for it in the backward. The ``"cce"`` backend instead makes the
graph return what the logits are made of -- the hidden states, the weight, the bias and any scalar
tensors -- and hands the caller a :class:`DeferredLogits` in their place:

* its metadata (``shape``, ``dtype``, ``device``, ``stride``, ``requires_grad``) needs no data;
* the first operation that reads it (indexing, ``.float()``, ``argmax``, ``print``, ``.cpu()``,
  ``torch.save``, ...) forms the logits once, by replaying the graph's own recipe (the projection
  and the softcap / scaling / casts that followed it) eagerly, and keeps them;
* autograd sees it as the output of :class:`_FormLogits`, whose inputs are the ingredients: a
  gradient that reaches the logits (a loss computed from them outside the compiled region) flows
  on to the hidden states and the weight, as in eager mode. The backward re-forms the logits
  with autograd on (one more projection, paid only when the logits are differentiated).

Hazards, and what is done about them:

* The weight is changed in place (``optimizer.step()``) before the logits are read: eager mode
  would have returned the old values. An optimizer step pre-hook gives every live deferred logits
  tensor made of a parameter about to be stepped a copy of that parameter (V x D), or forms the
  logits where they are smaller than the copy (N x V <= V x D); a loop that keeps its output
  alive across the step (``out = model(...); out.loss.backward(); opt.step()``) pays a copy of the
  head's weight, not a projection. Any other in-place change of an ingredient (its version counter
  moved) makes a read raise instead of returning other values.
* The weight's storage is freed soon after the forward: FSDP2 frees its unsharded parameters after
  the forward (``reshard_after_forward``) or after the backward. Logits made of an FSDP2
  parameter keep a copy of it (V x D), taken when the compiled region returns, or are formed
  then where they are the smaller. Where freed storage is not recognized in advance, a read raises
  with the fix rather than reading freed memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

__all__ = ["DeferredLogits", "Recipe", "defer"]


@dataclass(frozen=True)
class Recipe:
    """How to form the logits from their ingredients.

    Attributes:
        fn: a function of the ingredients (tensors, in order) returning the logits; run with
            autocast off, so it must carry its own casts.
        description: what it computes, for messages (e.g. ``"linear -> softcap"``).
    """

    fn: Callable[..., Tensor]
    description: str


class DeferredLogits(torch.Tensor):
    """A tensor whose values are formed from its recipe on first read (see the module docstring)."""

    _recipe: Recipe
    _ingredients: tuple[Tensor, ...]
    _sources: tuple[int | None, ...]  # id() of each ingredient as given (a parameter), None for a copy
    _versions: tuple[int | None, ...]  # None: an inference tensor (no version counter)
    _value: Tensor | None

    @staticmethod
    def __new__(cls, recipe: Recipe, ingredients: Sequence[Tensor], like: Tensor, requires_grad: bool = False):
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            like.shape,
            strides=like.stride(),
            dtype=like.dtype,
            device=ingredients[0].device,
            requires_grad=requires_grad,
        )
        self._recipe = recipe
        self._ingredients = tuple(i.detach() for i in ingredients)
        self._sources = tuple(id(i) for i in ingredients)
        self._versions = tuple(_version(i) for i in ingredients)
        self._value = None
        _LIVE[id(self)] = self
        return self

    # ------------------------------------------------------------------ forming the values

    @property
    def formed(self) -> bool:
        """Whether the logits have been formed (read at least once)."""
        return self._value is not None

    def form(self) -> Tensor:
        """The logits as an ordinary tensor (no autograd history), formed once."""
        if self._value is None:
            self._check_ingredients()
            with torch.no_grad(), _autocast_off(self.device):
                value = self._recipe.fn(*self._ingredients)
            if value.shape != self.shape or value.dtype != self.dtype:  # a recipe bug, never silent
                raise RuntimeError(
                    f"cce_inductor: deferred logits formed as {tuple(value.shape)} {value.dtype}, "
                    f"expected {tuple(self.shape)} {self.dtype} ({self._recipe.description})"
                )
            self._value = value
            self._ingredients, self._sources = (), ()
            _LIVE.pop(id(self), None)
        return self._value

    def _check_ingredients(self) -> None:
        for t, version in zip(self._ingredients, self._versions):
            if t.numel() and t.untyped_storage().size() == 0:
                raise RuntimeError(
                    "cce_inductor: the logits returned by a compiled region are formed when first "
                    "read, but the weight or hidden states they are made of have been freed since "
                    "the forward (e.g. a sharded parameter, gathered for the forward only). Read the "
                    "logits before it is freed, or compile with options={'defer_logits': False}."
                )
            if _version(t) != version:
                raise RuntimeError(
                    "cce_inductor: the logits returned by a compiled region are formed when first "
                    "read, and a tensor they are made of (the head's weight or the hidden states) "
                    "was modified in place since the forward, so they can no longer be formed with "
                    "the values eager mode would have returned. Read them before modifying it "
                    "(optimizer steps are handled), or compile with options={'defer_logits': False}."
                )

    def _keep_current(self, changing_ids: set[int]) -> None:
        """The ingredients given as ``changing_ids`` (ids) are about to change in place or be freed:
        keep what these logits need of their current values -- a copy of those ingredients, or the
        logits themselves where they are the smaller."""
        changing = [i for i, source in enumerate(self._sources) if source in changing_ids]
        if not changing:
            return
        copy_bytes = sum(self._ingredients[i].numel() * self._ingredients[i].element_size() for i in changing)
        if self.numel() * self.element_size() <= copy_bytes:
            self.form()
            return
        self._check_ingredients()
        with torch.no_grad():
            kept = tuple(t.clone() if i in changing else t for i, t in enumerate(self._ingredients))
        self._ingredients = kept
        self._versions = tuple(_version(t) for t in kept)
        self._sources = tuple(None if i in changing else s for i, s in enumerate(self._sources))

    # ------------------------------------------------------------------ the tensor protocol

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Below autograd: every aten op reads the formed values.
        args, kwargs = tree_map_only(DeferredLogits, DeferredLogits.form, (args, kwargs or {}))
        return func(*args, **kwargs)

    def __repr__(self, *, tensor_contents=None) -> str:
        text = repr(self.form())
        if self.grad_fn is not None:
            text = text[:-1] + f", grad_fn=<{type(self.grad_fn).__name__}>)"
        elif self.requires_grad:
            text = text[:-1] + ", requires_grad=True)"
        return text

    def __reduce_ex__(self, protocol):
        # torch.save / pickle / deepcopy store the values, as for the tensor eager mode returns.
        value = self.form().clone()
        value.requires_grad_(self.requires_grad)
        return value.__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        value = self.form().clone()
        value.requires_grad_(self.requires_grad and self.is_leaf)
        return value

    def numpy(self, *, force: bool = False):
        if self.requires_grad and not force:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")
        return self.form().numpy(force=force)

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def tolist(self):
        return self.form().tolist()

    def item(self):
        return self.form().item()

    def untyped_storage(self):
        return self.form().untyped_storage()

    def data_ptr(self) -> int:
        return self.form().data_ptr()


# id -> deferred logits not formed yet (weak: tensors compare elementwise, so no WeakSet)
_LIVE: "weakref.WeakValueDictionary[int, DeferredLogits]" = weakref.WeakValueDictionary()


def _version(t: Tensor) -> int | None:
    """``t``'s version counter; None for an inference tensor, which has none (and cannot be
    modified in place outside inference mode)."""
    return None if t.is_inference() else t._version


class _autocast_off:
    """The recipe carries its own casts: autocast (the caller's, at read time) must not add any."""

    def __init__(self, device: torch.device):
        self.ctx = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


class _FormLogits(torch.autograd.Function):
    """(recipe, like, *ingredients) -> DeferredLogits; the backward differentiates the recipe."""

    @staticmethod
    def forward(ctx, recipe: Recipe, like: Tensor, *ingredients: Tensor):
        ctx.recipe = recipe
        ctx.save_for_backward(*ingredients)  # autograd checks their versions at backward time
        return DeferredLogits(recipe, ingredients, like)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ingredients = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        leaves = [t.detach().requires_grad_(n) for t, n in zip(ingredients, needs)]
        with torch.enable_grad(), _autocast_off(grad.device):
            logits = ctx.recipe.fn(*leaves)
        wanted = [leaf for leaf, n in zip(leaves, needs) if n]
        grads = iter(torch.autograd.grad(logits, wanted, grad, allow_unused=True))
        return (None, None, *(next(grads) if n else None for n in needs))


def defer(recipe: Recipe, like: Tensor, ingredients: Sequence[Tensor], track_grad: bool = True) -> DeferredLogits:
    """Logits of ``like``'s metadata, formed from ``ingredients`` by ``recipe`` when read. With
    ``track_grad``, grad mode on and an ingredient requiring grad, gradients reaching the logits
    flow to the ingredients. An ingredient that FSDP2 frees after the forward or the backward is
    copied at once (or the logits formed, where smaller)."""
    if track_grad and torch.is_grad_enabled() and any(t.requires_grad for t in ingredients):
        logits = _FormLogits.apply(recipe, like, *ingredients)
    else:
        logits = DeferredLogits(recipe, ingredients, like)
    freed = {id(t) for t in ingredients if _freed_by_fsdp2(t)}
    if freed:
        logits._keep_current(freed)
    return logits


def _freed_by_fsdp2(t: Tensor) -> bool:
    """Whether ``t`` is an unsharded parameter of FSDP2, which frees it after the forward
    (``reshard_after_forward``) or after the backward. Reading FSDP2's state is local: no
    collective is issued (a re-gather at read time would need every rank to read)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    try:
        from torch.distributed._composable_state import _module_state_mapping

        storage = t.untyped_storage()._cdata
        for state in list(_module_state_mapping.values()):
            state = state() if isinstance(state, weakref.ref) else state
            groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
            for group in groups:
                if group is None:
                    continue
                for param in group.fsdp_params:
                    unsharded = getattr(param, "_unsharded_param", None)
                    if unsharded is t or (unsharded is not None and unsharded.untyped_storage()._cdata == storage):
                        return True
    except Exception:  # noqa: BLE001 - FSDP2's private layout moved: keep deferring (a read then raises clearly)
        return False
    return False


def _keep_before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Optimizer step pre-hook: live deferred logits made of a parameter about to change keep its
    current values (see :meth:`DeferredLogits._keep_current`)."""
    if not _LIVE:
        return
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for logits in list(_LIVE.values()):
        logits._keep_current(params)


_STEP_HOOK = None


def install_step_hook() -> None:
    """Register the optimizer pre-step hook once per process (it acts on live deferred logits only)."""
    global _STEP_HOOK
    from torch.optim import optimizer

    if _STEP_HOOK is None and hasattr(optimizer, "register_optimizer_step_pre_hook"):
        _STEP_HOOK = optimizer.register_optimizer_step_pre_hook(_keep_before_step)

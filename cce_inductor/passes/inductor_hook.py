"""Returned logits deferred for the default backend too, while ``enable()`` is on.

``enable()``'s pre-grad pass runs inside Inductor's ``compile_fx``, whose caller (Dynamo) expects
the compiled callable to return the graph's outputs unchanged, so the pass alone cannot defer
returned logits. Code that cannot name a backend -- Hugging Face Trainer / accelerate compile with
``backend="inductor"`` -- would then keep them. While a ``CCEGraphPass`` is enabled,
``torch._inductor.compile_fx.compile_fx`` (which both the ``"inductor"`` backend and
``torch.compile``'s Inductor wrapper look up at each compile) is wrapped: for a Dynamo graph it
rewrites and defers as ``backend="cce"`` does, compiles with the original, and wraps the result.
The wrapper reads the enabled options at each compile and steps aside once none is enabled
(``disable()`` or leaving the ``with`` block); it is removed when the last ``enable()`` ends,
unless something else has wrapped ``compile_fx`` since.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch._inductor.compile_fx as _compile_fx_module

from .enabling import active_options
from .rewrite import rewrite_and_defer

_state = threading.local()  # .inside: a compile_fx call of ours is in progress on this thread
_original = None


def _deferring_compile_fx(model_, example_inputs_, *args, **kwargs):
    options = active_options()
    if (
        options is None
        or not options.defer_logits
        or getattr(_state, "inside", False)
        or not isinstance(model_, torch.fx.GraphModule)
    ):
        return _original(model_, example_inputs_, *args, **kwargs)
    _state.inside = True  # compile_fx calls itself (config patches); those calls pass through
    try:
        _, deferral = rewrite_and_defer(model_.graph, options)
        model_.recompile()
        compiled = _original(model_, example_inputs_, *args, **kwargs)
    finally:
        _state.inside = False
    return compiled if deferral is None else deferral.wrap(compiled, detach=options.detach_logits)


def install() -> None:
    """Wrap ``compile_fx`` (once)."""
    global _original
    current = _compile_fx_module.compile_fx
    if getattr(current, "_cce_deferring", False):
        return
    _original = current
    wrapper = functools.wraps(current)(_deferring_compile_fx)
    wrapper._cce_deferring = True
    _compile_fx_module.compile_fx = wrapper


def uninstall_if_unused() -> None:
    """Put the original back when no rewrite is enabled and the wrapper is still the current one."""
    global _original
    current = _compile_fx_module.compile_fx
    if _original is not None and getattr(current, "_cce_deferring", False) and active_options() is None:
        _compile_fx_module.compile_fx = _original
        _original = None

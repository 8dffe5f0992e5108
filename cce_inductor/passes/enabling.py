"""``enable()`` / ``disable()``: the rewrite as Inductor's pre-grad pass for the default backend.

The pass is chained after whatever ``torch._inductor.config.pre_grad_custom_pass`` already holds,
never replacing it: torch >= 2.13 takes a list of passes there; earlier versions hold one, so the
passes are wrapped in one chaining pass. This is the path for code that cannot name a backend --
e.g. Hugging Face Trainer / accelerate accept only a fixed set of backend names, so
``torch_compile_backend="cce"`` is rejected there: call ``cce_inductor.enable()`` before training
and keep the default "inductor" backend. ``torch.compile(mode="lite")`` turns custom passes off.
"""

from __future__ import annotations

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from .graph_pass import CCEGraphPass
from .log_calls import trace_through_once_logging
from .options import Options

_TAKES_LISTS = hasattr(torch._inductor.custom_graph_pass, "get_custom_graph_passes")


class ChainedPass(CustomGraphPass):
    """Several pre-grad passes run in order, for torch versions that hold only one."""

    def __init__(self, passes):
        self.passes = tuple(passes)

    def __call__(self, graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self):
        uuids = tuple(p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes)
        return None if any(u is None for u in uuids) else uuids

    def __repr__(self) -> str:
        return f"ChainedPass({list(self.passes)})"


def _passes(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _passes(v)]
    if isinstance(value, ChainedPass):
        return list(value.passes)
    return [value]


def _compose(passes: list):
    if not passes:
        return None
    if len(passes) == 1:
        return passes[0]
    return list(passes) if _TAKES_LISTS else ChainedPass(passes)


def active_options() -> Options | None:
    """The options of the enabled rewrite, or None where it is not enabled."""
    ours = [p for p in _passes(inductor_config.pre_grad_custom_pass) if isinstance(p, CCEGraphPass)]
    return ours[-1].options if ours else None


class Enabled:
    """Returned by :func:`enable`; as a context manager, leaving it undoes that enable()."""

    def __init__(self, previous, installed, graph_pass: CCEGraphPass):
        self._previous = previous
        self._installed = installed
        self.graph_pass = graph_pass

    @property
    def options(self) -> Options:
        return self.graph_pass.options

    def __enter__(self) -> "Enabled":
        return self

    def __exit__(self, *exc) -> bool:
        current = inductor_config.pre_grad_custom_pass
        if current is self._installed:
            inductor_config.pre_grad_custom_pass = self._previous
        else:  # changed meanwhile: take out only this pass
            inductor_config.pre_grad_custom_pass = _compose(
                [p for p in _passes(current) if p is not self.graph_pass]
            )
        inductor_hook().uninstall_if_unused()
        return False

    def __repr__(self) -> str:
        return f"cce_inductor.enable({self.options})"


def enable(**options) -> Enabled:
    """Turn the rewrite on for torch.compile's default (Inductor) backend.

    ``cce_inductor.enable()`` stays on until ``cce_inductor.disable()``; ``with
    cce_inductor.enable(): ...`` turns it off again on leaving the block. Enabling again replaces
    the options; pre-grad passes configured by others stay, and run before this one (with
    ``defer_logits``, the default, the rewrite itself runs earlier still: in the wrapper of
    Inductor's ``compile_fx`` that defers returned logits, see :mod:`.inductor_hook`). transformers'
    ``logger.warning_once`` / ``info_once`` calls are then skipped in compiled code rather than
    breaking the graph (see :mod:`.log_calls`).

    Options (see :class:`Options`):
        detach_logits: logits returned by the compiled region come back detached (same values,
            ``requires_grad=False``): no N x V gradient in the backward, and no gradient through
            them. Off by default.
        exact: the op's ``exact=``: True (default) no gradient filtering, False the bounded filter.
        filter_dc: the op's ``filter_dc=`` (with exact=False: dC filtered too, recompute skipped).
        impl: the op's ``impl=`` ("auto", "triton", "torch").
        max_workspace_bytes: the op's ``max_workspace_bytes=`` ("auto", the default: a bounded logits
            workspace sized per call, and at statistics sites half of the tokens' logits kept
            for the backward; 0: the minimum memory, O(N + V)).
    """
    graph_pass = CCEGraphPass(Options.from_kwargs(**options))
    previous = inductor_config.pre_grad_custom_pass
    others = [p for p in _passes(previous) if not isinstance(p, CCEGraphPass)]
    installed = _compose(others + [graph_pass])
    inductor_config.pre_grad_custom_pass = installed
    inductor_hook().install()
    trace_through_once_logging()
    return Enabled(previous, installed, graph_pass)


def disable() -> None:
    """Turn the rewrite off; other configured pre-grad passes stay."""
    current = inductor_config.pre_grad_custom_pass
    inductor_config.pre_grad_custom_pass = _compose(
        [p for p in _passes(current) if not isinstance(p, CCEGraphPass)]
    )
    inductor_hook().uninstall_if_unused()


def inductor_hook():
    """The module that defers returned logits for the default backend (imported late: it
    imports this one)."""
    from . import inductor_hook

    return inductor_hook

"""The ``"cce"`` torch.compile backend: rewrite, then compile with Inductor.

``torch.compile(model, backend="cce")`` finds it through the ``torch_dynamo_backends`` entry point
declared in pyproject.toml, without importing cce_inductor first. The function is deliberately not
decorated with ``@register_backend`` (registering the same name twice fails).

Options: ``torch.compile(model, backend="cce", options={...})`` -- the rewrite's own keys
(``detach_logits``, ``exact``, ``filter_dc``, ``impl``, ``max_workspace_bytes``; see :class:`Options`) are taken out, every other key is an
Inductor config patch, as with the default backend; ``mode=`` maps to Inductor's mode options.
"""

from __future__ import annotations

from typing import Any

import torch

from .enabling import _compose, _passes
from .graph_pass import SourceKey
from .log_calls import trace_through_once_logging
from .options import Options
from .rewrite import rewrite_and_defer

# transformers' logger.warning_once between a head and its loss must not break the graph; torch
# gives a backend chosen by name no hook before Dynamo traces, so this runs on import (the entry
# point imports this module when torch.compile(backend="cce") is called) and at each compile.
trace_through_once_logging()


def split_options(options: dict[str, Any] | None) -> tuple[Options, dict[str, Any]]:
    """(the rewrite's options, Inductor config patches)."""
    options = dict(options or {})
    ours = {k: options.pop(k) for k in list(options) if k in Options.names()}
    return Options.from_kwargs(**ours), options


def _with_source_key():
    """Inductor's post-grad custom pass with :class:`SourceKey` chained after what it holds."""
    current = torch._inductor.config.post_grad_custom_post_pass
    passes = [p for p in _passes(current) if not isinstance(p, SourceKey)]
    return _compose([*passes, SourceKey()])


def cce_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """Rewrite the Dynamo graph's linear -> cross-entropy sites, then compile with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    mode = kwargs.pop("mode", None)
    options, patches = split_options(kwargs.pop("options", None))
    if kwargs:
        raise TypeError(f"cce backend: unexpected arguments {sorted(kwargs)}")
    if mode not in (None, "default"):
        patches = {**torch._inductor.list_mode_options(mode), **patches}
    trace_through_once_logging()  # for the next graphs, where transformers was imported since
    patches = {"post_grad_custom_post_pass": _with_source_key(), **patches}
    _, deferral = rewrite_and_defer(gm.graph, options)
    gm.recompile()
    compiled = compile_fx(gm, example_inputs, config_patches=patches or None)
    return compiled if deferral is None else deferral.wrap(compiled, detach=options.detach_logits)

"""``explain(fn, *args, **kwargs)``: what the rewrite finds in ``fn``, what it does, and why.

explain runs ``fn(*args, **kwargs)`` once under torch.compile with a capturing backend (no
Inductor; graph breaks allowed), runs the matcher and the rewrite on a copy of each captured
graph, and returns an :class:`Explanation`. It never depends on a pass having run: with torch
>= 2.12 a cached pre-grad pass does not run at all on a cache hit. The report also goes to the
logger ``"cce_inductor"`` (INFO).

The options are those of the enabled rewrite (``enable(**options)``), else the defaults.
"""

from __future__ import annotations

import copy
import logging
import types
from dataclasses import dataclass, field

import torch

from .enabling import active_options
from .options import Options
from .report import SiteReport
from .rewrite import rewrite_and_defer

log = logging.getLogger("cce_inductor")

# Sinks of the explain() calls in progress; see _capture_backend.
_SINKS: list[tuple[Options, bool, list]] = []


@dataclass
class Explanation:
    """The report of :func:`explain`: one list of sites per captured graph."""

    graphs: list[list[SiteReport]] = field(default_factory=list)
    options: Options = field(default_factory=Options)

    @property
    def sites(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g]

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "skipped"]

    @property
    def bytes_avoided(self) -> int:
        return sum(s.bytes_avoided or 0 for s in self.rewritten)

    def __str__(self) -> str:
        sites = self.sites
        lines = [
            f"cce_inductor.explain: {len(self.graphs)} graph(s), {len(sites)} loss call(s): "
            f"{len(self.rewritten)} rewritten, {len(self.skipped)} left alone; "
            f"about {_fmt_bytes(self.bytes_avoided)} of N x V tensors avoided"
        ]
        if self.options != Options():
            lines.append(f"options: {self.options}")
        for i, graph in enumerate(self.graphs):
            if len(self.graphs) > 1:
                lines.append(f"graph {i}:")
            if not graph:
                lines.append("  no loss call found")
            for site in graph:
                lines.extend(_format_site(site))
        return "\n".join(lines)

    __repr__ = __str__


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "? B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _dim(x) -> str:
    return "?" if x is None else str(x)


def _format_site(s: SiteReport) -> list[str]:
    where = f" at {s.location}" if s.location else ""
    head = f"  [{s.status}] {s.kind} ({s.anchor}){where}"
    if s.status == "skipped":
        head += f": {s.reason}"
    out = [head]
    if s.vocab is not None:
        shape = f"logits {_dim(s.tokens)} x {_dim(s.vocab)}"
        if s.logits_dtype:
            shape += f" ({s.logits_dtype})"
        if s.hidden is not None:
            shape += f", hidden {s.hidden}"
        out.append(f"      {shape}")
    if s.details:
        out.append("      " + ", ".join(f"{k}={v}" for k, v in s.details.items()))
    if s.status == "rewritten":
        out.append(f"      N x V bytes avoided: {_fmt_bytes(s.bytes_avoided)} (estimate)")
    for name in s.deferred:
        out.append(f"      returned logits {name}: deferred, formed only if read (backend=\"cce\")")
    for r in s.remaining:
        out.append(f"      stays: {r.node} {r.shape} {r.dtype} {_fmt_bytes(r.nbytes)} -- {r.why}")
    return out


def _analyse(gm: torch.fx.GraphModule, options: Options, defer: bool) -> list[SiteReport]:
    copied = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    return rewrite_and_defer(copied.graph, options, log_sites=False, defer=defer)[0]


def _capture_backend(gm: torch.fx.GraphModule, example_inputs):
    """Returns the graph to run as it is (eagerly); each run inside explain() analyses the graph.
    Analysing at run time, not at compile time, keeps the report complete when Dynamo reuses a
    graph it compiled for an earlier explain() call."""

    def run(*args):
        if _SINKS:
            options, defer, sink = _SINKS[-1]
            sink.append(_analyse(gm, options, defer))
        return gm.forward(*args)

    return run


def _trampoline(fn, args, kwargs):
    return fn(*args, **kwargs)


def explain(fn, *args, **kwargs) -> Explanation:
    """Run ``fn(*args, **kwargs)`` once under torch.compile and report, for every loss call in
    its graphs, whether the rewrite replaces it (with the shapes and the N x V bytes avoided, and
    the N x V tensors that stay because the logits escape) or leaves it alone, and why."""
    # Under enable() the report is the pre-grad pass's, which cannot defer returned logits;
    # otherwise it is backend="cce"'s.
    enabled = active_options()
    options = enabled or Options()
    # A fresh code object per call: Dynamo caches compiled frames on code objects, and the
    # trampoline of an earlier call must not be reused (or pile up entries) here.
    code = _trampoline.__code__.replace()
    trampoline = types.FunctionType(code, _trampoline.__globals__, "_cce_explain")
    compiled = torch.compile(trampoline, backend=_capture_backend)
    sink: list = []
    _SINKS.append((options, enabled is None, sink))
    try:
        compiled(fn, args, kwargs)
    finally:
        _SINKS.pop()
    result = Explanation(sink, options)
    log.info("%s", result)
    return result

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
import os
import re
import types
from dataclasses import dataclass, field

import torch

from .enabling import active_options
from .log_calls import ignore_setting, setting_usable, trace_through_once_logging
from .matcher import LOGITS_FROM_OUTSIDE
from .options import Options
from .report import SiteReport
from .rewrite import rewrite_and_defer

log = logging.getLogger("cce_inductor")

# Sinks of the explain() calls in progress; see _capture_backend.
_SINKS: list[tuple[Options, list]] = []


@dataclass
class GraphBreak:
    """Where Dynamo ended a graph before the end of the code, why, and how to avoid it."""

    location: str  # file:line of the user code where the graph ends ("" where unknown)
    cause: str  # Dynamo's reason, its first line ("" where unknown)
    fix: str = ""  # one line, where known


@dataclass
class Explanation:
    """The report of :func:`explain`: one list of sites per captured graph, and the graph breaks
    between them (a head and a loss on two sides of a break are not rewritten)."""

    graphs: list[list[SiteReport]] = field(default_factory=list)
    options: Options = field(default_factory=Options)
    breaks: list[GraphBreak] = field(default_factory=list)

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
            f"cce_inductor.explain: {len(self.graphs)} graph(s), {len(sites)} site(s): "
            f"{len(self.rewritten)} rewritten, {len(self.skipped)} left alone; "
            f"about {_fmt_bytes(self.bytes_avoided)} of N x V tensors avoided"
        ]
        if self.options != Options():
            lines.append(f"options: {self.options}")
        for i, graph in enumerate(self.graphs):
            if len(self.graphs) > 1:
                lines.append(f"graph {i}:")
            if not graph:
                lines.append("  no loss call or per-token statistic found")
            for site in graph:
                lines.extend(_format_site(site, bool(self.breaks)))
        if self.breaks:
            lines.append("graph breaks (a projection and a loss on two sides of one are not rewritten):")
        for b in self.breaks:
            where = f"at {b.location}: " if b.location else ""
            lines.append(f"  {where}{b.cause or 'cause unknown'}")
            if b.fix:
                lines.append(f"      fix: {b.fix}")
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


def _format_site(s: SiteReport, breaks: bool = False) -> list[str]:
    where = f" at {s.location}" if s.location else ""
    where += f", in {s.region}" if s.region else ""
    head = f"  [{s.status}] {s.kind} ({s.anchor}){where}"
    if s.status == "skipped":
        head += f": {s.reason}"
        if breaks and s.reason.startswith(LOGITS_FROM_OUTSIDE):
            head += " (see the graph breaks below)"
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
        out.append(f"      returned logits {name}: deferred, formed only if read")
    for r in s.remaining:
        out.append(f"      stays: {r.node} {r.shape} {r.dtype} {_fmt_bytes(r.nbytes)} -- {r.why}")
    return out


def _analyse(gm: torch.fx.GraphModule, options: Options) -> list[SiteReport]:
    copied = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for name, child in copied.named_children():  # the graphs of higher-order ops (a checkpoint's body)
        if isinstance(child, torch.fx.GraphModule):
            setattr(copied, name, copy.deepcopy(child))
    return rewrite_and_defer(copied.graph, options, log_sites=False)[0]


def _capture_backend(gm: torch.fx.GraphModule, example_inputs):
    """Returns the graph to run as it is (eagerly); each run inside explain() analyses the graph.
    Analysing at run time, not at compile time, keeps the report complete when Dynamo reuses a
    graph it compiled for an earlier explain() call."""
    ends_at = _break_location(gm)

    def run(*args):
        if _SINKS:
            options, sink = _SINKS[-1]
            sink.append((_analyse(gm, options), ends_at))
        return gm.forward(*args)

    return run


def _break_location(gm: torch.fx.GraphModule) -> str | None:
    """file:line where Dynamo ended this graph at a graph break; None where it ended normally."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    stack = getattr(reason, "user_stack", None) or []
    if not stack:
        return ""
    frame = stack[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno}"


def _break_causes(before: dict) -> list[str]:
    """Dynamo's graph-break messages recorded since ``before`` (a copy of its counter)."""
    from torch._dynamo.utils import counters

    now = counters.get("graph_break", {})
    return [msg for msg, n in now.items() if n > before.get(msg, 0)]


def _graph_break(location: str | None, message: str) -> GraphBreak:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    cause = lines[0] if lines else ""
    fix = ""
    if "logging.Logger" in message or "Logger not supported" in message:
        method = re.search(r"<Logger [^>]*>\.(\w+)", message)
        setting = ignore_setting()
        if method:
            cause = f"{cause}: logger.{method.group(1)}(...)"
        if setting is not None:
            target = f"logging.Logger.{method.group(1)}" if method else "logging.Logger.<method>"
            fix = f"torch._dynamo.config.{setting[0]}.add({target})  (the call is then skipped in compiled code"
            fix += ")" if setting_usable() else "; this torch version then logs a harmless error at each compile)"
    else:
        hint = next((line[len("Hint:") :].strip() for line in lines if line.startswith("Hint:")), "")
        fix = hint
    return GraphBreak(location or "", cause, fix)


def _trampoline(fn, args, kwargs):
    return fn(*args, **kwargs)


def explain(fn, *args, **kwargs) -> Explanation:
    """Run ``fn(*args, **kwargs)`` once under torch.compile and report, for every loss call in
    its graphs, whether the rewrite replaces it (with the shapes and the N x V bytes avoided, and
    the N x V tensors that stay because the logits escape) or leaves it alone, and why."""
    options = active_options() or Options()  # backend="cce" and enable() both defer returned logits
    trace_through_once_logging()  # as the backend and enable() do
    from torch._dynamo.utils import counters

    before = dict(counters.get("graph_break", {}))
    # A fresh code object per call: Dynamo caches compiled frames on code objects, and the
    # trampoline of an earlier call must not be reused (or pile up entries) here.
    code = _trampoline.__code__.replace()
    trampoline = types.FunctionType(code, _trampoline.__globals__, "_cce_explain")
    compiled = torch.compile(trampoline, backend=_capture_backend)
    sink: list = []
    _SINKS.append((options, sink))
    try:
        compiled(fn, args, kwargs)
    finally:
        _SINKS.pop()
    locations = [ends_at for _, ends_at in sink if ends_at is not None]
    causes = _break_causes(before)
    if len(causes) == len(locations):
        breaks = [_graph_break(loc, msg) for loc, msg in zip(locations, causes)]
    else:  # not one message per break: the causes without places, then the places
        breaks = [_graph_break(None, msg) for msg in causes] + [GraphBreak(loc, "") for loc in locations]
    result = Explanation([reports for reports, _ in sink], options, breaks)
    log.info("%s", result)
    return result

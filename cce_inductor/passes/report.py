"""What the rewrite did at each loss call: the reports explain() prints and the pass logs.

Byte counts are estimates from the graph's fake values: the N x V tensors a site's chain of nodes
owns (the projection's output, casts that change the dtype, softcap and scaling results, copies of
strided views) plus the log-softmax that cross_entropy saves for its backward. Under dynamic shapes
the sizes' hints are used; where a size has none (data-dependent), the count is unknown (None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, Node

from . import nodes as N
from .matcher import LOGITS_FROM_OUTSIDE, Match, Skip


@dataclass
class Remaining:
    """An N x V tensor of a site that stays in the graph after the rewrite."""

    node: str
    shape: tuple | None
    dtype: str
    nbytes: int | None
    why: str


@dataclass
class SiteReport:
    """What happened at one loss call."""

    anchor: str
    kind: str
    location: str
    status: str  # "rewritten" | "skipped"
    reason: str = ""
    tokens: int | None = None
    hidden: int | None = None
    vocab: int | None = None
    logits_dtype: str = ""
    details: dict = field(default_factory=dict)
    bytes_avoided: int | None = None  # N x V bytes no longer in the graph (estimate)
    remaining: list[Remaining] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # returned logits formed only when read
    region: str = ""  # where the loss call is, when inside a higher-order op's graph (a checkpoint)

    def summary(self) -> str:
        where = f" at {self.location}" if self.location else ""
        head = f"{self.kind} ({self.anchor}){where}: {self.status}"
        if self.status == "skipped":
            return f"{head} -- {self.reason}"
        return head


def in_region(reports: list[SiteReport], region: str) -> list[SiteReport]:
    """Mark reports as those of loss calls inside ``region`` (e.g. "a torch.utils.checkpoint
    region"): what the graph there returns goes back to the enclosing graph, not to the caller."""
    for report in reports:
        if report.status == "skipped" and report.reason.startswith(LOGITS_FROM_OUTSIDE) and not report.region:
            report.reason = (
                f"the logits enter {region} from outside (the projection outside it, the loss inside): "
                "the rewrite does not reach across that boundary"
            )
        report.region = report.region or region
        for rem in report.remaining:
            rem.why = rem.why.replace("returned from the compiled region", f"returned from {region}")
    return reports


def skip_report(site: Skip) -> SiteReport:
    report = SiteReport(site.anchor.name, site.kind, N.location(site.anchor), "skipped", site.reason)
    if site.projection is not None:  # the projection's output: class dim last
        z, class_dim = N.tensor_value(site.projection), -1
    else:  # the loss's input: class dim 1 (or 0 when 1-D)
        z = N.tensor_value(site.anchor.args[0]) if site.anchor.args else None
        class_dim = 1 if z is not None and z.dim() >= 2 else 0
    if z is not None and z.dim() >= 1:
        dims = list(z.shape)
        report.vocab = N.hint(dims.pop(class_dim))
        report.tokens = _numel_hint(dims)
        report.logits_dtype = _dtype_name(z.dtype)
    return report


def rewritten_report(m: Match) -> SiteReport:
    """The report of a matched site, taken before the graph changes."""
    report = SiteReport(m.anchor.name, m.kind, N.location(m.anchor), "rewritten")
    x = N.tensor_value(m.x)
    report.hidden, report.vocab = N.hint(m.hidden), N.hint(m.vocab)
    report.tokens = _numel_hint(x.shape[:-1])
    z = N.tensor_value(m.projection) if m.projection is not None else x
    report.logits_dtype = _dtype_name(z.dtype)
    report.details = _details(m)
    chain, workspace = _chain_bytes(m, set(m.chain)), _loss_workspace_bytes(m)
    report.bytes_avoided = None if chain is None or workspace is None else chain + workspace
    return report


def escapes(graph: Graph, m: Match) -> list[tuple[Node, Node]]:
    """(logits node, user) for each use of the site's logits left after the rewrite."""
    if m.projection is None:
        return []
    live = set(graph.nodes)
    alive = [n for n in m.chain if n in live]
    alive_set = set(alive)
    return [(node, user) for node in alive for user in node.users if user not in alive_set]


def note_remaining(report: SiteReport, m: Match, leaks: list[tuple[Node, Node]], detached: set) -> None:
    """Record the N x V tensors that stay, and why; take them off the bytes avoided."""
    for node, user in leaks:
        v = N.tensor_value(node)
        if user.op == "output" or user in detached:
            if node in detached:
                why = "returned from the compiled region, detached (detach_logits=True)"
            elif v is not None and v.requires_grad:
                why = (
                    "returned from the compiled region with requires_grad: the backward gets an "
                    "N x V gradient for it (use detach_logits=True if you only look at the logits)"
                )
            else:
                why = "returned from the compiled region"
        else:
            where = N.location(user)
            why = f"used by {N.describe(user)} ({user.name}{', ' + where if where else ''})"
        report.remaining.append(
            Remaining(
                node.name,
                None if v is None else tuple(N.hint(s) for s in v.shape),
                "" if v is None else _dtype_name(v.dtype),
                _nbytes(node),
                why,
            )
        )
    if leaks:
        kept = _chain_bytes(m, {node for node, _ in leaks} | _kept_upstream(m, leaks))
        if report.bytes_avoided is not None and kept is not None:
            report.bytes_avoided = max(0, report.bytes_avoided - kept)


def _kept_upstream(m: Match, leaks) -> set:
    """Chain nodes kept alive because a later one escapes (everything before it in the chain)."""
    last = max(m.chain.index(node) for node, _ in leaks)
    return set(m.chain[: last + 1])


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _details(m: Match) -> dict:
    d: dict[str, Any] = {
        "projection": N.describe(m.projection) if m.projection is not None else "F.linear_cross_entropy",
        "bias": m.bias is not None,
        "reduction": m.reduction,
        "ignore_index": m.ignore_index,
    }
    if m.shift:
        d["shift"] = m.shift
    if m.softcap is not None:
        d["softcap"] = m.softcap if not isinstance(m.softcap, Node) else m.softcap.name
    if m.scale:
        d["scale"] = [f if isinstance(f, float) else f"{'*' if f[1] == 1 else '/'}{f[0].name}" for f in m.scale]
    if m.steps:
        d["token_ops"] = [N.describe(s.node) for s in m.steps]
    if not m.weight_is_vd:
        d["weight_layout"] = "(D, V)"
    if m.no_grad:
        d["grad"] = "off (no_grad: forward only)"
    if m.parallel is not None:  # tensor_parallel.Layout
        d["parallel"] = m.parallel.describe()
    if m.class_weight is not None:
        d["class_weight"] = m.class_weight.name
    return d


def _numel_hint(shape) -> int | None:
    total = 1
    for s in shape:
        h = N.hint(s)
        if h is None:
            return None
        total *= int(h)
    return total


def _nbytes(node: Node) -> int | None:
    v = N.tensor_value(node)
    if v is None:
        return None
    v = getattr(v, "_local_tensor", v)  # a DTensor: this rank's part
    n = _numel_hint(v.shape)
    return None if n is None else n * v.element_size()


_STRIDED_VIEWS = ("getitem", "transpose", "t", "permute", "movedim")


def _materialized(m: Match) -> list[Node]:
    """The chain nodes that own N x V memory (judged from the op kinds)."""
    out, strided = [], False
    for prev, node in zip([None] + m.chain, m.chain):
        kind = N.kind_of(node)
        if prev is None:  # the projection
            out.append(node)
            continue
        pv, nv = N.tensor_value(prev), N.tensor_value(node)
        copies = False
        if kind in ("identity", "reshape", "flatten"):
            copies = node.target == "clone" or node.target is torch.clone or (strided and node.target != "view")
        elif kind == "cast":
            copies = nv.dtype != pv.dtype
        elif kind in _STRIDED_VIEWS:
            if kind == "getitem" and _has_tensor_index(node):
                copies = True
            else:
                strided = True
        elif kind not in ("squeeze", "unsqueeze", "unflatten"):
            copies = True  # value ops: scale, tanh, bias add, log_softmax
        if copies:
            out.append(node)
            strided = False
    return out


def _has_tensor_index(node: Node) -> bool:
    index = node.args[1] if len(node.args) > 1 else ()
    elements = list(index) if isinstance(index, (tuple, list)) else [index]
    return any(isinstance(e, Node) and N.tensor_value(e) is not None for e in elements)


def _chain_bytes(m: Match, subset: set) -> int | None:
    if m.projection is None:
        return 0
    total = 0
    for node in _materialized(m):
        if node in subset:
            nb = _nbytes(node)
            if nb is None:
                return None
            total += nb
    return total


def _loss_workspace_bytes(m: Match) -> int | None:
    """cross_entropy's own N x V: the log-softmax it saves for the backward (in its input's dtype)."""
    if m.kind == "nll_loss":
        return 0  # the log_softmax is a node of the chain, counted there
    if m.logits is None:  # F.linear_cross_entropy: its logits and log-softmax, in e's dtype
        x = N.tensor_value(m.x)
        n, v = _numel_hint(x.shape[:-1]), N.hint(m.vocab)
        return None if n is None or v is None else 2 * n * int(v) * x.element_size()
    return _nbytes(m.logits)

"""Replace each matched linear -> cross-entropy site by a call of ``cce_inductor.linear_cross_entropy``.

For a site matched by :mod:`.matcher`, the token-dim shape ops that stood between the projection
and the loss are replayed on the embeddings (N x D) instead of the logits (N x V); scalings become a
scaling of the embeddings (and bias), a softcap becomes the op's ``softcap=``, a label shift the
op's ``shift=``; lossless casts disappear (the op accumulates in float32 and returns a float32 loss,
cast back to the loss call's dtype where that differs). Every size stays symbolic: sizes are either
copied from the graph, read with ``size()`` nodes, or left to ``-1``. The loss call is replaced,
then the nodes that fed only it are removed (dead-code elimination limited to them).

Logits with other users (returned from the graph, argmax, ...) stay; the report says which.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from ..ops import describe_mode, linear_cross_entropy
from . import nodes as N
from . import tensor_parallel
from .deferral import Deferral, plan_deferral
from .matcher import Match, NoMatch, Skip, find_anchors, match_site, regions, skips_in
from .options import Options
from .report import SiteReport, escapes, in_region, note_remaining, rewritten_report, skip_report

log = logging.getLogger("cce_inductor")


# ----------------------------------------------------------------------------- graph level


def rewrite_graph(graph: Graph, options: Options | None = None, log_sites: bool = True) -> list[SiteReport]:
    """Rewrite every matched site of ``graph`` in place; one report per loss call, each also
    logged (INFO, logger "cce_inductor") unless ``log_sites`` is False."""
    return rewrite_and_defer(graph, options, log_sites, defer=False)[0]


def rewrite_and_defer(
    graph: Graph, options: Options | None = None, log_sites: bool = True, defer: bool = True
) -> tuple[list[SiteReport], Deferral | None]:
    """:func:`rewrite_graph`, then (with ``defer`` and the ``defer_logits`` option) the rewritten
    sites' returned logits deferred: the graph's outputs change (see :mod:`.deferral`), and the
    returned :class:`Deferral` rebuilds them around the compiled graph."""
    options = options or Options()
    # Heads read for per-token statistics (log-probs, entropy, ...) first: one linear_token_stats
    # call takes over their loss calls too; heads with loss calls only are left to the CE rewrite.
    from .token_stats_match import note_returned, rewrite_token_stats

    stats = rewrite_token_stats(graph, options)
    reports: list[SiteReport] = [report for report, _ in stats]
    applied: list[tuple[SiteReport, Match]] = []
    for anchor in find_anchors(graph):
        site = match_site(anchor)
        if isinstance(site, Match):
            report = rewritten_report(site)
            report.details["mode"] = _mode(site, report, options)
            try:
                _apply(graph, site, options)
            except NoMatch as reason:
                site = Skip(anchor, site.kind, str(reason), site.projection)
            else:
                reports.append(report)
                applied.append((report, site))
                continue
        reports.append(skip_report(site))
    stats_applied = any(report.status == "rewritten" for report, _ in stats)
    deferral = plan_deferral(graph) if defer and options.defer_logits and (applied or stats_applied) else None
    note_returned(graph, stats, deferral)
    if deferral is not None:
        for report, m in applied:
            report.deferred = [d.node for d in deferral.deferred if d.projection is m.projection]
    # Only now, with every site rewritten, is it known which logits stay.
    for report, m in applied:
        leaks = escapes(graph, m)
        detached = _detach_returned(graph, leaks) if options.detach_logits else set()
        note_remaining(report, m, leaks, detached)
    reports.extend(_rewrite_regions(graph, options))
    if log_sites:
        for report in reports:
            _log(report)
    return reports, deferral


def _mode(m: Match, report: SiteReport, options: Options) -> str:
    """How the op will compute this site's loss (``ops.describe_mode``), from the graph's fake values."""
    if m.parallel is not None:
        return tensor_parallel.describe_mode(m, options)
    x = N.tensor_value(m.x)
    z = N.tensor_value(m.projection) if m.projection is not None else x
    w = N.tensor_value(m.weight)
    if report.vocab is None or x is None or z is None:
        return "chosen per call"
    grads = not m.no_grad and (x.requires_grad or bool(w is not None and w.requires_grad))
    return describe_mode(report.tokens, int(report.vocab), z.dtype, x.device, m.reduction, grads, options.impl,
                         options.exact, options.filter_dc, options.max_workspace_bytes)


def _rewrite_regions(graph: Graph, options: Options) -> list[SiteReport]:
    """The sites in the graphs that higher-order ops of ``graph`` run: rewritten in
    ``torch.utils.checkpoint`` bodies (whose outputs are not the compiled region's: nothing there
    is detached or deferred), reported as left alone in the others."""
    inner = dataclasses.replace(options, detach_logits=False)
    reports: list[SiteReport] = []
    for module, region, enter in regions(graph):
        if enter:
            found = rewrite_and_defer(module.graph, inner, log_sites=False, defer=False)[0]
            module.recompile()
        else:
            found = [skip_report(site) for site in skips_in(module.graph, region)]
        reports.extend(in_region(found, region))
    return reports


def _log(report: SiteReport) -> None:
    log.info("cce: %s", report.summary())
    for rem in report.remaining:
        log.info("cce:   N x V tensor %s %s stays: %s", rem.node, rem.shape, rem.why)


# ----------------------------------------------------------------------------- one site


class _Builder:
    """Creates nodes before the loss call, remembering them to undo on failure."""

    def __init__(self, graph: Graph, anchor: Node):
        self.graph = graph
        self.anchor = anchor
        self.created: list[Node] = []

    def method(self, name: str, *args, **kwargs) -> Node:
        return self._add(self.graph.call_method(name, args, kwargs))

    def function(self, fn, *args, **kwargs) -> Node:
        return self._add(self.graph.call_function(fn, args, kwargs))

    def _add(self, node: Node) -> Node:
        for key in ("stack_trace", "nn_module_stack"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        self.created.append(node)
        return node

    def undo(self) -> None:
        for node in reversed(self.created):
            self.graph.erase_node(node)


def _apply(graph: Graph, m: Match, options: Options) -> None:
    anchor = m.anchor
    b = _Builder(graph, anchor)
    try:
        with graph.inserting_before(anchor):
            exits = _enter_projection_autocast(b, m)
            if m.shift:
                e, targets = m.x, m.shift_targets
            elif m.projection is None:  # F.linear_cross_entropy: its input is the embeddings
                e, targets = m.x, m.targets
            else:
                e, targets = _replay_on_embeddings(b, m), m.targets
            e = _scale(b, e, m.scale)
            bias = m.bias
            if bias is not None and N.tensor_value(bias).dim() != 1:  # (1, V): one value per class
                bias = b.method("reshape", bias, -1)
            bias = _scale(b, bias, m.scale) if bias is not None else None
            weight = m.weight if m.weight_is_vd else b.method("t", m.weight)
            kwargs: dict[str, Any] = {"ignore_index": m.ignore_index, "reduction": m.reduction}
            if m.softcap is not None:
                kwargs["softcap"] = m.softcap
            if m.shift:
                kwargs["shift"] = m.shift
            if not (isinstance(m.label_smoothing, (int, float)) and m.label_smoothing == 0):
                kwargs["label_smoothing"] = m.label_smoothing
            if m.class_weight is not None:
                if m.parallel is not None:
                    raise NoMatch("class weights (weight=) with a vocabulary-parallel head: not supported")
                if m.softcap is not None and "label_smoothing" in kwargs:
                    raise NoMatch("class weights (weight=) with label smoothing and a softcap: not supported")
                kwargs["weight"] = m.class_weight
            kwargs["impl"] = options.impl
            kwargs["exact"] = options.exact
            if options.filter_dc:
                kwargs["filter_dc"] = True
            if options.max_workspace_bytes:  # "auto" or a budget; 0 and None: the op's default, exact
                kwargs["max_workspace_bytes"] = options.max_workspace_bytes
            if m.grad_off:  # the projection ran under no_grad, the loss does not: the op as the projection
                b.function(torch._C._set_grad_enabled, False)
            fn = linear_cross_entropy
            if m.parallel is not None:  # a DTensor head split over the vocabulary
                fn, kwargs = tensor_parallel.site_call(m, kwargs)
            out = b.function(fn, e, weight, targets, bias, **kwargs)
            if m.shift_reshape:
                out = b.method("reshape", out, -1)
            if m.out_dtype != torch.float32:
                out = b.method("to", out, m.out_dtype)
            if m.grad_off:
                b.function(torch._C._set_grad_enabled, True)
            for enter in reversed(exits):
                b.function(N.AUTOCAST_EXIT, enter)
    except NoMatch:
        b.undo()
        raise
    except Exception as error:  # leave the graph as it was rather than break compilation
        b.undo()
        log.warning("cce: rewriting %s failed; the site is left alone", anchor.name, exc_info=True)
        raise NoMatch(f"internal error while rewriting: {error!r}") from error
    _propagate_meta(b.created)
    inputs = anchor.all_input_nodes
    anchor.replace_all_uses_with(out)
    graph.erase_node(anchor)
    _prune(graph, inputs)


def _replay_on_embeddings(b: _Builder, m: Match) -> Node:
    """Apply the logits' token-dim shape ops to the embeddings: e has the loss input's layout with
    the class dim (V) replaced by the hidden dim (D), moved last."""
    hidden = _hidden_size(b, m)
    counterpart: dict[Node, Node] = {m.projection: m.x}
    class_pos: dict[Node, int] = {m.projection: N.tensor_value(m.projection).dim() - 1}
    steps = {s.node: s for s in m.steps}
    cur = m.x
    for prev, node in zip(m.chain, m.chain[1:]):
        step = steps.get(node)
        if step is None:  # a value op, a cast or contiguous: the layout is unchanged
            counterpart[node], class_pos[node] = cur, class_pos[prev]
            continue
        remap = _size_remapper(b, counterpart, class_pos, hidden)
        if step.kind == "reshape":
            shape = N.varargs(node, 1, "shape")
            cur = b.method("reshape", cur, *[remap(s) for s in shape[:-1]], hidden)
        elif N.is_transpose_attr(node):  # x.T reverses the dims, x.mT swaps the last two
            if node.args[1] == "mT":
                cur = b.method("transpose", cur, -2, -1)
            else:
                cur = b.method("permute", cur, *reversed(range(N.tensor_value(node).dim())))
        elif node.op == "call_method":
            cur = b.method(node.target, cur, *map_arg(tuple(node.args[1:]), remap), **map_arg(dict(node.kwargs), remap))
        else:
            cur = b.function(node.target, cur, *map_arg(tuple(node.args[1:]), remap), **map_arg(dict(node.kwargs), remap))
        counterpart[node], class_pos[node] = cur, step.class_out
    if m.class_dim != N.tensor_value(m.logits).dim() - 1:
        cur = b.method("movedim", cur, m.class_dim, -1)
    return cur


def _hidden_size(b: _Builder, m: Match):
    d = m.hidden
    if isinstance(d, int):
        return d
    return b.method("size", m.weight, 1 if m.weight_is_vd else 0)


def _size_remapper(b: _Builder, counterpart: dict, class_pos: dict, hidden):
    """Arguments that read a size of the logits read it from the embeddings instead, so that the
    logits are not kept alive for their shape."""

    def remap(arg: Node):
        if N.is_kind(arg, "size") and len(arg.args) >= 2 and arg.args[0] in counterpart:
            src = arg.args[0]
            dim = N.normalize_dim(arg.args[1], N.tensor_value(src).dim())
            if dim is None:
                return arg
            if dim == class_pos[src]:
                raise NoMatch("a reshape reads the vocabulary size from the logits")
            return b.method("size", counterpart[src], dim)
        if arg in counterpart:
            raise NoMatch(f"{arg.name} is used as an argument of a shape op")
        return arg

    return remap


def _scale(b: _Builder, t: Node, factors) -> Node:
    for f in factors:
        if isinstance(f, float):
            t = b.function(operator.mul, t, f)
        else:
            node, exp = f
            t = b.function(operator.mul if exp == 1 else operator.truediv, t, node)
    return t


# ----------------------------------------------------------------------------- autocast


def _autocast_stack(graph: Graph, target: Node) -> tuple[Node, ...]:
    stack: list[Node] = []
    for node in graph.nodes:
        if node is target:
            return tuple(stack)
        if N.is_kind(node, "autocast_enter"):
            stack.append(node)
        elif N.is_kind(node, "autocast_exit") and node.args and node.args[0] in stack:
            stack.remove(node.args[0])
    return tuple(stack)


def _enter_projection_autocast(b: _Builder, m: Match) -> list[Node]:
    """Where the projection ran under another autocast state than the loss (``with autocast():``
    around the model, the loss outside), run the op under the projection's state, as F.linear
    was: re-enter the projection's autocast regions (and disable those only the loss is in)."""
    if m.projection is None:
        return []
    at_proj = _autocast_stack(b.graph, m.projection)
    at_loss = _autocast_stack(b.graph, m.anchor)
    if at_proj == at_loss:
        return []
    if not (at_proj or at_loss):
        return []
    devices_proj = {n.args[0] for n in at_proj}
    enters = [b.function(node.target, *node.args, **node.kwargs) for node in at_proj]
    for device in dict.fromkeys(n.args[0] for n in at_loss):
        if device not in devices_proj:
            enters.append(b.function(N.AUTOCAST_ENTER, device, None, False, None))
    return enters


# ----------------------------------------------------------------------------- escaping logits


def _detach_returned(graph: Graph, leaks) -> set:
    """detach_logits: the graph returns ``logits.detach()`` instead of logits that require grad."""
    detached = set()
    for node, user in leaks:
        v = N.tensor_value(node)
        if user.op != "output" or node in detached or v is None or not v.requires_grad:
            continue
        with graph.inserting_before(user):
            new = graph.call_method("detach", (node,))
        new.meta["example_value"] = v.detach()
        user.replace_input_with(node, new)
        detached.add(node)
    return detached


# ----------------------------------------------------------------------------- cleanup and metadata


def _prune(graph: Graph, roots) -> None:
    """Erase nodes left without users by the rewrite (only those reachable from ``roots``)."""
    work = list(roots)
    while work:
        node = work.pop()
        if getattr(node, "_erased", False) or node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.users or node.is_impure():
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        work.extend(inputs)


def _propagate_meta(created: list[Node]) -> None:
    """Best effort: give new nodes an ``example_value`` by running them on the fake values, for
    passes that run after this one. Nothing downstream in Inductor depends on it."""
    fake_mode = None
    for node in created:
        for inp in node.all_input_nodes:
            v = N.tensor_value(inp)
            fake_mode = fake_mode or getattr(v, "fake_mode", None)
    if fake_mode is None:
        return
    grad = torch.is_grad_enabled()
    for node in created:
        if N.is_kind(node, "autocast_enter") or N.is_kind(node, "autocast_exit"):
            continue
        if N.is_kind(node, "set_grad_enabled"):  # not run here: it would set this process's mode
            grad = bool(node.args[0])
            continue
        try:
            args = map_arg(node.args, N.value)
            kwargs = map_arg(node.kwargs, N.value)
            with fake_mode, torch.set_grad_enabled(grad):
                if node.op == "call_method":
                    val = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    val = node.target(*args, **kwargs)
            node.meta["example_value"] = val
        except Exception:  # noqa: BLE001 - metadata is optional
            return

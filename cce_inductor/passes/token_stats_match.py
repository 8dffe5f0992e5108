"""Per-token statistics of a linear head, found in unmodified code: one ``linear_token_stats`` call.

RL and evaluation code computes, from materialized logits, per-token log-probabilities of given
tokens, the softmax's entropy, the arg-max and the log-sum-exp, in many spellings. This module
anchors on a projection (``F.linear`` / ``x @ W.T`` / ``torch.matmul``, as :mod:`.matcher` reads
them) and follows everything the graph does with its output:

* the logits themselves (``Z``): the projection, then scaling by a number or a scalar tensor (a
  temperature, learnable or not) or by a tensor of one value per token, one softcap, a bias right
  after the projection, lossless casts, ``contiguous``, token-dim views / reshapes / slices and the
  pieces of ``split`` / ``chunk`` (the class dim stays last);
* log-softmax-like values (``LS``): ``log_softmax(Z, -1)``, ``Z - Z.logsumexp(-1, keepdim=True)``
  (``Categorical``'s normalization), its ``clamp(min=finfo.min)``, token views of these;
* softmax-like values (``SM``): ``softmax(Z, -1)``, ``softmax(LS, -1)``, ``LS.exp()``;
* products ``SM * LS`` and ``SM * Z``;

and recognizes the per-token results (the *consumers*), each replaced by a field of the op's
result: ``gather`` / ``take_along_dim`` of an ``LS`` (log-probability; also through
``Categorical.log_prob``'s ``broadcast_tensors``), ``gather`` of ``Z`` (target logit = logprob +
lse), ``logsumexp(Z, -1)`` (lse), ``sum(SM * LS, -1)`` (-entropy), ``sum(SM * Z, -1)`` (lse -
entropy), ``argmax(Z, -1)``, and ``cross_entropy`` / ``nll_loss`` without class weights or
smoothing (-logprob, reduced as the call does) -- the latter only together with another consumer:
a head whose only consumers are losses is left to the cross-entropy rewrite.

A head is rewritten only when every use of each of these N x V values is recognized (else the
logits are needed anyway: the site is left alone and the report names the operation that stopped
it), the scalings agree on every path, and every log-probability reads one targets tensor (up to
views, and the same slices as its logits). The op is called once, on the embeddings replayed to
the layout the consumers share (the deepest logits node on all their paths); the views, slices
and split pieces below it are replayed on the results. Returned logits (with ``defer_logits``)
stay for :mod:`.deferral`, which defers them as it does those of a rewritten loss.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from ..token_stats import describe_mode, linear_token_stats
from . import nodes as N
from .matcher import (
    SUPPORTED_DTYPES,
    Match,
    NoMatch,
    ShapeStep,
    _bias_add,
    _check_no_mutation_between,
    _class_in,
    _factor,
    _interpret_values,
    _projection,
    _PRECISION,
)
from .options import Options
from .report import Remaining, SiteReport

log = logging.getLogger("cce_inductor")

KIND = "token_stats"
_RESHAPES = ("reshape", "flatten", "unflatten", "squeeze", "unsqueeze")
_FIELDS = {"logprob": 0, "entropy": 1, "argmax": 2, "lse": 3}

# Operations of the forms, in both spellings (call_function targets, call_method names).
_OPS: dict[str, tuple[tuple, tuple[str, ...]]] = {
    "softmax": ((F.softmax, torch.softmax), ("softmax",)),
    "logsumexp": ((torch.logsumexp,), ("logsumexp",)),
    "argmax": ((torch.argmax,), ("argmax",)),
    "gather": ((torch.gather,), ("gather",)),
    "take_along_dim": ((torch.take_along_dim,), ("take_along_dim",)),
    "sub": ((operator.sub, torch.sub, torch.subtract), ("sub", "subtract", "__sub__")),
    "exp": ((torch.exp,), ("exp",)),
    "clamp": ((torch.clamp, torch.clip, torch.clamp_min), ("clamp", "clip", "clamp_min")),
    "sum": ((torch.sum,), ("sum",)),
    "broadcast_tensors": ((torch.broadcast_tensors, torch.functional.broadcast_tensors), ()),
    "split": ((torch.split, torch.chunk), ("split", "chunk")),
    "max": ((torch.max,), ("max",)),
}


def _is(node: Any, op: str) -> bool:
    if not isinstance(node, Node):
        return False
    functions, methods = _OPS[op]
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    return node.op == "call_method" and node.target in methods


# ----------------------------------------------------------------------------- what is found


@dataclass
class _Z:
    """A node holding the logits (the projection's output after value ops and views)."""

    node: Node
    parent: "_Z | None"
    values: list  # ("scale", factor) | ("tanh",), projection -> here
    bias: Node | None
    steps: list[ShapeStep]  # token-dim shape ops, projection -> here
    token_scales: tuple = ()  # (per-token factor node, the layout it applies in)

    @property
    def layout(self) -> tuple:
        """The token layout, compared by the steps' operations (``z[..., 2, :]`` written twice is
        one layout): their kind, target and arguments other than the logits."""
        return tuple(_step_key(s.node) if s.kind != "split" else _step_key(s.node.args[0]) + (s.node.args[1],)
                     for s in self.steps)


def _step_key(node: Node) -> tuple:
    return (node.op, node.target, _hashable(node.args[1:]), _hashable(node.kwargs))


def _hashable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_hashable(e) for e in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, slice):
        return ("slice", _hashable(x.start), _hashable(x.stop), _hashable(x.step))
    return x


@dataclass
class Consumer:
    """A per-token result the op's fields replace."""

    node: Node  # the node replaced
    kind: str  # logprob | target_logit | lse | neg_entropy | sum_pz | argmax | loss
    z: _Z  # the logits it is computed from (its layout)
    targets: Node | None = None  # as the consumer reads them (its layout, maybe with a trailing 1)
    keepdim: bool = False  # the result has a trailing dim of 1
    reduction: str = "none"  # for "loss"
    ignore_index: int = -100  # for "loss"


@dataclass
class StatsSite:
    projection: Node
    x: Node
    weight: Node
    weight_is_vd: bool
    bias: Node | None
    zs: dict  # node -> _Z
    derived: set  # LS / SM / product / broadcast nodes: N x V values that die with the rewrite
    consumers: list[Consumer]
    problem: str | None = None  # why the site is left alone
    trunk: list[Node] = field(default_factory=list)  # projection -> the op's layout node
    scale: list = field(default_factory=list)
    softcap: Any = None
    targets_base: Node | None = None
    ignore_index: int = -100
    kinds: dict = field(default_factory=dict)  # derived node -> (role, _Z), filled by the walk
    layout_node: Node | None = None  # the logits node whose layout the op computes in
    insert_after: Node | None = None  # the op goes right after this node (its last input)
    problems: list = field(default_factory=list)  # reasons met on the walks, first first
    ls_views: dict = field(default_factory=dict)  # token views of a log-softmax -> their layout (_Z)
    splits: set = field(default_factory=set)  # split / chunk nodes of the logits (their pieces are logits)
    returned: set = field(default_factory=set)  # logits nodes the graph returns (deferred where they can be)
    allow_return: bool = False  # returned logits may stay (the defer_logits option)

    @property
    def stat_consumers(self) -> list[Consumer]:
        return [c for c in self.consumers if c.kind != "loss"]


# ----------------------------------------------------------------------------- entry point


def rewrite_token_stats(graph: Graph, options: Options) -> list[tuple[SiteReport, StatsSite]]:
    """Rewrite every head of ``graph`` whose logits feed only recognized per-token statistics
    (with at least one that is not a loss call); (report, site) for each such head, rewritten or
    not. With ``defer_logits`` the logits may also be returned: they stay in the graph for
    :func:`.deferral.plan_deferral`, then :func:`note_returned` says what became of them."""
    found = []
    for node in list(graph.nodes):
        if getattr(node, "_erased", False) or _projection(node) is None:
            continue
        site = find_site(node, allow_return=options.defer_logits)
        if site is None:
            continue
        report = _report(site)
        if site.problem is None:
            try:
                _apply(graph, site, options)
            except NoMatch as reason:
                report.status, report.reason = "skipped", str(reason)
            else:
                report.status = "rewritten"
                report.details["mode"] = _mode(site, report, options)
        found.append((report, site))
    return found


def note_returned(graph: Graph, found: list[tuple[SiteReport, StatsSite]], deferral) -> None:
    """Record, in the reports of rewritten sites, the returned logits deferred and those that stay."""
    live = set(graph.nodes)
    for report, site in found:
        if report.status != "rewritten":
            continue
        if deferral is not None:
            report.deferred = [d.node for d in deferral.deferred if d.projection is site.projection]
        for node in site.zs:
            if node not in live or not any(u.op == "output" for u in node.users):
                continue
            v = N.tensor_value(node)
            shape = tuple(N.hint(d) for d in v.shape)
            nbytes = None if None in shape else math.prod(int(d) for d in shape) * v.element_size()
            why = "returned from the compiled region (not deferred: formed, and kept for the caller)"
            report.remaining.append(Remaining(node.name, shape, str(v.dtype).replace("torch.", ""), nbytes, why))
            if report.bytes_avoided is not None and nbytes is not None:
                report.bytes_avoided = max(0, report.bytes_avoided - nbytes)


def find_site(projection: Node, allow_return: bool = False) -> StatsSite | None:
    """The statistics site of a projection; None where none of its uses is a statistic (the
    cross-entropy rewrite's business, or no head at all). A site with ``problem`` set is left alone."""
    x, w, is_vd, bias = _projection(projection)
    site = StatsSite(projection, x, w, is_vd, bias, {}, set(), [], allow_return=allow_return)
    try:
        _walk_logits(site)
        _walk_derived(site)
    except NoMatch as reason:
        site.problem = str(reason)
    except Exception as error:  # a graph misread must not break compilation
        log.warning("cce: reading the uses of %s failed; left alone", projection.name, exc_info=True)
        site.problem = f"internal error while matching: {error!r}"
    if not site.stat_consumers:
        return None
    if site.problem is None:
        try:
            _check_site(site)
        except NoMatch as reason:
            site.problem = str(reason)
        except Exception as error:
            log.warning("cce: checking the statistics of %s failed; left alone", projection.name, exc_info=True)
            site.problem = f"internal error while matching: {error!r}"
    return site


# ----------------------------------------------------------------------------- the walks


def _walk_logits(site: StatsSite) -> None:
    """The tree of logits nodes: the projection and what passes its values on unchanged in kind."""
    root = _Z(site.projection, None, [], site.bias, [])
    site.zs[site.projection] = root
    work = [root]
    while work:
        z = work.pop()
        for user in z.node.users:
            if _is(user, "split") and user.args and user.args[0] is z.node:
                try:
                    work.extend(_split_pieces(site, z, user))
                except NoMatch as reason:
                    site.problems.append(str(reason))
                continue
            try:
                child = _logits_child(site, z, user)
            except NoMatch as reason:  # the derived walk meets this use again; the first reason is kept
                site.problems.append(str(reason))
                continue
            if child is not None and user not in site.zs:
                site.zs[user] = child
                work.append(child)


def _split_dim(node: Node, ndim: int) -> int | None:
    """The dim a ``split`` / ``chunk`` call cuts (normalized), None where not known when compiling."""
    return N.normalize_dim(N.arg(node, 2, "dim", 0), ndim)


def _split_pieces(site: StatsSite, z: _Z, split: Node) -> list[_Z]:
    """The pieces of ``z.split(...)`` / ``z.chunk(...)`` along a token dim: logits, each a view."""
    v = N.tensor_value(z.node)
    dim = _split_dim(split, v.dim())
    if dim is None or dim == v.dim() - 1 or "input" in split.kwargs or "tensor" in split.kwargs:
        raise NoMatch(
            f"{N.describe(split)} ({split.name}) cuts the logits along the vocabulary dim (or a dim not known)"
        )
    pieces = []
    for g in split.users:
        if not (N.is_kind(g, "getitem") and isinstance(g.args[1], int)):
            raise NoMatch(f"{_what(g)} uses the pieces of {split.name} as a sequence: not supported")
        last = N.tensor_value(g).dim() - 1
        step = ShapeStep(g, "split", z.node, last, last)
        piece = _Z(g, z, z.values, z.bias, z.steps + [step], z.token_scales)
        site.zs[g] = piece
        pieces.append(piece)
    site.splits.add(split)
    return pieces


def _logits_child(site: StatsSite, z: _Z, user: Node) -> _Z | None:
    """``user`` as logits made from ``z`` (a value op, a cast, a view); None where it is not."""
    kind = N.kind_of(user)
    t, iv = N.tensor_value(user), N.tensor_value(z.node)
    if t is None or iv is None or kind is None:
        return None
    if kind in _RESHAPES or kind == "getitem":
        if not user.args or user.args[0] is not z.node:
            return None
        ci = _class_in(user, kind, t.dim() - 1, iv, t)  # raises where the class dim is touched
        return _Z(user, z, z.values, z.bias, z.steps + [ShapeStep(user, kind, z.node, ci, t.dim() - 1)], z.token_scales)
    if kind in ("identity", "cast"):
        if not user.args or user.args[0] is not z.node:
            return None
        if not (t.is_floating_point() and t.device == iv.device and N.same_shape(t.shape, iv.shape)):
            raise NoMatch(f"{N.describe(user)} ({user.name}) does more to the logits than change their dtype")
        if _PRECISION.get(t.dtype, 0) < _PRECISION.get(iv.dtype, 0) or (
            _PRECISION.get(t.dtype) == _PRECISION.get(iv.dtype) and t.dtype != iv.dtype
        ):
            raise NoMatch(f"{N.describe(user)} ({user.name}) casts the logits to {t.dtype}, which loses precision")
        return _Z(user, z, z.values, z.bias, z.steps, z.token_scales)
    if kind in ("mul", "div", "neg"):
        if kind == "div" and (not user.args or user.args[0] is not z.node):
            return None
        if kind in ("mul", "div") and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is z.node else user.args[0]
            ov = N.tensor_value(other)
            if ov is not None and ov.dim() >= 1:
                if not _per_token(ov, iv, t):
                    return None  # a product with a tensor: maybe softmax * z (see _walk_derived)
                factor = (other, 1 if kind == "mul" else -1)  # a temperature per token: e scaled per row
                return _Z(user, z, z.values + [("scale", factor)], z.bias, z.steps,
                          z.token_scales + ((other, z.layout),))
        return _Z(user, z, z.values + [("scale", _factor(user, kind, z.node))], z.bias, z.steps, z.token_scales)
    if kind == "tanh":
        return _Z(user, z, z.values + [("tanh",)], z.bias, z.steps, z.token_scales)
    if kind == "add" and z.node is site.projection:
        bias, _ = _bias_add(user, z.node)
        return _Z(user, z, z.values, bias, z.steps, z.token_scales)
    return None


def _per_token(factor: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> bool:
    """A floating tensor of one value per token, (tokens..., 1), that leaves the logits' shape."""
    return (factor.is_floating_point() and factor.dim() == z.dim() and N.same_size(factor.shape[-1], 1)
            and N.same_shape(factor.shape[:-1], z.shape[:-1]) and N.same_shape(out.shape, z.shape)
            and factor.device == z.device)


def _walk_derived(site: StatsSite) -> None:
    """Every use of the logits nodes, and of what is derived from them, recognized or NoMatch."""
    kinds = site.kinds  # derived node -> ("LS" | "SM" | "PLOGP" | "PZ" | "BT" | "BT0" | "IDX", z)
    seen_consumers: set[Node] = set()
    problems = site.problems
    work: list[Node] = list(site.zs)
    while work:
        node = work.pop()
        for user in node.users:
            if user in site.zs or user in kinds or user in seen_consumers or user in site.splits:
                continue
            try:
                if user.op == "output" and node in site.zs and site.allow_return:
                    site.returned.add(node)  # stays for the caller: deferred after the rewrite where it can be
                    continue
                if user.op == "output":
                    raise NoMatch(f"{node.name} (the logits or made from them) is returned from the compiled region"
                                  + ("" if node in site.zs else " (only the logits themselves can be deferred)"))
                found = _classify(site, node, user)
            except NoMatch as reason:  # go on: the report of a site needs its statistics
                problems.append(str(reason))
                continue
            if isinstance(found, Consumer):
                site.consumers.append(found)
                seen_consumers.add(user)
            else:
                kinds[user] = found
                site.derived.add(user)
                work.append(user)
    if problems:
        raise NoMatch(problems[0])


def _role(site: StatsSite, node: Any) -> tuple | None:
    """("Z", z) / ("LS", z) / ("SM", z) where ``node`` is structurally one of those; else None."""
    if not isinstance(node, Node):
        return None
    if node in site.zs:
        return ("Z", site.zs[node])
    z = _ls_of(site, node)
    if z is not None:
        return ("LS", z)
    z = _sm_of(site, node)
    if z is not None:
        return ("SM", z)
    return None


def _last_dim(node: Node, index: int, name: str, ndim: int, default=None) -> bool:
    d = N.arg(node, index, name, default)
    if isinstance(d, (tuple, list)) and len(d) == 1:
        d = d[0]
    return N.normalize_dim(d, ndim) == ndim - 1 if ndim else False


def _ls_of(site: StatsSite, node: Node) -> _Z | None:
    """The logits whose log-softmax ``node`` is (for a view of one: its layout)."""
    if node in site.ls_views:
        return site.ls_views[node]
    if N.is_kind(node, "log_softmax") and node.args and node.args[0] in site.zs:
        v = N.tensor_value(node.args[0])
        dtype = node.kwargs.get("dtype", node.args[3] if len(node.args) > 3 else None)
        if dtype not in (None, torch.float32) or v is None or not _last_dim(node, 1, "dim", v.dim()):
            return None
        return site.zs[node.args[0]]
    if _is(node, "sub") and len(node.args) == 2 and node.args[0] in site.zs:
        zn, lse = node.args
        v = N.tensor_value(zn)
        if (_is(lse, "logsumexp") and lse.args and lse.args[0] is zn and N.arg(lse, 2, "keepdim", False) is True
                and v is not None and _last_dim(lse, 1, "dim", v.dim())
                and N.same_shape(N.tensor_value(node).shape, v.shape)):
            return site.zs[zn]
        return None
    if _is(node, "clamp") and node.args:
        z = _ls_of(site, node.args[0])
        low = N.arg(node, 1, "min")
        hi = N.arg(node, 2, "max")
        v = N.tensor_value(node.args[0])
        finite = isinstance(low, float) and v is not None and low <= torch.finfo(v.dtype).min
        if z is not None and hi is None and finite:
            return z  # finite log-probabilities are never below finfo.min: values unchanged
        return None
    if N.is_kind(node, "getitem") and node.args and node.args[1] == 1 and _is(node.args[0], "broadcast_tensors"):
        bt = node.args[0]
        if len(bt.args) == 2 and not bt.kwargs:
            z = _ls_of(site, bt.args[1])
            if z is not None and N.same_shape(N.tensor_value(node).shape, N.tensor_value(bt.args[1]).shape):
                return z
    return None


def _sm_of(site: StatsSite, node: Node) -> _Z | None:
    """The logits whose softmax ``node`` is."""
    if _is(node, "softmax") and node.args:
        src = node.args[0]
        v = N.tensor_value(src)
        dtype = node.kwargs.get("dtype")
        if v is None or dtype not in (None, torch.float32) or not _last_dim(node, 1, "dim", v.dim()):
            return None
        if src in site.zs:
            return site.zs[src]
        return _ls_of(site, src)  # softmax is shift-invariant: softmax(log_softmax(z)) = softmax(z)
    if _is(node, "exp") and node.args:
        return _ls_of(site, node.args[0])
    return None


def _what(user: Node) -> str:
    where = N.location(user)
    return f"{N.describe(user)} ({user.name}{', ' + where if where else ''})"


def _classify(site: StatsSite, node: Node, user: Node):
    """A use of a logits or derived node: a Consumer, or the role of a derived node; NoMatch else."""
    role = _role(site, node) or site.kinds.get(node)
    kind, z = role if role is not None else (None, None)
    v = N.tensor_value(node)
    ndim = v.dim() if v is not None else 0

    # a token view or slice of a log-softmax (nll_loss(log_softmax(z).view(-1, V), ...), DPO's halves of
    # a batch): a log-softmax in that layout
    if kind == "LS" and N.kind_of(user) in _RESHAPES + ("getitem",) and user.args and user.args[0] is node:
        t = N.tensor_value(user)
        ci = _class_in(user, N.kind_of(user), t.dim() - 1, v, t)
        view = _Z(user, z, z.values, z.bias, z.steps + [ShapeStep(user, N.kind_of(user), node, ci, t.dim() - 1)],
                  z.token_scales)
        site.ls_views[user] = view
        return ("LS", view)
    # derived nodes, recognized structurally
    for test, name in ((_ls_of, "LS"), (_sm_of, "SM")):
        got = test(site, user)
        if got is not None:
            return (name, got)
    if N.is_kind(user, "mul") and len(user.args) == 2:
        a, b = (_role(site, x) for x in user.args)
        if a and b and {a[0], b[0]} in ({"SM", "LS"}, {"SM", "Z"}) and a[1].layout == b[1].layout:
            out = N.tensor_value(user)
            if all(N.same_shape(N.tensor_value(x).shape, out.shape) for x in user.args):
                zz = a[1] if a[0] != "SM" else b[1]
                return ("PLOGP" if {a[0], b[0]} == {"SM", "LS"} else "PZ", zz)
    if _is(user, "broadcast_tensors") and kind == "LS" and len(user.args) == 2 and user.args[1] is node:
        value = N.tensor_value(user.args[0])
        if (value is not None and not value.is_floating_point() and value.dim() == ndim
                and N.same_size(value.shape[-1], 1) and N.same_shape(value.shape[:-1], v.shape[:-1])):
            return ("BT", z)
    if kind == "BT" and N.is_kind(user, "getitem") and user.args[1] == 0:
        return ("BT0", z)
    if kind == "BT0" and N.is_kind(user, "getitem") and _is_first_column(user.args[1]):
        return ("IDX", z)

    # consumers
    if kind == "MAX" and N.is_kind(user, "getitem") and user.args[1] == 1:
        return Consumer(user, "argmax", z, keepdim=bool(N.arg(node, 2, "keepdim", False)))
    if kind == "MAX" and N.is_kind(user, "getitem") and user.args[1] == 0:
        raise NoMatch(f"{_what(user)} reads the largest logit of each token: not a statistic the op gives")
    if kind in ("PLOGP", "PZ"):
        if _is(user, "sum") and user.args and user.args[0] is node and _last_dim(user, 1, "dim", ndim) \
                and user.kwargs.get("dtype") is None and len(user.args) <= 3:
            keep = N.arg(user, 2, "keepdim", False)
            return Consumer(user, "neg_entropy" if kind == "PLOGP" else "sum_pz", z, keepdim=bool(keep))
    if kind in ("LS", "IDX", "Z"):
        got = _gather(site, user)
        if got is not None:
            return got
    if kind == "Z":
        if _is(user, "logsumexp") and user.args[0] is node and _last_dim(user, 1, "dim", ndim):
            return Consumer(user, "lse", z, keepdim=bool(N.arg(user, 2, "keepdim", False)))
        if _is(user, "argmax") and user.args[0] is node and _last_dim(user, 1, "dim", ndim):
            return Consumer(user, "argmax", z, keepdim=bool(N.arg(user, 2, "keepdim", False)))
        if _is(user, "max") and user.args[0] is node and isinstance(N.arg(user, 1, "dim"), int) \
                and _last_dim(user, 1, "dim", ndim):
            return ("MAX", z)  # (values, indices): the indices are the arg-max
        if N.is_kind(user, "cross_entropy") and user.args and user.args[0] is node:
            return _loss(user, F.cross_entropy, z, ndim)
    if kind == "LS" and N.is_kind(user, "nll_loss") and user.args and user.args[0] is node:
        return _loss(user, F.nll_loss, z, ndim)
    if N.is_kind(user, "size") or (user.op == "call_function" and user.target is getattr):
        raise NoMatch(f"{_what(user)} reads the size of the logits ({node.name}): not supported for token statistics")
    raise NoMatch(
        f"{_what(user)} uses {'the logits' if kind == 'Z' else node.name + ' (made from the logits)'}: not a "
        "per-token statistic the rewrite knows (log-probability, entropy, arg-max, log-sum-exp)"
    )


def _is_first_column(index: Any) -> bool:
    """``[..., :1]``: Categorical.log_prob's index into its broadcast values."""
    return (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
            and index[1].start in (None, 0) and index[1].stop == 1 and index[1].step in (None, 1))


def _gather(site: StatsSite, user: Node) -> Consumer | None:
    """``gather(src, -1, index)`` / ``take_along_dim(src, index, -1)`` of an LS (logprob) or Z
    (target logit), the index shaped (tokens..., 1); the targets read through Categorical's
    ``broadcast_tensors`` where the index comes from it."""
    if _is(user, "gather"):
        src, dim, index = N.arg(user, 0, "input"), N.arg(user, 1, "dim"), N.arg(user, 2, "index")
        if user.kwargs.get("sparse_grad"):
            return None
    elif _is(user, "take_along_dim"):
        src, index, dim = N.arg(user, 0, "input"), N.arg(user, 1, "indices"), N.arg(user, 2, "dim")
    else:
        return None
    role = _role(site, src)
    v, iv = N.tensor_value(src), N.tensor_value(index)
    if role is None or role[0] not in ("LS", "Z") or v is None or iv is None or not isinstance(dim, int):
        return None
    if N.normalize_dim(dim, v.dim()) != v.dim() - 1 or iv.dim() != v.dim() or iv.dtype != torch.int64:
        return None
    if not (N.same_size(iv.shape[-1], 1) and N.same_shape(iv.shape[:-1], v.shape[:-1])):
        return None
    targets = index
    if N.is_kind(index, "getitem") and _is_first_column(index.args[1]):
        bt0 = index.args[0]
        if N.is_kind(bt0, "getitem") and bt0.args[1] == 0 and _is(bt0.args[0], "broadcast_tensors"):
            targets = bt0.args[0].args[0]  # Categorical's value, before broadcasting
    return Consumer(user, "logprob" if role[0] == "LS" else "target_logit", role[1], targets=targets, keepdim=True)


def _loss(user: Node, fn, z: _Z, ndim: int) -> Consumer:
    name = "cross_entropy" if fn is F.cross_entropy else "nll_loss"
    bound = N.bind(user, fn)
    if bound is None:
        raise NoMatch(f"the arguments of {name} ({user.name}) could not be read")
    a = bound.arguments
    if a.get("weight") is not None:
        raise NoMatch(f"{name} ({user.name}) with class weights (weight=): not supported with token statistics")
    if a.get("size_average") is not None or a.get("reduce") is not None:
        raise NoMatch(f"{name} ({user.name}) with the legacy size_average= / reduce=: not supported here")
    smoothing = a.get("label_smoothing", 0.0)
    if not (isinstance(smoothing, (int, float)) and smoothing == 0):
        raise NoMatch(f"{name} ({user.name}) with label smoothing: not supported with token statistics")
    reduction, ignore_index = a.get("reduction", "mean"), a.get("ignore_index", -100)
    if reduction not in ("none", "sum", "mean"):
        raise NoMatch(f"{name} ({user.name}) with reduction={reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise NoMatch(f"{name} ({user.name}): ignore_index is not an int known when compiling")
    t = N.tensor_value(a["target"])
    if ndim != 2 or t is None or t.is_floating_point() or t.dim() != 1:
        raise NoMatch(f"{name} ({user.name}) of logits that are not (N, V) with class-index targets (N,)")
    return Consumer(user, "loss", z, targets=a["target"], reduction=reduction, ignore_index=ignore_index)



# ----------------------------------------------------------------------------- checks


def _signature(z: _Z):
    scale, cap = _interpret_values(list(z.values))
    key = tuple(f if isinstance(f, float) else (id(f[0]), f[1]) for f in scale)
    return key, (cap if not isinstance(cap, Node) else id(cap)), z.bias, scale, cap


def _path(z: _Z) -> list[_Z]:
    out = []
    while z is not None:
        out.append(z)
        z = z.parent
    return out[::-1]


def _check_site(site: StatsSite) -> None:
    """Everything the rewrite needs agrees: one scaling, one layout to compute in, one set of targets."""
    read = [z for z in site.zs.values() if any(u not in site.zs for u in z.node.users)]
    sigs = {z.node: _signature(z) for z in read}
    first = sigs[read[0].node]
    for z in read[1:]:
        s = sigs[z.node]
        if s[:3] != first[:3]:
            raise NoMatch(
                f"the logits are scaled or biased differently on the way to {read[0].node.name} and to "
                f"{z.node.name}: one call of the op computes one kind of logits"
            )
    _, _, bias, site.scale, site.softcap = first
    site.bias = bias
    if site.softcap is not None and not isinstance(site.softcap, (int, float)):
        raise NoMatch("the softcap is not a number known when compiling: not supported for token statistics")
    z0 = N.tensor_value(site.projection)
    if z0.dtype not in SUPPORTED_DTYPES:
        raise NoMatch(f"the logits are {z0.dtype}: the op computes in float32, bfloat16 or float16")
    w, b = N.tensor_value(site.weight), N.tensor_value(site.bias)
    vocab = w.shape[0 if site.weight_is_vd else 1]
    if b is not None and (b.dtype != w.dtype or b.dim() < 1 or not N.same_size(b.shape[-1], vocab)):
        raise NoMatch("the bias is not (V,) of the weight's dtype")

    # the layout the op computes in: the deepest logits node on every consumer's path
    paths = [_path(c.z) for c in site.consumers] + [_path(z) for z in read]
    common = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] is p[n]:
            n += 1
        common = common[:n]
    zc = common[-1]
    site.layout_node, site.trunk = zc.node, [z.node for z in common]
    for factor, layout in read[0].token_scales:
        if layout != zc.layout:
            raise NoMatch(f"a per-token scale ({factor.name}) is applied to a view of the logits the op does not "
                          "compute in")
        if site.bias is not None:
            raise NoMatch(f"a per-token scale ({factor.name}) with a bias: bias / T would be N x V")
    if any(st.kind == "split" for st in zc.steps):
        raise NoMatch("the statistics are all taken of one piece of a split of the logits: not supported")
    for c in site.consumers:
        for st in c.z.steps[len(zc.steps):]:
            # a slice (or a split piece) of the results is that of the logits
            if st.kind not in _RESHAPES and st.kind not in ("getitem", "split"):  # pragma: no cover
                raise NoMatch(f"{N.describe(st.node)} ({st.node.name}) on the way to {c.node.name}: not supported")

    # one set of targets (up to views and the logits' own slices), one ignore_index
    readers = [c for c in site.consumers if c.targets is not None]
    bases = {_targets_base(c, zc) for c in readers}
    if len(bases) > 1:
        names = ", ".join(sorted(b.name for b in bases))
        raise NoMatch(f"log-probabilities of different targets ({names}) from one head: one call of the op takes "
                      "one set")
    ignores = {c.ignore_index for c in site.consumers if c.kind == "loss"}
    if len(ignores) > 1:
        raise NoMatch(f"losses with different ignore_index values {sorted(ignores)} on one head")
    site.ignore_index = ignores.pop() if ignores else -100
    if any(c.kind in ("logprob", "target_logit") for c in site.consumers) and site.ignore_index >= 0 \
            and not (isinstance(vocab, int) and site.ignore_index >= vocab):
        raise NoMatch(
            f"a loss's ignore_index={site.ignore_index} is a class the gathers read: the op would give 0 where "
            "they give that class's log-probability"
        )
    if bases:
        base = bases.pop()
        bv, zv = N.tensor_value(base), N.tensor_value(zc.node)
        per_token = bv is not None and N.same_size(bv.numel(), zv[..., 0].numel())
        if not per_token or bv.is_floating_point() or bv.device != zv.device:
            raise NoMatch(f"the targets ({base.name}) are not one class index per token of the logits")
        site.targets_base = base
    _check_order(site)


def _targets_base(c: Consumer, zc: _Z) -> Node:
    """The targets of ``c`` in the op's layout: ``c.targets`` undone of views and of the slices and
    split pieces that took ``c``'s logits from the op's layout (which must be the same ones)."""
    t = c.targets
    for st in reversed(c.z.steps[len(zc.steps):]):
        if st.kind in _RESHAPES:
            continue
        t = _strip_targets(t)
        n_in = N.tensor_value(st.input).dim()
        prev = None
        if st.kind == "getitem" and N.is_kind(t, "getitem") and not t.kwargs:
            if _index_key(t.args[1]) == _index_key(_token_index(st.node.args[1], n_in)):
                prev = t.args[0]
        elif (st.kind == "split" and N.is_kind(t, "getitem") and t.args[1] == st.node.args[1]
              and _is(t.args[0], "split")):
            mine, theirs = st.node.args[0], t.args[0]
            tv = N.tensor_value(theirs.args[0]) if theirs.args else None
            if (tv is not None and mine.target == theirs.target and not theirs.kwargs.keys() - {"dim"}
                    and _hashable(N.arg(mine, 1, "")) == _hashable(N.arg(theirs, 1, ""))
                    and _split_dim(theirs, tv.dim()) == _split_dim(mine, n_in)):
                prev = theirs.args[0]
        pv = N.tensor_value(prev)
        if pv is None or not N.same_shape(pv.shape, N.tensor_value(st.input).shape[:-1]):
            raise NoMatch(
                f"{N.describe(st.node)} ({st.node.name}) takes a part of the logits on the way to {c.node.name}, "
                "whose targets are not the same part of targets of the other tokens"
            )
        t = prev
    return _strip_targets(t)


def _index_key(index: Any) -> Any:
    """An index, compared without what ends it and selects nothing: full slices, an Ellipsis, and
    None (a trailing dim of 1, as a gather's index has)."""
    elements = list(index) if isinstance(index, (tuple, list)) else [index]
    while elements and (elements[-1] is None or elements[-1] is Ellipsis
                        or (isinstance(elements[-1], slice) and elements[-1] == slice(None))):
        elements.pop()
    return _hashable(tuple(elements))


def _strip_targets(t: Node) -> Node:
    """The tensor ``t`` is a view of (unsqueeze, [..., None], view, reshape, flatten, integer casts)."""
    while isinstance(t, Node) and t.args and isinstance(t.args[0], Node):
        kind, src = N.kind_of(t), t.args[0]
        sv, tv = N.tensor_value(src), N.tensor_value(t)
        if sv is None or tv is None or sv.is_floating_point() or tv.is_floating_point() or sv.device != tv.device:
            break
        if kind == "getitem":
            index = t.args[1] if isinstance(t.args[1], tuple) else (t.args[1],)
            if not all(e is None or e is Ellipsis or (isinstance(e, slice) and e == slice(None)) for e in index):
                break
        elif kind not in _RESHAPES + ("identity", "cast"):
            break
        if kind in _RESHAPES and "input" in t.kwargs:
            break
        t = src
    return t


def _check_order(site: StatsSite) -> None:
    """The op can be placed where its inputs exist and before the first use of a result, under the
    projection's autocast and grad mode, with nothing written in place in between."""
    graph = site.projection.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [site.projection, site.x, site.weight, site.bias, site.targets_base]
    inputs += [f[0] for f in site.scale if not isinstance(f, float)]
    # what the replayed views read (a symbolic size made after the projection)
    zc = site.zs.get(site.layout_node) or site.ls_views[site.layout_node]
    steps = list(zc.steps) + [s for c in site.consumers for s in c.z.steps[len(zc.steps):]]
    inputs += [a for s in steps for a in s.node.all_input_nodes if a not in site.zs and a not in site.derived]
    inputs += [a for sp in site.splits for a in sp.all_input_nodes if a not in site.zs]
    inputs = [a for a in inputs if a not in site.splits]
    inputs = [n for n in inputs if isinstance(n, Node)]
    after = max(inputs, key=order.__getitem__)
    replaced = {c.node for c in site.consumers} | {_squeeze_user(c) for c in site.consumers} - {None}
    dying = set(site.zs) | site.derived | replaced
    uses = [u for n in replaced for u in n.users if u not in dying]
    last_consumer = max((c.node for c in site.consumers), key=order.__getitem__)
    if uses:
        first_use = min(uses, key=order.__getitem__)
        if order[first_use] <= order[after]:
            raise NoMatch(
                f"{_what(first_use)} uses a statistic before {after.name}, an input of the op, is made: "
                "the op cannot be placed"
            )
    end = max(order[last_consumer], order[after])
    _check_no_mutation_between(site.projection, last_consumer if order[last_consumer] == end else after)
    node = site.projection.next
    while node.op != "root" and order.get(node, end + 1) <= end:
        if N.is_kind(node, "set_grad_enabled") or N.is_kind(node, "inference_mode"):
            raise NoMatch("the grad mode changes between the projection and the statistics")
        node = node.next
    from .rewrite import _autocast_stack

    stack = _autocast_stack(graph, site.projection)
    for n in [after, *(c.node for c in site.consumers)]:
        if _autocast_stack(graph, n) != stack:
            raise NoMatch(f"{n.name} runs under another autocast state than the projection")
    site.insert_after = after


def _squeeze_user(c: Consumer) -> Node | None:
    """The ``squeeze(-1)`` that is the only use of a gather consumer (then that is what is replaced)."""
    if c.kind not in ("logprob", "target_logit") or len(c.node.users) != 1:
        return None
    (user,) = c.node.users
    v = N.tensor_value(c.node)
    if N.is_kind(user, "squeeze") and user.args[0] is c.node and "input" not in user.kwargs:
        dims = N.varargs(user, 1, "dim")
        if dims is not None and len(dims) == 1 and N.normalize_dim(dims[0], v.dim()) == v.dim() - 1:
            return user
    return None


# ----------------------------------------------------------------------------- the rewrite


def _apply(graph: Graph, site: StatsSite, options: Options) -> None:
    from .rewrite import _Builder, _propagate_meta, _prune, _replay_on_embeddings, _scale

    zc = site.zs.get(site.layout_node) or site.ls_views[site.layout_node]
    zcv = N.tensor_value(zc.node)
    first = min((c.node for c in site.consumers), key=list(graph.nodes).index)
    b = _Builder(graph, first)
    pairs: list[tuple[Node, Node]] = []
    try:
        with graph.inserting_before(site.insert_after.next):
            m = Match(
                anchor=first, kind=KIND, targets=site.targets_base, x=site.x, weight=site.weight,
                weight_is_vd=site.weight_is_vd, bias=site.bias, reduction="none", ignore_index=site.ignore_index,
                label_smoothing=0.0, out_dtype=torch.float32, projection=site.projection, logits=zc.node,
                steps=list(zc.steps), class_dim=zcv.dim() - 1, chain=list(site.trunk),
            )
            # A positive number with no softcap is the op's temperature (applied in float32 inside
            # it, not by rounding a scaled e to a 16-bit dtype); other factors scale e and the bias.
            scale, temperature = list(site.scale), None
            if site.softcap is None and scale and isinstance(scale[0], float) and scale[0] > 0:
                temperature, scale = 1.0 / scale[0], scale[1:]
            e = _scale(b, _replay_on_embeddings(b, m), scale)
            bias = site.bias
            if bias is not None and N.tensor_value(bias).dim() != 1:
                bias = b.method("reshape", bias, -1)
            bias = _scale(b, bias, scale) if bias is not None else None
            weight = site.weight if site.weight_is_vd else b.method("t", site.weight)
            targets = site.targets_base
            if targets is not None and not N.same_shape(N.tensor_value(targets).shape, zcv.shape[:-1]):
                sizes = [s if isinstance(s, int) else b.method("size", e, i) for i, s in enumerate(zcv.shape[:-1])]
                targets = b.method("reshape", targets, *sizes)
            kinds = {c.kind for c in site.consumers}
            wants = {
                "logprob": bool(kinds & {"logprob", "target_logit", "loss"}),
                "entropy": bool(kinds & {"neg_entropy", "sum_pz"}),
                "argmax": "argmax" in kinds,
                "lse": bool(kinds & {"lse", "target_logit", "sum_pz"}),
            }
            out = b.function(
                linear_token_stats, e, weight, targets if wants["logprob"] else None, bias,
                ignore_index=site.ignore_index, softcap=None if site.softcap is None else float(site.softcap),
                temperature=temperature, impl=options.impl, max_workspace_bytes=options.max_workspace_bytes, **wants,
            )
            fields = {name: b.function(operator.getitem, out, i) for name, i in _FIELDS.items() if wants[name]}
            for c in site.consumers:
                pairs.append(_replacement(b, site, zc, c, fields, targets))
        _propagate_meta(b.created)
        for old, new in pairs:
            ov, nv = N.tensor_value(old), N.tensor_value(new)
            if ov is None or nv is None or ov.dtype != nv.dtype or not N.same_shape(ov.shape, nv.shape):
                raise NoMatch(
                    f"internal: the result replacing {old.name} would be "
                    f"{None if nv is None else (tuple(nv.shape), nv.dtype)}, "
                    f"not {None if ov is None else (tuple(ov.shape), ov.dtype)}"
                )
    except NoMatch:
        b.undo()
        raise
    except Exception as error:  # leave the graph as it was rather than break compilation
        b.undo()
        log.warning("cce: rewriting the statistics of %s failed; left alone", site.projection.name, exc_info=True)
        raise NoMatch(f"internal error while rewriting: {error!r}") from error
    for old, new in pairs:
        old.replace_all_uses_with(new)
    _prune(graph, [old for old, _ in pairs])


def _replacement(b, site: StatsSite, zc: _Z, c: Consumer, fields: dict, targets) -> tuple[Node, Node]:
    """(the node replaced, its new value) for one consumer."""
    lp, lse, ent, am = (fields.get(k) for k in ("logprob", "lse", "entropy", "argmax"))
    if c.kind == "loss":
        per_token = b.function(operator.neg, lp)
        if c.reduction == "none":
            value = _to_layout(b, per_token, zc, c.z)
        else:
            value = b.method("sum", per_token)
            if c.reduction == "mean":
                count = b.method("sum", b.function(operator.ne, targets, c.ignore_index))
                value = b.function(operator.truediv, value, count)
        return c.node, _cast(b, value, c.node)
    value = {
        "logprob": lambda: lp,
        "target_logit": lambda: b.function(operator.add, lp, lse),
        "lse": lambda: lse,
        "neg_entropy": lambda: b.function(operator.neg, ent),
        "sum_pz": lambda: b.function(operator.sub, lse, ent),
        "argmax": lambda: am,
    }[c.kind]()
    value = _to_layout(b, value, zc, c.z)
    old = c.node
    squeeze = _squeeze_user(c)
    if squeeze is not None:
        old = squeeze
    elif c.keepdim:
        value = b.method("unsqueeze", value, -1)
    return old, _cast(b, value, old, torch.int64 if c.kind == "argmax" else torch.float32)


def _cast(b, value: Node, like: Node, natural: torch.dtype = torch.float32) -> Node:
    """``value`` (the op's fields are float32, argmax int64) in the dtype of the node it replaces."""
    dtype = N.tensor_value(like).dtype
    return value if dtype == natural else b.method("to", value, dtype)


def _to_layout(b, value: Node, zc: _Z, z: _Z) -> Node:
    """A per-token result in the op's layout (``zc``'s tokens) replayed to ``z``'s (token reshapes)."""
    for s in z.steps[len(zc.steps):]:
        node, n_in = s.node, N.tensor_value(s.input).dim()
        if s.kind == "reshape":
            shape = N.varargs(node, 1, "shape")
            value = b.method("reshape", value, *shape[:-1])
        elif s.kind == "flatten":
            start = N.normalize_dim(N.arg(node, 1, "start_dim", 0), n_in)
            end = N.normalize_dim(N.arg(node, 2, "end_dim", -1), n_in)
            if start != end:
                value = b.method("flatten", value, start, end)
        elif s.kind == "unflatten":
            value = b.method("unflatten", value, N.normalize_dim(N.arg(node, 1, "dim"), n_in), N.arg(node, 2, "sizes"))
        elif s.kind == "squeeze":
            dims = tuple(N.normalize_dim(d, n_in) for d in N.varargs(node, 1, "dim"))
            value = b.method("squeeze", value, dims)
        elif s.kind == "unsqueeze":
            value = b.method("unsqueeze", value, N.normalize_dim(N.arg(node, 1, "dim"), N.tensor_value(node).dim()))
        elif s.kind == "getitem":
            value = b.function(operator.getitem, value, _token_index(node.args[1], n_in))
        elif s.kind == "split":
            split = node.args[0]
            size = N.arg(split, 1, "split_size_or_sections" if split.target in ("split", torch.split) else "chunks")
            method = "chunk" if split.target in ("chunk", torch.chunk) else "split"
            pieces = b.method(method, value, size, _split_dim(split, n_in))
            value = b.function(operator.getitem, pieces, node.args[1])
    return value


def _token_index(index: Any, ndim: int) -> Any:
    """An index of the logits (which leaves the class dim, the last, whole) for their per-token
    results: the element that stands for the class dim dropped."""
    elements = list(index) if isinstance(index, tuple) else [index]
    def consumed(e):
        if e is None or e is Ellipsis:
            return 0
        v = N.tensor_value(e) if isinstance(e, Node) else None
        return v.dim() if v is not None and v.dtype == torch.bool else 1
    if Ellipsis in elements:
        covers_last = any(consumed(e) for e in elements[elements.index(Ellipsis) + 1:])
    else:
        covers_last = sum(consumed(e) for e in elements) == ndim
    if covers_last:
        last = max(i for i, e in enumerate(elements) if consumed(e))
        elements = elements[:last] + elements[last + 1:]
    return tuple(elements)


# ----------------------------------------------------------------------------- the report


def _report(site: StatsSite) -> SiteReport:
    first = site.stat_consumers[0].node
    report = SiteReport(site.projection.name, KIND, _user_location(first), "skipped", site.problem or "")
    x, z = N.tensor_value(site.x), N.tensor_value(site.projection)
    if z is not None and z.dim() >= 1:
        report.vocab = N.hint(z.shape[-1])
        total = 1
        for s in z.shape[:-1]:
            h = N.hint(s)
            total = None if h is None or total is None else total * int(h)
        report.tokens = total
        report.logits_dtype = str(z.dtype).replace("torch.", "")
    if x is not None:
        report.hidden = N.hint(x.shape[-1])
    report.details = {
        "projection": N.describe(site.projection),
        "statistics": [f"{N.describe(c.node)} ({c.node.name}): {c.kind}" for c in site.consumers],
    }
    if site.problem is None:
        report.bytes_avoided = _bytes_avoided(site)
    return report


def _mode(site: StatsSite, report: SiteReport, options: Options) -> str:
    """How the op will compute this site's statistics (``token_stats.describe_mode``)."""
    x, z = N.tensor_value(site.x), N.tensor_value(site.projection)
    if report.vocab is None or x is None or z is None:
        return "chosen per call"
    differentiable = any(c.kind != "argmax" for c in site.consumers)  # an arg-max alone has no gradient
    return describe_mode(report.tokens, int(report.vocab), z.dtype, x.device, z.requires_grad and differentiable,
                         options.impl, options.max_workspace_bytes)


def _user_location(node: Node) -> str:
    """``file:line`` of the innermost frame of the user's code (not torch's: Categorical's methods)."""
    trace = node.meta.get("stack_trace") or ""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    for frame in reversed(frames):
        path = frame.split(",")[0][len("File ") :].strip().strip('"')
        if "/torch/" not in path.replace("\\", "/"):
            line = frame.split(",")[1].strip().replace("line ", "") if "," in frame else "?"
            return f"{path.rsplit('/', 1)[-1]}:{line}"
    return N.location(node)


def _bytes_avoided(site: StatsSite) -> int | None:
    """N x V values the site no longer holds: the logits and every value made from them that is not
    a view (an estimate from the fake values), plus a loss call's saved log-softmax."""
    total = 0
    views = ("reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "getitem", "identity")
    nodes = [n for n in site.zs if n is site.projection or N.kind_of(n) not in views]
    nodes += [n for n in site.derived if not N.is_kind(n, "getitem") and not _is(n, "broadcast_tensors")]
    nodes += [c.node.args[0] for c in site.consumers if c.kind == "loss" and N.is_kind(c.node, "cross_entropy")]
    for n in nodes:
        v = N.value(n)
        if not isinstance(v, torch.Tensor):
            if isinstance(v, (tuple, list)):  # max's (values, indices), a split: no N x V of their own
                continue
            return None
        numel = 1
        for s in v.shape:
            h = N.hint(s)
            if h is None:
                return None
            numel *= int(h)
        total += numel * v.element_size()
    return total

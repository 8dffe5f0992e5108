"""Find linear -> cross-entropy sites in a Dynamo (torch-IR) graph.

The matcher anchors on each loss call -- ``F.cross_entropy`` (also what ``nn.CrossEntropyLoss``
becomes), ``F.nll_loss`` of a ``log_softmax`` and, where a torch version keeps it as one call,
``F.linear_cross_entropy`` -- and walks back from the loss's input through what may stand between
the loss and the projection that made the logits:

* token-dim shape ops: view / reshape / flatten / unflatten / squeeze / unsqueeze / contiguous,
  slicing and indexing of token dims, transposes and permutes that move the class dim;
* value ops: dtype casts that lose nothing, scaling by a scalar (a temperature), one softcap
  (``cap * tanh(z / cap)``), and a bias added right after the projection: one value per class,
  shape (V,) or one that broadcasts to it without adding dims, (1, V) (BART's
  ``final_logits_bias``), (1, 1, V);

down to the projection: ``F.linear`` / ``nn.Linear`` (with or without bias), ``x @ W.T``,
``torch.matmul``, ``x @ W``. Anything else in between, probability targets,
a lossy cast or a second softcap leaves the site alone, with the reason recorded in a :class:`Skip`,
worded for the user.

A projection under ``no_grad`` / ``inference_mode`` whose parameters require grad (an evaluation
loop) is matched for the op's forward only (:attr:`Match.no_grad`). :func:`regions` lists the
graphs higher-order ops run: the rewrite enters ``torch.utils.checkpoint`` bodies.

The matcher only reads the graph; :mod:`.rewrite` changes it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from . import nodes as N
from . import tensor_parallel

log = logging.getLogger("cce_inductor")

REDUCTIONS = ("none", "sum", "mean")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PRECISION = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_RESHAPES = ("reshape", "flatten", "unflatten", "squeeze", "unsqueeze")
_MOVES = ("transpose", "t", "permute", "movedim")


# How the reason starts where the logits are an input of the graph holding the loss.
LOGITS_FROM_OUTSIDE = "no projection in this graph"


class NoMatch(Exception):
    """Raised inside the matcher with the reason a site is left alone."""


# A scale factor: a Python number, or (scalar node, +1 | -1) for multiplication / division.
Factor = Union[float, tuple[Node, int]]


@dataclass
class ShapeStep:
    """One token-dim shape op between the projection and the loss, replayed on the embeddings."""

    node: Node
    kind: str
    input: Node
    class_in: int  # position of the class dim in the op's input
    class_out: int  # ... and in its output


@dataclass
class Match:
    """A site the rewrite can replace with ``cce_inductor.linear_cross_entropy``."""

    anchor: Node  # the loss call
    kind: str  # "cross_entropy" | "nll_loss" | "linear_cross_entropy"
    targets: Node  # class indices, as passed to the loss
    x: Node  # embeddings entering the projection, (..., D)
    weight: Node  # the classifier: (V, D) if weight_is_vd else (D, V)
    weight_is_vd: bool
    bias: Node | None
    reduction: str
    ignore_index: int
    label_smoothing: Any  # float, or a scalar node
    out_dtype: torch.dtype  # dtype of the loss call's result
    projection: Node | None = None  # the N x V logits node (None for F.linear_cross_entropy)
    logits: Node | None = None  # the loss's input
    steps: list[ShapeStep] = field(default_factory=list)  # projection -> loss order
    class_dim: int = -1  # class dim of the loss's input
    scale: list[Factor] = field(default_factory=list)  # e is multiplied by these
    softcap: Any = None  # float, or a scalar node
    chain: list[Node] = field(default_factory=list)  # logits-side nodes, projection first
    shift: int = 0  # with shift_targets: e unsliced, targets unsliced, op's shift=
    shift_targets: Node | None = None
    shift_reshape: bool = False  # reduction "none" under shift: flatten the per-token loss
    no_grad: bool = False  # the projection ran under no_grad / inference_mode: the op runs forward only
    grad_off: bool = False  # ... and the loss with grad enabled: the op runs under no_grad there
    parallel: Any = None  # tensor_parallel.Layout of a DTensor (vocab-parallel) site, else None
    class_weight: Node | None = None  # the loss's weight= (V,), passed to the op's weight=

    @property
    def vocab(self):
        w = N.tensor_value(self.weight)
        return w.shape[0] if self.weight_is_vd else w.shape[1]

    @property
    def hidden(self):
        w = N.tensor_value(self.weight)
        return w.shape[1] if self.weight_is_vd else w.shape[0]


@dataclass
class Skip:
    """A loss call left alone, and why."""

    anchor: Node
    kind: str
    reason: str
    projection: Node | None = None


Site = Union[Match, Skip]


# ----------------------------------------------------------------------------- entry point


def find_anchors(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if any(N.is_kind(n, k) for k in N.LOSS_KINDS)]


def regions(graph: Graph) -> list[tuple[GraphModule, str, bool]]:
    """The graphs that higher-order ops of ``graph`` run, each once: (module, what it is, whether
    the rewrite enters it). It enters ``torch.utils.checkpoint`` bodies, whose nodes AOTAutograd
    traces like any others and recomputes in the backward; the op is a custom op with its own
    backward, so it is recomputed there as a whole. Other bodies (``torch.cond`` branches, loops,
    nested compile regions) have their own rules for autograd and are left alone."""
    found: dict[GraphModule, tuple[str, bool]] = {}
    for node in graph.nodes:
        region = N.hop_region(node)
        if region is None:
            continue
        enter = N.is_checkpoint_region(node)
        for module in N.subgraph_modules(node):
            seen = found.get(module)
            # a body run by two kinds of op is entered only if both allow it
            found[module] = (region, enter and (seen is None or seen[1]))
    return [(module, region, enter) for module, (region, enter) in found.items()]


def skips_in(graph: Graph, region: str) -> list[Skip]:
    """The loss calls of a graph the rewrite does not enter, each left alone."""
    return [
        Skip(a, _loss_kind(a), f"the rewrite does not enter {region} (of these regions only torch.utils.checkpoint's)")
        for a in find_anchors(graph)
    ]


def _loss_kind(anchor: Node) -> str:
    return next(k for k in N.LOSS_KINDS if N.is_kind(anchor, k))


def match_site(anchor: Node) -> Site:
    """Match one loss call; a :class:`Skip` with the reason where it cannot be rewritten."""
    kind = _loss_kind(anchor)
    walker = _Walker(anchor, kind)
    try:
        return walker.run()
    except NoMatch as reason:
        return Skip(anchor, kind, str(reason), walker.projection)
    except Exception as error:  # a graph the matcher misreads must not break compilation
        log.warning("cce: matching %s failed; the site is left alone", anchor.name, exc_info=True)
        return Skip(anchor, kind, f"internal error while matching: {error!r}", walker.projection)


# ----------------------------------------------------------------------------- the walk


class _Walker:
    def __init__(self, anchor: Node, kind: str):
        self.anchor = anchor
        self.kind = kind
        self.projection: Node | None = None

    # -- loss arguments

    def run(self) -> Match:
        if self.kind == "linear_cross_entropy":
            return self._fused()
        fn = F.cross_entropy if self.kind == "cross_entropy" else F.nll_loss
        bound = N.bind(self.anchor, fn)
        if bound is None:
            raise NoMatch(f"the arguments of {self.kind} could not be read (an unusual call)")
        a = bound.arguments
        reduction = self._reduction(a)
        ignore_index = a.get("ignore_index", -100)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise NoMatch(f"ignore_index is not an int known when compiling ({ignore_index!r})")
        label_smoothing = a.get("label_smoothing", 0.0)
        if not (isinstance(label_smoothing, (int, float)) or N.is_scalar(label_smoothing)):
            raise NoMatch("label_smoothing is not a number")

        logits, targets = a["input"], a["target"]
        z, t = N.tensor_value(logits), N.tensor_value(targets)
        if z is None or t is None:
            raise NoMatch(f"the input or the target of {self.kind} is not a tensor")
        if t.is_floating_point():
            raise NoMatch("probability targets (floating-point targets): not supported, only class indices")
        if z.dim() == 0:
            raise NoMatch(f"the input of {self.kind} is a 0-d tensor")
        class_dim = 1 if z.dim() >= 2 else 0
        token_shape = tuple(z.shape[:class_dim]) + tuple(z.shape[class_dim + 1 :])
        if not N.same_shape(tuple(t.shape), token_shape):
            raise NoMatch(f"targets of shape {tuple(t.shape)} do not match the logits {tuple(z.shape)}")
        class_weight = a.get("weight")
        if class_weight is not None:
            cw = N.tensor_value(class_weight) if isinstance(class_weight, Node) else None
            if cw is None or cw.dim() != 1 or not cw.is_floating_point() or \
                    not N.same_shape(tuple(cw.shape), (z.shape[class_dim],)):
                raise NoMatch("class weights (weight=) that are not a floating tensor of one value per class")

        m = Match(
            anchor=self.anchor,
            kind=self.kind,
            targets=targets,
            x=None,  # filled by the walk
            weight=None,
            weight_is_vd=True,
            bias=None,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            out_dtype=N.tensor_value(self.anchor).dtype,
            class_weight=class_weight,
            logits=logits,
            class_dim=class_dim,
        )
        self._walk(m, logits, class_dim)
        self._check_projection(m)
        try:
            m.parallel = tensor_parallel.check(m)
        except tensor_parallel.Refused as reason:
            raise NoMatch(str(reason)) from None
        _check_no_mutation_between(m.projection, self.anchor)
        self._check_grad_mode(m)
        _find_shift(m)
        return m

    def _reduction(self, a) -> str:
        if a.get("size_average") is not None or a.get("reduce") is not None:
            from torch.nn import _reduction

            reduction = _reduction.legacy_get_string(a.get("size_average"), a.get("reduce"), emit_warning=False)
        else:
            reduction = a.get("reduction", "mean")
        if reduction not in REDUCTIONS:
            raise NoMatch(f"reduction={reduction!r} is not one of {REDUCTIONS} known when compiling")
        return reduction

    def _fused(self) -> Match:
        """``F.linear_cross_entropy(input, linear_weight, target, *, linear_bias, ...)`` as one call."""
        bound = N.bind(self.anchor, F.linear_cross_entropy)
        if bound is None:
            raise NoMatch("the arguments of linear_cross_entropy could not be read (an unusual call)")
        a = bound.arguments
        if a.get("weight") is not None:
            raise NoMatch("class weights (weight=): not supported")
        x, w, t, b = a["input"], a["linear_weight"], a["target"], a.get("linear_bias")
        wv, tv = N.tensor_value(w), N.tensor_value(t)
        if wv is None or wv.dim() != 2:
            raise NoMatch("linear_weight is not a 2-D tensor")
        if tv is None or tv.is_floating_point():
            raise NoMatch("probability targets (floating-point targets): not supported, only class indices")
        if b is not None and (N.tensor_value(b) is None or N.tensor_value(b).dim() != 1):
            raise NoMatch("linear_bias is not 1-D")
        ignore_index = a.get("ignore_index")
        ignore_index = -100 if ignore_index is None else ignore_index
        if not isinstance(ignore_index, int):
            raise NoMatch(f"ignore_index is not an int known when compiling ({ignore_index!r})")
        reduction = a.get("reduction", "mean")
        if reduction not in REDUCTIONS:
            raise NoMatch(f"reduction={reduction!r} is not one of {REDUCTIONS} known when compiling")
        m = Match(
            anchor=self.anchor, kind=self.kind, targets=t, x=x, weight=w, weight_is_vd=True, bias=b,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=a.get("label_smoothing", 0.0),
            out_dtype=N.tensor_value(self.anchor).dtype,
        )
        self._check_dtypes(m, N.tensor_value(x).dtype, [])
        return m

    # -- from the loss's input back to the projection

    def _walk(self, m: Match, node: Node, class_dim: int) -> None:
        chain: list[Node] = []
        steps: list[ShapeStep] = []
        values: list[tuple] = []  # ("scale", factor) | ("tanh",), loss -> projection order
        casts: list[tuple[torch.dtype, torch.dtype]] = []
        log_softmax = False
        cd = class_dim
        while True:
            t = N.tensor_value(node)
            if t is None:
                raise NoMatch(f"{node.name} on the way from the loss to the projection is not a tensor")
            chain.append(node)
            proj = _projection(node)
            if proj is not None:
                break
            if node.op == "placeholder":
                raise NoMatch(
                    f"{LOGITS_FROM_OUTSIDE}: the logits are an input of it (made before a graph break, or "
                    "outside the region that holds the loss); the projection and the loss must be in one graph"
                    + tensor_parallel.outside_hint(node)
                )
            if node.op == "get_attr":
                raise NoMatch("no projection: the logits are a constant of the graph")
            if tensor_parallel.passes_through(node):  # DTensor: another layout, the same values
                node = node.args[0]
                continue
            kind = N.kind_of(node)
            if kind == "getitem" and node.args and N.hop_region(node.args[0]) is not None:
                raise NoMatch(
                    f"the logits come out of {N.hop_region(node.args[0])} (the projection inside it, "
                    "the loss outside): the rewrite does not reach across that boundary"
                )
            inp = _tensor_input(node, kind)
            iv = N.tensor_value(inp)
            if iv is None:
                raise NoMatch(_unsupported(node, kind))
            if iv.dtype != t.dtype:
                casts.append((iv.dtype, t.dtype))
            if kind in _RESHAPES or kind in _MOVES or kind == "getitem":
                ci = _class_in(node, kind, cd, iv, t)
                steps.append(ShapeStep(node, kind, inp, ci, cd))
                cd = ci
            elif kind in ("identity", "cast"):
                if not (t.is_floating_point() and t.device == iv.device and N.same_shape(t.shape, iv.shape)):
                    raise NoMatch(
                        f"{N.describe(node)} ({node.name}) does more to the logits than change their dtype "
                        "(another device, an integer dtype or another shape)"
                    )
            elif kind in ("mul", "div", "neg"):
                values.append(("scale", _factor(node, kind, inp)))
            elif kind == "tanh":
                values.append(("tanh",))
            elif kind == "log_softmax":
                if values or log_softmax:
                    raise NoMatch(f"the values are changed between log_softmax and {self.kind}")
                dim = N.normalize_dim(N.arg(node, 1, "dim"), t.dim())
                if dim != cd:
                    raise NoMatch("log_softmax is not taken over the class dim")
                log_softmax = True
            elif kind == "add":
                m.bias, inp = _bias_add(node, inp)
            else:
                raise NoMatch(_unsupported(node, kind))
            node = inp

        self.projection = node
        x, w, weight_is_vd, bias = proj
        z = N.tensor_value(node)
        if cd != z.dim() - 1:
            raise NoMatch("the loss's class dim is not the projection's output (vocabulary) dim")
        if self.kind == "nll_loss" and not log_softmax:
            raise NoMatch("the input of nll_loss is not a log_softmax of the logits")
        m.projection, m.x, m.weight, m.weight_is_vd = node, x, w, weight_is_vd
        if bias is not None:
            m.bias = bias
        m.chain = list(reversed(chain))
        m.steps = list(reversed(steps))
        m.scale, m.softcap = _interpret_values(list(reversed(values)))
        self._check_dtypes(m, z.dtype, list(reversed(casts)))

    def _check_projection(self, m: Match) -> None:
        x, w, z = N.tensor_value(m.x), N.tensor_value(m.weight), N.tensor_value(m.projection)
        if x is None or x.dim() < 1:
            raise NoMatch("the projection's input is not a tensor of shape (..., D)")
        if not N.same_size(x.shape[-1], m.hidden) or not N.same_size(z.shape[-1], m.vocab):
            raise NoMatch("the projection's shapes do not match its weight")
        if m.bias is not None:
            b = N.tensor_value(m.bias)
            if b is None or not _is_vector_of(b, m.vocab):
                raise NoMatch("the bias is not of shape (V,) (or (1, V), (1, 1, V))")
            if b.dtype != w.dtype:
                raise NoMatch(f"the bias is {b.dtype} and the weight {w.dtype}: the op takes one dtype")

    def _check_grad_mode(self, m: Match) -> None:
        """A projection whose inputs require grad but whose output does not ran under no_grad or
        inference_mode (an evaluation loop): the op runs forward only, as the loss did."""
        x, w, z = N.tensor_value(m.x), N.tensor_value(m.weight), N.tensor_value(m.projection)
        needs_grad = any(v is not None and v.requires_grad for v in (x, w, N.tensor_value(m.bias)))
        if z.requires_grad or not needs_grad:
            return
        loss = N.tensor_value(self.anchor)
        if loss is not None and loss.requires_grad:
            raise NoMatch(
                "the projection runs under no_grad but the loss needs a gradient (through a scale or "
                "bias applied with grad enabled)"
            )
        m.no_grad = True
        mode = None  # the grad mode at the loss, where it is set between the projection and the loss
        node = m.projection.next
        while node is not self.anchor and node.op != "root":
            if N.is_kind(node, "inference_mode"):
                raise NoMatch("the projection runs under torch.inference_mode() inside the compiled region and the loss outside it")
            if N.is_kind(node, "set_grad_enabled") and node.args and isinstance(node.args[0], bool):
                mode = node.args[0]
            elif N.is_kind(node, "set_grad_enabled"):
                raise NoMatch("the grad mode is set to a value not known when compiling")
            node = node.next
        m.grad_off = bool(mode)

    def _check_dtypes(self, m: Match, dtype: torch.dtype, casts) -> None:
        if dtype not in SUPPORTED_DTYPES:
            name = str(dtype).replace("torch.", "")
            raise NoMatch(f"the logits are {name}: the op computes in float32, bfloat16 or float16")
        for src, dst in casts:
            if _PRECISION.get(dst, 0) < _PRECISION.get(src, 0) or (
                _PRECISION.get(dst) == _PRECISION.get(src) and dst != src
            ):
                src_name, dst_name = (str(d).replace("torch.", "") for d in (src, dst))
                raise NoMatch(f"the logits are cast from {src_name} to {dst_name}, which loses precision")


# ----------------------------------------------------------------------------- pieces of the walk


def _check_no_mutation_between(first: Node, last: Node) -> None:
    """The op reads its inputs where the loss was called, the projection read them earlier: no
    tensor may be written in place in between (the logits included, which the rewrite drops)."""
    node = first.next
    while node is not last and node.op != "root":
        if N.is_mutation(node):
            raise NoMatch(
                f"{N.describe(node)} ({node.name}) writes in place between the projection and the loss "
                "(the op would read the changed values)"
            )
        node = node.next


def _projection(node: Node):
    """(x, weight, weight_is_vd, bias) when ``node`` is the projection making the logits."""
    if N.is_kind(node, "linear"):
        x, w, b = N.arg(node, 0, "input"), N.arg(node, 1, "weight"), N.arg(node, 2, "bias")
        wv = N.tensor_value(w)
        if not isinstance(x, Node) or wv is None or wv.dim() != 2:
            return None
        return x, w, True, b
    if N.is_kind(node, "matmul") and len(node.args) == 2 and not node.kwargs:
        x, wt = node.args
        xv, wtv = N.tensor_value(x), N.tensor_value(wt)
        if xv is None or wtv is None or wtv.dim() != 2 or xv.dim() < 1:
            return None
        inner = _transposed_2d(wt)
        if inner is not None:
            return x, inner, True, None
        return x, wt, False, None
    return None


def _transposed_2d(node: Any) -> Node | None:
    """W when ``node`` is W.t() / W.T / W.mT / W.transpose(0, 1) / W.permute(1, 0) of a 2-D W."""
    if not isinstance(node, Node):
        return None
    inner = node.args[0] if node.args else None
    if N.tensor_value(inner) is None or N.tensor_value(inner).dim() != 2:
        return None
    if N.is_kind(node, "t") or N.is_transpose_attr(node):
        return inner
    if N.is_kind(node, "transpose"):
        dims = {N.normalize_dim(N.arg(node, 1, "dim0"), 2), N.normalize_dim(N.arg(node, 2, "dim1"), 2)}
        return inner if dims == {0, 1} else None
    if N.is_kind(node, "permute"):
        dims = N.varargs(node, 1, "dims")
        return inner if dims is not None and [N.normalize_dim(d, 2) for d in dims] == [1, 0] else None
    return None


def _tensor_input(node: Node, kind: str | None) -> Any:
    """The operand of ``node`` that carries the logits."""
    if kind in ("mul", "add"):
        a, b = (list(node.args) + [None, None])[:2]
        av, bv = N.tensor_value(a), N.tensor_value(b)
        a_ok, b_ok = av is not None and av.dim() >= 1, bv is not None and bv.dim() >= 1
        if a_ok and b_ok:  # the operand with the output's shape (the other broadcasts), else the larger
            out = N.tensor_value(node)
            a_full = out is not None and N.same_shape(av.shape, out.shape)
            b_full = out is not None and N.same_shape(bv.shape, out.shape)
            if a_full != b_full:
                return a if a_full else b
            return a if av.dim() >= bv.dim() else b
        return a if a_ok else b
    if kind is None and N.is_transpose_attr(node):
        return node.args[0]
    if node.args:
        return node.args[0]
    return node.kwargs.get("input")


def _class_in(node: Node, kind: str, co: int, iv: torch.Tensor, ov: torch.Tensor) -> int:
    """The position of the class dim in the input of a shape op, given it in the output."""
    n_in, n_out = iv.dim(), ov.dim()
    if "input" in node.kwargs:
        raise NoMatch(f"{N.describe(node)} ({node.name}) on the logits with input= as a keyword: not supported")
    if kind in _RESHAPES or kind == "getitem":
        # Row-preserving ops: the class dim must be last on both sides and keep its size, and
        # the op must not touch it.
        if co != n_out - 1 or not N.same_size(iv.shape[-1], ov.shape[-1]):
            raise NoMatch(f"{N.describe(node)} ({node.name}) reshapes the vocabulary dim of the logits")
        last = n_in - 1
        if kind == "flatten":
            start = N.normalize_dim(N.arg(node, 1, "start_dim", 0), n_in)
            end = N.normalize_dim(N.arg(node, 2, "end_dim", -1), n_in)
            if start is None or end is None or end >= last and start < end:
                raise NoMatch(f"flatten ({node.name}) merges the vocabulary dim of the logits with another")
        elif kind == "unflatten":
            if N.normalize_dim(N.arg(node, 1, "dim"), n_in) in (None, last):
                raise NoMatch(f"unflatten ({node.name}) splits the vocabulary dim of the logits")
        elif kind == "squeeze":
            dims = N.varargs(node, 1, "dim")
            if not dims or any(N.normalize_dim(d, n_in) in (None, last) for d in dims):
                raise NoMatch(f"squeeze ({node.name}) of the logits without naming the dims: not supported")
        elif kind == "unsqueeze":
            if N.normalize_dim(N.arg(node, 1, "dim"), n_out) in (None, n_out - 1):
                raise NoMatch(f"unsqueeze ({node.name}) of the logits after the vocabulary dim: not supported")
        elif kind == "getitem":
            _check_index_spares_last(node.args[1], n_in)
        return last
    if kind == "transpose":
        d0 = N.normalize_dim(N.arg(node, 1, "dim0"), n_in)
        d1 = N.normalize_dim(N.arg(node, 2, "dim1"), n_in)
        if d0 is None or d1 is None:
            raise NoMatch(f"transpose ({node.name}) of the logits with dims not known when compiling")
        return d1 if co == d0 else d0 if co == d1 else co
    if kind == "t":
        if N.is_transpose_attr(node) and node.args[1] == "mT":  # swaps the last two dims
            return {n_in - 2: n_in - 1, n_in - 1: n_in - 2}.get(co, co)
        if N.is_transpose_attr(node):  # x.T reverses all dims
            return n_in - 1 - co
        return co if n_in < 2 else 1 - co  # x.t(): at most 2-D
    if kind == "permute":
        dims = N.varargs(node, 1, "dims")
        dims = [N.normalize_dim(d, n_in) for d in dims or ()]
        if len(dims) != n_in or None in dims:
            raise NoMatch(f"permute ({node.name}) of the logits with dims not known when compiling")
        return dims[co]
    if kind == "movedim":
        src, dst = N.arg(node, 1, "source"), N.arg(node, 2, "destination")
        src = list(src) if isinstance(src, (tuple, list)) else [src]
        dst = list(dst) if isinstance(dst, (tuple, list)) else [dst]
        src = [N.normalize_dim(d, n_in) for d in src]
        dst = [N.normalize_dim(d, n_in) for d in dst]
        if None in src or None in dst:
            raise NoMatch(f"movedim ({node.name}) of the logits with dims not known when compiling")
        order = [None] * n_in
        for s, d in zip(src, dst):
            order[d] = s
        rest = iter(d for d in range(n_in) if d not in src)
        order = [o if o is not None else next(rest) for o in order]
        return order[co]
    raise NoMatch(f"{N.describe(node)} ({node.name}) is not a shape op")  # pragma: no cover


def _is_full_slice(s: Any) -> bool:
    return isinstance(s, slice) and s.start in (None, 0) and s.stop is None and s.step in (None, 1)


def _dims_consumed(element: Any) -> int:
    if element is None:
        return 0
    if isinstance(element, Node):
        v = N.tensor_value(element)
        if v is None:
            return 1  # a symbolic int index
        return v.dim() if v.dtype == torch.bool else 1
    return 1  # int or slice


def _index_elements(index: Any) -> list:
    return list(index) if isinstance(index, (tuple, list)) else [index]


def _check_index_spares_last(index: Any, ndim: int) -> None:
    """Raise unless indexing leaves the last dim (the class dim) whole."""
    elements = _index_elements(index)
    for e in elements:
        if not (e is None or e is Ellipsis or isinstance(e, (int, slice, Node))):
            raise NoMatch(f"the logits are indexed with {e!r}: not supported")
    if Ellipsis in elements:
        trailing = elements[elements.index(Ellipsis) + 1 :]
    else:
        consumed = sum(_dims_consumed(e) for e in elements)
        if consumed < ndim:
            return
        trailing = elements
    for e in reversed(trailing):
        if e is None:
            continue
        if _dims_consumed(e) and not _is_full_slice(e):
            raise NoMatch("the logits are indexed along the vocabulary dim (a subset of the classes): not supported")
        return


def _factor(node: Node, kind: str, inp: Node) -> Factor:
    if kind == "neg":
        return -1.0
    if kind == "div":
        if node.kwargs.get("rounding_mode") is not None:
            raise NoMatch("the logits are divided with a rounding mode: not supported")
        if node.args[0] is not inp:
            raise NoMatch(f"a number is divided by the logits ({node.name}): not supported")
        other, exp = N.arg(node, 1, "other"), -1
    else:
        other = node.args[1] if node.args[0] is inp else node.args[0]
        exp = 1
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        if other == 0:
            raise NoMatch("the logits are multiplied by zero")
        return float(other) ** exp
    if isinstance(other, Node) and (N.is_scalar(other) or N.is_scalar_tensor(other)):
        return (other, exp)
    raise NoMatch(f"the logits are multiplied by a tensor that is not a scalar ({node.name}): not supported")


def _bias_add(node: Node, inp: Node) -> tuple[Node, Node]:
    """(bias, logits) of ``logits + bias`` right after a projection without a bias; NoMatch
    otherwise. A bias is a tensor of one value per class: shape (V,), or (1, V), (1, 1, V) ...
    (BART's ``final_logits_bias``) as long as it does not add dims to the logits."""
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        raise NoMatch(f"an addition with alpha= ({node.name}) to the logits: not supported")
    other = node.args[1] if node.args[0] is inp else node.args[0]
    if _projection(inp) is None and _projection(other) is not None:
        inp, other = other, inp
    v, z, out = N.tensor_value(other), N.tensor_value(inp), N.tensor_value(node)
    proj = _projection(inp)
    if proj is None and N.kind_of(inp) in ("einsum", "batched_product", "matmul"):
        raise NoMatch(_unsupported(inp, N.kind_of(inp)))
    if proj is None:
        raise NoMatch(f"an addition ({node.name}) to the logits after other operations: a bias is added right after the projection")
    if v is None or not _is_vector_of(v, z.shape[-1]) or v.dim() > z.dim() or not N.same_shape(out.shape, z.shape):
        shape = "a scalar" if v is None or v.dim() == 0 else f"shape {tuple(v.shape)}"
        raise NoMatch(
            f"a tensor of {shape} is added to the logits ({node.name}): not a bias (one value per class, "
            "shape (V,) or (1, V)); only a bias may be added"
        )
    if proj[3] is not None:
        raise NoMatch(f"a second bias is added to the logits ({node.name}) after the projection's own")
    return other, inp


def _is_vector_of(v: torch.Tensor, size) -> bool:
    """Shape (size,), or (1, ..., 1, size)."""
    return v.dim() >= 1 and N.same_size(v.shape[-1], size) and all(N.same_size(s, 1) for s in v.shape[:-1])


def _unsupported(node: Node, kind: str | None) -> str:
    """The reason for an operation the walk from the loss to the projection cannot pass."""
    what = f"{N.describe(node)} ({node.name})"
    if kind == "einsum":
        return f"the logits come from {what}: an einsum projection, not supported (F.linear, x @ W.T and torch.matmul are)"
    if kind == "batched_product":
        return f"the logits come from {what}: not supported as the projection (F.linear, x @ W.T and torch.matmul are)"
    if kind == "matmul":
        return f"the logits come from {what} with a weight that is not a 2-D matrix: not supported as the projection"
    if N.hop_region(node) is not None:
        return f"the logits come from {N.hop_region(node)}: not supported"
    return (
        f"{what} is applied to the logits before the loss: not supported (between the projection and "
        "the loss only reshapes, slices, casts, scaling, one softcap and a bias may stand)"
    )


def _interpret_values(ops: list[tuple]) -> tuple[list[Factor], Any]:
    """From value ops in projection -> loss order, the factors e is scaled by and the softcap.

    With scalings a (before) and b (after) a tanh, the logits are ``b * tanh(a * z)``; the op
    computes ``cap * tanh(s * z / cap)`` with e scaled by s, so cap = |b| and s = a * b.
    """
    tanhs = [i for i, op in enumerate(ops) if op[0] == "tanh"]
    if len(tanhs) > 1:
        raise NoMatch("more than one tanh (softcap) on the logits: the op applies one")
    factors = [op[1] for op in ops if op[0] == "scale"]
    if not tanhs:
        return _simplify(factors), None
    pre = [op[1] for op in ops[: tanhs[0]]]
    post = [op[1] for op in ops[tanhs[0] + 1 :]]
    numbers = [f for f in post if isinstance(f, float)]
    symbols = [f for f in post if not isinstance(f, float)]
    if not post:
        raise NoMatch("tanh of the logits without a scale after it: not a softcap (cap * tanh(z / cap))")
    if not symbols:
        b = math.prod(numbers)
        return _simplify(pre + [b]), abs(b)
    if len(symbols) == 1 and symbols[0][1] == 1 and math.prod(numbers) == 1.0:
        cap = symbols[0][0]
        v = N.value(cap)
        if not N.is_scalar(cap) or not (N.hint(v) is not None and N.hint(v) > 0):
            raise NoMatch("the softcap is not a positive number")
        return _simplify(pre + [symbols[0]]), cap
    raise NoMatch("a tanh of the logits in a form other than cap * tanh(z / cap): not supported")


def _simplify(factors: list[Factor]) -> list[Factor]:
    """Fold numbers into one and cancel a node multiplied and divided by."""
    number = math.prod(f for f in factors if isinstance(f, float))
    symbols: list[tuple[Node, int]] = []
    for f in factors:
        if isinstance(f, float):
            continue
        opposite = next((i for i, s in enumerate(symbols) if s[0] is f[0] and s[1] == -f[1]), None)
        if opposite is not None:
            symbols.pop(opposite)
        else:
            symbols.append(f)
    return ([number] if number != 1.0 else []) + symbols


# ----------------------------------------------------------------------------- label shift


def _find_shift(m: Match) -> None:
    """Recognize ``logits[..., :-k, :]`` with ``labels[..., k:]``: then the op gets the unsliced
    embeddings and labels with ``shift=k`` (no copy of the sliced embeddings)."""
    if not m.steps or m.steps[0].kind != "getitem" or any(
        s.kind not in _RESHAPES and s.kind != "getitem" for s in m.steps[1:]
    ) or any(s.kind == "getitem" for s in m.steps[1:]):
        return
    z = N.tensor_value(m.projection)
    if z.dim() < 2 or m.class_dim != N.tensor_value(m.logits).dim() - 1:
        return
    k = _token_slice(m.steps[0].node.args[1], z.dim(), stop=True)
    if k is None:
        return
    # targets: reshapes / contiguous / integer casts / same-device moves of y[..., k:]
    node = m.targets
    while not N.is_kind(node, "getitem"):
        kind = N.kind_of(node)
        if kind not in _RESHAPES + ("identity", "cast") or not node.args:
            return
        src, dst = N.tensor_value(node.args[0]), N.tensor_value(node)
        if src is None or src.device != dst.device or src.is_floating_point() or dst.is_floating_point():
            return
        node = node.args[0]
    y = node.args[0]
    yv = N.tensor_value(y)
    if yv is None or yv.is_floating_point() or yv.dim() != z.dim() - 1 or yv.device != z.device:
        return
    if _token_slice(node.args[1], yv.dim(), stop=False) != k:
        return
    if not N.same_shape(tuple(yv.shape), tuple(z.shape[:-1])):
        return
    t = N.tensor_value(m.targets)
    sliced = N.tensor_value(node)
    if m.reduction == "none" and not N.same_shape(tuple(t.shape), tuple(sliced.shape)):
        if t.dim() != 1:
            return
        m.shift_reshape = True
    m.shift, m.shift_targets = k, y


def _token_slice(index: Any, ndim: int, stop: bool) -> int | None:
    """k when ``index`` slices only the last token dim as ``:-k`` (stop=True, the logits, whose
    last dim is the class dim) or ``k:`` (stop=False, the labels)."""
    elements = _index_elements(index)
    if any(e is None or isinstance(e, (int, Node)) for e in elements):
        return None
    dim = ndim - 2 if stop else ndim - 1
    if Ellipsis in elements:
        i = elements.index(Ellipsis)
        before, after = elements[:i], elements[i + 1 :]
        positions = list(range(len(before))) + list(range(ndim - len(after), ndim))
        elements = before + after
    else:
        positions = list(range(len(elements)))
    k = None
    for pos, e in zip(positions, elements):
        if pos == dim:
            if not isinstance(e, slice) or e.step not in (None, 1):
                return None
            if stop and e.start in (None, 0) and isinstance(e.stop, int) and e.stop < 0:
                k = -e.stop
            elif not stop and e.stop is None and isinstance(e.start, int) and e.start > 0:
                k = e.start
            else:
                return None
        elif not _is_full_slice(e):
            return None
    return k

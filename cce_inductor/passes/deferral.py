"""Returned logits, deferred: the graph returns what they are made of, the caller gets a tensor
that forms them when read (:class:`cce_inductor.deferred.DeferredLogits`).

Used by the ``"cce"`` backend only: it owns the callable Dynamo runs, so it can give back other
graph outputs than the graph had and put the deferred tensors in their places
(:meth:`Deferral.wrap`). ``enable()``'s pre-grad pass runs inside Inductor, whose caller expects the
graph's outputs unchanged.

A graph output is deferred when it is the output of the projection of a rewritten site (a
``linear`` / ``matmul`` whose weight feeds a ``linear_cross_entropy`` or ``linear_token_stats`` call), or is reached from it
through cheap elementwise and shape ops (softcap, scaling, casts, views, a bias add), and none of
those nodes has a user left in the graph other than the output. The recipe is those nodes, copied
into a small graph module whose inputs are the ingredients: every other tensor they read (the
hidden states, the weight, the bias, scalar tensors). It is checked on the fake values before it
is used: it must reproduce the output's shape, dtype and strides with autocast off, else the
output stays as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from ..deferred import Recipe, defer, install_step_hook
from ..ops import linear_cross_entropy
from ..token_stats import linear_token_stats
from . import nodes as N

log = logging.getLogger("cce_inductor")

# Operations a recipe may replay after the projection: elementwise with scalars or small tensors,
# casts and views. Anything else (a reduction, a softmax, a random op) keeps the output as it is.
_RECIPE_KINDS = (
    "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "identity", "cast",
    "mul", "div", "neg", "tanh", "add", "transpose", "t", "permute", "movedim",
)


@dataclass
class DeferredOutput:
    """One deferred graph output."""

    node: str  # the output node's name in the original graph
    projection: Node
    recipe: Recipe
    ingredients: list[int]  # indices into the new graph's outputs
    positions: list[int] = field(default_factory=list)  # where it stood in the original outputs


@dataclass
class Deferral:
    """How the new graph's outputs map back to the original ones."""

    arity: int  # outputs of the original graph
    kept: list[tuple[int, int]]  # (original position, new position)
    deferred: list[DeferredOutput]

    def wrap(self, compiled, detach: bool = False):
        """The callable Dynamo runs: the compiled graph, then the deferred outputs rebuilt
        (without autograd history with ``detach``: the ``detach_logits`` option)."""
        metadata = _MetadataCache()
        install_step_hook()

        def rebuild(outs):
            result: list[Any] = [None] * self.arity
            for old, new in self.kept:
                result[old] = outs[new]
            for d in self.deferred:
                ingredients = [outs[i] for i in d.ingredients]
                like = metadata.like(d.recipe, ingredients)
                logits = defer(d.recipe, like, ingredients, track_grad=not detach)
                for pos in d.positions:
                    result[pos] = logits
            return type(outs)(result) if isinstance(outs, tuple) else result

        def run(*args):
            return rebuild(compiled(*args))

        return run


class _MetadataCache:
    """The deferred output's shape, dtype and strides, from the recipe run on meta tensors (once per
    set of ingredient layouts: sizes may be symbolic in the graph)."""

    def __init__(self):
        self.cache: dict = {}

    def like(self, recipe: Recipe, ingredients: list[torch.Tensor]) -> torch.Tensor:
        key = (id(recipe), *((tuple(t.shape), t.stride(), t.dtype) for t in ingredients))
        hit = self.cache.get(key)
        if hit is None:
            metas = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in ingredients]
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                hit = self.cache[key] = recipe.fn(*metas)
        return hit


# ----------------------------------------------------------------------------- planning


def plan_deferral(graph: Graph) -> Deferral | None:
    """Defer the returned logits of ``graph``'s rewritten sites, changing its outputs in place;
    None (graph unchanged) where there is nothing to defer."""
    output = next((n for n in graph.nodes if n.op == "output"), None)
    if output is None or not isinstance(output.args[0], (tuple, list)):
        return None
    outs = list(output.args[0])
    projections = _rewritten_projections(graph)
    if not projections:
        return None
    deferred: dict[Node, DeferredOutput] = {}
    for pos, node in enumerate(outs):
        if node in deferred:
            deferred[node].positions.append(pos)
            continue
        found = _deferrable(node, projections, output)
        if found is not None:
            found.positions.append(pos)
            deferred[node] = found
    if not deferred:
        return None
    # New outputs: the kept ones in order, then each ingredient once.
    kept = [(pos, node) for pos, node in enumerate(outs) if node not in deferred]
    new_outs: list[Any] = [node for _, node in kept]
    index: dict[Node, int] = {}
    for d in deferred.values():
        for ingredient in d.ingredients:  # still nodes here; replaced by indices below
            if ingredient not in index:
                index[ingredient] = len(new_outs)
                new_outs.append(ingredient)
        d.ingredients = [index[i] for i in d.ingredients]
    output.args = (type(output.args[0])(new_outs),)
    for node in deferred:
        _prune(graph, node)
    return Deferral(len(outs), [(pos, new) for new, (pos, _) in enumerate(kept)], list(deferred.values()))


def _rewritten_projections(graph: Graph) -> set[Node]:
    """Projections (linear / matmul nodes) reading a weight that feeds a linear_cross_entropy or a
    linear_token_stats call."""
    weights: set[Node] = set()
    for node in graph.nodes:
        rewritten = node.op == "call_function" and node.target in (linear_cross_entropy, linear_token_stats)
        if rewritten and len(node.args) > 1:
            w = node.args[1]
            weights.add(w)
            if isinstance(w, Node) and (N.is_kind(w, "t") or N.is_transpose_attr(w)):
                weights.add(w.args[0])
    return {
        n for n in graph.nodes
        if (N.is_kind(n, "linear") or N.is_kind(n, "matmul")) and any(a in weights for a in n.args[1:2])
    }


def _deferrable(node: Any, projections: set[Node], output: Node) -> DeferredOutput | None:
    """The recipe of a graph output reached from a rewritten projection, or None."""
    if not isinstance(node, Node) or N.tensor_value(node) is None:
        return None
    chain: list[Node] = []  # output back to the projection
    cur = node
    while cur not in projections:
        if not any(N.is_kind(cur, k) for k in _RECIPE_KINDS) and not N.is_transpose_attr(cur):
            return None
        upstream = [a for a in cur.all_input_nodes if _reaches(a, projections)]
        if len(upstream) != 1:
            return None
        chain.append(cur)
        cur = upstream[0]
    chain.append(cur)
    members = set(chain)
    if any(user not in members and user is not output for n in chain for user in n.users):
        return None  # the logits (or a step toward them) are used inside the graph: they stay
    if any(N.is_mutation(n) for n in chain):
        return None
    ingredients = [a for n in reversed(chain) for a in n.all_input_nodes if a not in members]
    ingredients = list(dict.fromkeys(ingredients))
    if any(N.tensor_value(a) is None for a in ingredients):
        return None  # e.g. a symbolic size read from another tensor
    fn = _recipe_module(list(reversed(chain)), ingredients)
    if not _reproduces(fn, ingredients, node):
        return None
    steps = " -> ".join(N.describe(n) for n in reversed(chain))
    return DeferredOutput(node.name, cur, Recipe(fn, steps), ingredients)


def _reaches(node: Node, projections: set[Node], depth: int = 0) -> bool:
    if node in projections:
        return True
    if depth > 32 or not (any(N.is_kind(node, k) for k in _RECIPE_KINDS) or N.is_transpose_attr(node)):
        return False
    return any(_reaches(a, projections, depth + 1) for a in node.all_input_nodes)


def _recipe_module(chain: list[Node], ingredients: list[Node]) -> GraphModule:
    """The chain (projection first) as a graph module of the ingredients. The projection computes
    in its output's dtype (what autocast gave it in the graph), casting its inputs to it."""
    g = Graph()
    env: dict[Node, Node] = {}
    for i, node in enumerate(ingredients):
        env[node] = g.placeholder(f"ingredient_{i}")
    projection = chain[0]
    out_dtype = N.tensor_value(projection).dtype

    def projection_input(a: Node) -> Node:
        return _cast(g, env[a], out_dtype) if _float_differs(a, out_dtype) else env[a]

    for node in chain:
        if node is projection:
            args = map_arg(node.args, projection_input)
            kwargs = map_arg(node.kwargs, projection_input)
            env[node] = g.create_node(node.op, node.target, args, kwargs)
        else:
            env[node] = g.node_copy(node, lambda a: env[a])
    g.output(env[chain[-1]])
    return GraphModule(torch.nn.Module(), g)


def _float_differs(node: Node, dtype: torch.dtype) -> bool:
    v = N.tensor_value(node)
    return v is not None and v.is_floating_point() and v.dtype != dtype


def _cast(g: Graph, node: Node, dtype: torch.dtype) -> Node:
    return g.call_method("to", (node, dtype))


def _reproduces(fn: GraphModule, ingredients: list[Node], node: Node) -> bool:
    """Whether the recipe, run on the fake values with autocast off, gives the output's layout."""
    expected = N.tensor_value(node)
    values = [N.tensor_value(a) for a in ingredients]
    fake_mode = next((getattr(v, "fake_mode", None) for v in values if getattr(v, "fake_mode", None)), None)
    if fake_mode is None:
        return False
    try:
        with fake_mode, torch.no_grad(), torch.autocast(expected.device.type, enabled=False):
            got = fn(*values)
    except Exception:  # noqa: BLE001 - a recipe that does not run is not used
        log.debug("cce: deferring %s: the recipe did not run on fake values", node.name, exc_info=True)
        return False
    return (
        got.dtype == expected.dtype
        and N.same_shape(got.shape, expected.shape)
        and N.same_shape(got.stride(), expected.stride())
    )


def _prune(graph: Graph, node: Node) -> None:
    """Erase the deferred output's nodes, now without users (only those it reached)."""
    work = [node]
    while work:
        n = work.pop()
        if getattr(n, "_erased", False) or n.users or n.op in ("placeholder", "output", "get_attr") or n.is_impure():
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        work.extend(inputs)

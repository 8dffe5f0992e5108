"""Tensor-parallel heads: DTensor sites matched by :mod:`.matcher`, rewritten to the vocab-parallel op.

With ``parallelize_module(model, mesh, {"head": ColwiseParallel(output_layouts=Shard(-1),
use_local_output=False)})`` and ``with loss_parallel(): F.cross_entropy(logits, y)`` (torchtitan's
layout), the Dynamo graph holds DTensors (their layouts in the nodes' example values):

    x   = DTensor.from_local(h, mesh, (Replicate(),))        # ColwiseParallel's input hook; under
          (or  h_dt.redistribute((Replicate(),)) from Shard(1): sequence parallelism, an all-gather)
    z   = linear(x, W)                                       # W: DTensor Shard(0) -> z: Shard(-1)
    z   = z.redistribute((Shard(-1),))                       # its output hook: the layout it has
    ... flatten / view ...
    loss = cross_entropy(z, y)                               # a DTensor, Replicate()

``loss_parallel()`` itself leaves no node: it changes how DTensor computes the loss, not its value.
A ``redistribute`` between the projection and the loss changes only where the logits' values live,
never the values, and ``to_local()`` of replicated logits gives the values themselves, so the
matcher passes both (``passes_through``). The site is rewritten when the projection's weight is
split over the vocabulary on one mesh dim (``Shard(0)`` of a (V, D) weight, ``Replicate()`` on
other mesh dims; under FSDP2 x TP the forward sees it on the tp mesh, gathered over dp), its input
is replicated on that mesh, and the loss is a replicated DTensor (or a plain tensor, of
``to_local()`` logits): each rank then calls ``vocab_parallel_cross_entropy`` on its shard
(:func:`dtensor_linear_cross_entropy`), and no rank forms its N x V/tp logits. Any other layout is
left alone, with the layout named in the reason (:func:`check`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from ..vocab_parallel import is_dtensor, vocab_parallel_cross_entropy
from . import nodes as N

# the op's options a vocab-parallel site does not take (the rewrite drops them; explain() says so)
UNSUPPORTED_OPTIONS = ("filter_dc", "max_workspace_bytes")


@dataclass
class Layout:
    """The parallel layout of a matched site, for explain()."""

    mesh_shape: tuple
    mesh_dim_names: tuple | None
    vocab_mesh_dim: int
    weight_placements: tuple
    input_from: tuple | None  # placements the head's input was redistributed from (sequence parallel)

    def describe(self) -> str:
        names = self.mesh_dim_names
        dim = names[self.vocab_mesh_dim] if names else self.vocab_mesh_dim
        size = self.mesh_shape[self.vocab_mesh_dim]
        text = (f"vocabulary-parallel over mesh dim {dim!r} ({size} ranks) of a {tuple(self.mesh_shape)} mesh; "
                f"weight {_names(self.weight_placements)}")
        if self.input_from is not None:
            text += f", input all-gathered from {_names(self.input_from)} (sequence parallel)"
        else:
            text += ", input replicated"
        return text


def _names(placements) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def is_dtensor_node(node: Any) -> bool:
    return is_dtensor(N.tensor_value(node)) if isinstance(node, Node) else False


def passes_through(node: Node) -> bool:
    """A ``DTensor.redistribute`` of the logits (the same global values in another layout), or the
    ``to_local()`` of replicated logits (the global values themselves, on every rank: what
    ``ColwiseParallel(output_layouts=Replicate())`` gives a loss outside ``loss_parallel()``)."""
    if not node.args or not is_dtensor_node(node.args[0]):
        return False
    name = _dtensor_method(node)
    if name == "redistribute":
        return True
    return name == "to_local" and _replicated(N.tensor_value(node.args[0]))


def _dtensor_method(node: Node) -> str | None:
    """"redistribute" / "to_local" for those DTensor methods as Dynamo records them: a method call,
    or (in older torch, e.g. 2.11) a call of an on-the-fly function named prim_redistribute /
    prim_to_local that closes over the arguments."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name[len("prim_"):] if name in ("prim_redistribute", "prim_to_local") else None
    return None


def _replicated(t) -> bool:
    from torch.distributed.tensor import Replicate

    return all(isinstance(p, Replicate) for p in t.placements)


def outside_hint(node: Node) -> str:
    """For logits that enter the loss's graph as an input: where they are DTensors, the likely
    break (FSDP2's hooks run outside Dynamo)."""
    if not is_dtensor_node(node):
        return ""
    return ("; DTensor logits: a fully_shard on the head alone breaks the graph after it -- shard a "
            "module that holds both the head and the loss (docs/DISTRIBUTED.md)")


class Refused(Exception):
    """A DTensor site the rewrite leaves alone; the message says why."""


def check(m) -> Layout | None:
    """None where no DTensor is involved; else the site's :class:`Layout`, or :class:`Refused`."""
    involved = [m.projection, m.x, m.weight, m.bias, m.targets, m.anchor]
    if not any(is_dtensor_node(n) for n in involved):
        return None
    from torch.distributed.tensor import Replicate, Shard

    if m.projection is None:
        raise Refused("F.linear_cross_entropy of DTensors: not supported")
    w = N.tensor_value(m.weight)
    x = N.tensor_value(m.x)
    if not is_dtensor(w):
        raise Refused("the logits are a DTensor but the weight is not: not supported")
    if not m.weight_is_vd:
        raise Refused("a tensor-parallel head whose weight is stored (D, V): not supported, only F.linear / nn.Linear")
    placements = tuple(w.placements)
    mesh = w.device_mesh
    # type, not isinstance: a _StridedShard (a Shard subclass) does not give each rank one range of rows
    sharded = [i for i, p in enumerate(placements) if type(p) is Shard and p.dim in (0, -2)]
    if len(sharded) != 1 or any(not isinstance(p, Replicate) for i, p in enumerate(placements) if i != sharded[0]):
        raise Refused(
            f"a DTensor head with weight placements {_names(placements)}: only a weight split over the "
            "vocabulary (Shard(0)) on one mesh dim, Replicate() on the others, is rewritten"
        )
    if not is_dtensor(x) or not all(isinstance(p, Replicate) for p in x.placements):
        layout = _names(x.placements) if is_dtensor(x) else "a plain tensor"
        raise Refused(f"the head's input is {layout}: the vocab-parallel rewrite needs it replicated on the mesh")
    if x.device_mesh != mesh:
        raise Refused("the head's input and weight are on different device meshes")
    if m.bias is not None:
        b = N.tensor_value(m.bias)
        if not is_dtensor(b) or tuple(b.placements) != placements or b.dim() != 1:
            raise Refused("the head's bias is not a (V,) DTensor split like its weight")
    t = N.tensor_value(m.targets)
    if is_dtensor(t) and not all(isinstance(p, Replicate) for p in t.placements):
        raise Refused(f"the targets are a DTensor with placements {_names(t.placements)}: only replicated targets")
    loss = N.tensor_value(m.anchor)
    if is_dtensor(loss) and (not _replicated(loss) or loss.device_mesh != mesh):
        raise Refused("the loss is a DTensor not replicated on the head's mesh")
    if m.softcap is not None and not (isinstance(m.label_smoothing, (int, float)) and m.label_smoothing <= 0):
        raise Refused("softcap with label smoothing: the vocab-parallel op does not combine them exactly")
    if not isinstance(m.label_smoothing, (int, float)):
        raise Refused("label_smoothing is not a number known when compiling")
    if any(not isinstance(f, float) for f in m.scale) or (m.softcap is not None and not isinstance(m.softcap, (int, float))):
        raise Refused("a scale or softcap read from a tensor: not supported on a vocab-parallel head")
    return Layout(tuple(mesh.shape), mesh.mesh_dim_names, sharded[0], placements, _sequence_parallel_source(m.x))


def _sequence_parallel_source(x: Node) -> tuple | None:
    """The placements the head's input was redistributed from, where it was (SequenceParallel's
    Shard(1) before ColwiseParallel(input_layouts=Shard(1)))."""
    if isinstance(x, Node) and passes_through(x):
        src = N.tensor_value(x.args[0])
        if tuple(src.placements) != tuple(N.tensor_value(x).placements):
            return tuple(src.placements)
    return None


def describe_mode(m, options) -> str:
    """explain()'s "mode" of a vocab-parallel site."""
    x = N.tensor_value(m.x)
    local = getattr(x, "_local_tensor", x)
    impl = options.impl if options.impl != "auto" else ("triton" if local.device.type == "cuda" else "torch")
    text = f"vocab-parallel, the {impl} path over this rank's rows, exact"
    ignored = [k for k in UNSUPPORTED_OPTIONS if getattr(options, k, None)]
    if not options.exact:
        ignored.append("exact=False")
    if ignored:
        text += f" ({', '.join(ignored)} not used here)"
    return text


def site_call(m, kwargs: dict) -> tuple:
    """The function and keyword arguments the rewrite calls in place of the loss."""
    kwargs = {k: v for k, v in kwargs.items() if k not in UNSUPPORTED_OPTIONS}
    unknown = sorted(set(kwargs) - set(inspect.signature(vocab_parallel_cross_entropy).parameters))
    if unknown:  # an option of the single-device op this one lacks: leave the site as it is
        from .matcher import NoMatch

        raise NoMatch(f"the vocab-parallel op does not take {', '.join(unknown)}")
    # exact: the gradient filter bounds what each shard drops, so over tp shards its bound on a
    # token's loss of gradient would be tp times the one exact=False promises
    kwargs["exact"] = True
    loss = N.tensor_value(m.anchor)
    kwargs["out_placements"] = tuple(loss.placements) if is_dtensor(loss) else None
    return dtensor_linear_cross_entropy, kwargs


def dtensor_linear_cross_entropy(e, c, targets, bias=None, *, out_placements, **kwargs):
    """``vocab_parallel_cross_entropy`` of DTensors; its result a DTensor with ``out_placements``
    on the weight's mesh as the loss was (None: a plain tensor, the loss of ``to_local()`` logits)."""
    from torch.distributed.tensor import DTensor

    out = vocab_parallel_cross_entropy(e, c, targets, bias, **kwargs)
    if out_placements is None:
        return out
    return DTensor.from_local(out, c.device_mesh, out_placements, run_check=False)

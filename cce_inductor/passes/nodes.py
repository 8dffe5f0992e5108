"""Node predicates and argument readers for the Dynamo (torch-IR) graph.

One predicate per node kind; each accepts the ``call_function`` form (``torch.x``, ``F.x``,
``operator.x``) and the ``call_method`` form (``tensor.x(...)``) of the same operation. Fake-tensor
metadata is read in one place, :func:`value`.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node


def _existing(*objs):
    return tuple(o for o in objs if o is not None)


def _torch_attr(path: str):
    """``torch.a.b.c`` or None where this torch version lacks it."""
    obj: Any = torch
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# kind -> (call_function targets, call_method names)
_KINDS: dict[str, tuple[tuple, tuple[str, ...]]] = {
    "linear": (_existing(torch._C._nn.linear, F.linear), ()),
    "matmul": ((operator.matmul, torch.matmul, torch.mm), ("matmul", "mm", "__matmul__")),
    "reshape": ((torch.reshape,), ("view", "reshape")),
    "flatten": ((torch.flatten,), ("flatten",)),
    "unflatten": (_existing(_torch_attr("unflatten")), ("unflatten",)),
    "squeeze": ((torch.squeeze,), ("squeeze",)),
    "unsqueeze": ((torch.unsqueeze,), ("unsqueeze",)),
    "transpose": ((torch.transpose, torch.swapaxes, torch.swapdims), ("transpose", "swapaxes", "swapdims")),
    "t": ((torch.t,), ("t",)),
    "permute": ((torch.permute,), ("permute",)),
    "movedim": ((torch.movedim, torch.moveaxis), ("movedim", "moveaxis")),
    "getitem": ((operator.getitem,), ("__getitem__",)),
    "identity": ((torch.clone,), ("contiguous", "clone")),
    "cast": ((), ("float", "double", "half", "bfloat16", "long", "int", "to", "type", "type_as")),
    "mul": ((operator.mul, torch.mul, torch.multiply), ("mul", "multiply", "__mul__", "__rmul__")),
    "div": ((operator.truediv, torch.div, torch.true_divide, torch.divide), ("div", "divide", "true_divide", "__truediv__")),
    "neg": ((operator.neg, torch.neg, torch.negative), ("neg", "negative", "__neg__")),
    "tanh": (_existing(torch.tanh, getattr(F, "tanh", None)), ("tanh",)),
    "add": ((operator.add, torch.add), ("add", "__add__", "__radd__")),
    "log_softmax": ((F.log_softmax, torch.log_softmax), ("log_softmax",)),
    "cross_entropy": ((F.cross_entropy,), ()),
    "nll_loss": ((F.nll_loss,), ()),
    "linear_cross_entropy": (_existing(getattr(F, "linear_cross_entropy", None)), ()),
    "size": (_existing(_torch_attr("ops.aten.sym_size.int"), _torch_attr("ops.aten.sym_size")), ("size",)),
    "detach": ((torch.detach,), ("detach",)),
    "autocast_enter": (_existing(_torch_attr("amp.autocast_mode._enter_autocast")), ()),
    "autocast_exit": (_existing(_torch_attr("amp.autocast_mode._exit_autocast")), ()),
    "set_grad_enabled": (_existing(_torch_attr("_C._set_grad_enabled")), ()),
    "inference_mode": (
        _existing(_torch_attr("autograd.grad_mode._enter_inference_mode"), _torch_attr("autograd.grad_mode._exit_inference_mode")),
        (),
    ),
    # products the rewrite does not take as the projection (named in the reasons it gives)
    "einsum": ((torch.einsum,), ()),
    "batched_product": ((torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm, torch.tensordot), ("bmm", "baddbmm", "addmm")),
}

LOSS_KINDS = ("cross_entropy", "nll_loss", "linear_cross_entropy")
AUTOCAST_ENTER = _torch_attr("amp.autocast_mode._enter_autocast")
AUTOCAST_EXIT = _torch_attr("amp.autocast_mode._exit_autocast")


def hop_region(node: Any) -> str | None:
    """For a call of a higher-order op (the body of ``torch.utils.checkpoint``, a ``torch.cond``
    branch, ...), what it is, in the user's words; None for any other node."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    target = node.target
    hop = getattr(torch._ops, "HigherOrderOperator", None)
    if hop is None or not isinstance(target, hop):
        return None
    name = target.name() if callable(getattr(target, "name", None)) else str(target)
    return _HOP_REGIONS.get(name, f"the higher-order op {name}")


_HOP_REGIONS = {
    "tag_activation_checkpoint": "a torch.utils.checkpoint region",
    "wrap": "a wrapped region",
    "cond": "a torch.cond branch",
    "while_loop": "a torch.while_loop body",
    "map_impl": "a torch.map body",
    "scan": "a torch.scan body",
    "invoke_subgraph": "a nested compile region",
    "flex_attention": "a flex_attention score function",
}


def is_checkpoint_region(node: Any) -> bool:
    """A ``torch.utils.checkpoint`` call (non-reentrant) as Dynamo records it."""
    return hop_region(node) == _HOP_REGIONS["tag_activation_checkpoint"]


def subgraph_modules(node: Node) -> list:
    """The graph modules a higher-order op call runs (its ``get_attr`` arguments)."""
    owner = node.graph.owning_module
    out = []
    for a in node.all_input_nodes:
        if a.op == "get_attr" and owner is not None:
            try:
                module = owner.get_submodule(a.target)
            except AttributeError:
                continue
            if isinstance(module, torch.fx.GraphModule):
                out.append(module)
    return out


def is_kind(node: Any, kind: str) -> bool:
    """Whether ``node`` is a call of the operation ``kind`` in either form."""
    if not isinstance(node, Node):
        return False
    functions, methods = _KINDS[kind]
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    if node.op == "call_method":
        return node.target in methods
    return False


def kind_of(node: Node) -> str | None:
    for kind in _KINDS:
        if is_kind(node, kind):
            return kind
    if is_transpose_attr(node):
        return "t"
    return None


def is_transpose_attr(node: Any) -> bool:
    """``w.T`` / ``w.mT``: a ``getattr`` call in the Dynamo graph."""
    return (
        isinstance(node, Node)
        and node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in ("T", "mT")
    )


_INPLACE_OPERATORS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv)


def is_mutation(node: Node) -> bool:
    """Whether ``node`` may write to one of its inputs: an in-place method (``x.div_()``),
    ``x[...] = v``, an augmented assignment, an ``out=`` or ``inplace=True`` call, or a mutable op."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op != "call_function":
        return False
    target = node.target
    if any(target is t for t in _INPLACE_OPERATORS):
        return True
    if node.kwargs.get("out") is not None or node.kwargs.get("inplace") is True:
        return True
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return bool(getattr(schema, "is_mutable", False))
    name = getattr(target, "__name__", "") or ""
    return name.endswith("_") and not name.startswith("_")


# ----------------------------------------------------------------------------- metadata


def value(node: Any) -> Any:
    """The fake value of a node (Dynamo's ``example_value``; ``val`` in later graphs), or the
    argument itself where it is not a node (a Python constant)."""
    if not isinstance(node, Node):
        return node
    meta = node.meta
    if "example_value" in meta:
        return meta["example_value"]
    if "val" in meta:
        return meta["val"]
    if node.op == "get_attr" and node.graph.owning_module is not None:
        # parameters as attributes (torch without inlined nn modules): the real tensor
        try:
            return node.graph.owning_module.get_parameter(node.target)
        except AttributeError:
            try:
                return node.graph.owning_module.get_buffer(node.target)
            except AttributeError:
                return None
    return None


def tensor_value(node: Any) -> torch.Tensor | None:
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def is_scalar(arg: Any) -> bool:
    """A Python number, a symbolic number, or a node producing one (not a tensor)."""
    v = value(arg)
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, float, torch.SymInt, torch.SymFloat))


def is_scalar_tensor(arg: Any) -> bool:
    v = tensor_value(arg)
    return v is not None and v.dim() == 0 and v.is_floating_point()


def hint(x: Any) -> Any:
    """A concrete number for a possibly symbolic one (its hint), or None if there is none."""
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        h = getattr(x.node, "hint", None)
        return h
    return x


def same_size(a: Any, b: Any) -> bool:
    """Whether two (possibly symbolic) sizes are provably equal, without adding a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - very old torch
        return a is b


def same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- arguments


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument ``name`` at position ``index`` (the tensor itself is position
    0 in both forms: ``torch.f(x, ...)`` and ``x.f(...)``)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def varargs(node: Node, start: int, name: str) -> Any:
    """Arguments given as ``f(x, a, b)`` or ``f(x, (a, b))`` or ``f(x, name=(a, b))``."""
    rest = node.args[start:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return tuple(rest[0])
    if rest:
        return tuple(rest)
    got = node.kwargs.get(name)
    if isinstance(got, (tuple, list, torch.Size)):
        return tuple(got)
    return None if got is None else (got,)


def bind(node: Node, fn) -> inspect.BoundArguments | None:
    """Bind a ``call_function`` node's arguments to ``fn``'s signature, defaults applied."""
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return bound


def location(node: Node) -> str:
    """``file:line`` of the user code that produced the node, from its stack trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    if not frames:
        return ""
    # 'File "/path/x.py", line 12, in forward'
    parts = frames[-1].split(",")
    path = parts[0][len("File ") :].strip().strip('"')
    line = parts[1].strip().replace("line ", "") if len(parts) > 1 else "?"
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def normalize_dim(dim: Any, ndim: int) -> int | None:
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    if not -ndim <= dim < max(ndim, 1):
        return None
    return dim % ndim if ndim else 0


def describe(node: Node) -> str:
    """A short readable name for the operation of a node."""
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__name__", None) or str(target)
        module = getattr(target, "__module__", "") or ""
        if module.startswith("torch.nn.functional") or module == "torch._C._nn":
            return f"F.{name}"
        if module == "_operator":
            return f"operator.{name}"
        if module.startswith("torch"):
            return f"torch.{name}"
        return name
    return f"{node.op} {node.target}"

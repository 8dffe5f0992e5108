"""The matcher and rewrite on hand-built graphs, without compiling: forms Dynamo does not produce
on this torch version, and the metadata of the rewritten graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule

import cce_inductor
from cce_inductor.passes import Options, rewrite_graph
from cce_inductor.passes.explanation import _fmt_bytes
from passes_helpers import assert_close

N, D, V = 9, 8, 97


def _placeholder(graph, name, value):
    node = graph.placeholder(name)
    node.meta["example_value"] = value
    return node


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / 3
    b = torch.randn(V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    return x, w, b, y


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="F.linear_cross_entropy needs torch >= 2.13")
def test_fused_linear_cross_entropy_call_is_rewritten():
    """Where a torch version keeps F.linear_cross_entropy as one call in the graph."""
    x, w, b, y = _inputs()
    graph = Graph()
    xs, ws, bs, ys = (_placeholder(graph, n, v) for n, v in zip("xwby", (x, w, b, y)))
    loss = graph.call_function(F.linear_cross_entropy, (xs, ws, ys), {"linear_bias": bs, "reduction": "sum"})
    loss.meta["example_value"] = F.linear_cross_entropy(x, w, y, linear_bias=b, reduction="sum")
    graph.output(loss)
    (report,) = rewrite_graph(graph)
    assert report.status == "rewritten" and report.kind == "linear_cross_entropy"
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [cce_inductor.linear_cross_entropy]
    gm = GraphModule(torch.nn.Module(), graph)
    assert_close(gm(x, w, b, y), F.cross_entropy(x @ w.T + b, y, reduction="sum"))


def test_rewritten_nodes_carry_fake_values():
    x, w, b, y = _inputs()
    seen = {}

    def backend(gm, example_inputs):
        rewrite_graph(gm.graph)
        for node in gm.graph.nodes:
            if node.target is cce_inductor.linear_cross_entropy:
                seen["value"] = node.meta.get("example_value")
        gm.recompile()
        return gm.forward

    def fn(x, w, b, y):
        return F.cross_entropy(F.linear(x, w, b), y)

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(x, w, b, y)
    assert isinstance(seen["value"], torch.Tensor) and seen["value"].shape == ()


def test_options_validate():
    with pytest.raises(TypeError, match="unknown cce option"):
        Options.from_kwargs(detach=True)
    with pytest.raises(ValueError, match="impl"):
        Options(impl="cuda")
    with pytest.raises(TypeError, match="bool"):
        Options(exact=1)


def test_byte_formatting():
    assert _fmt_bytes(512) == "512 B"
    assert _fmt_bytes(3 * 2**30) == "3.0 GiB"
    assert _fmt_bytes(None) == "? B"


def test_parameters_as_get_attr_nodes():
    """Older torch (nn modules not inlined) reads parameters with get_attr: their values come
    from the module."""
    x, w, b, y = _inputs()
    root = torch.nn.Module()
    root.weight = torch.nn.Parameter(w)
    graph = Graph()
    xs, ys = _placeholder(graph, "x", x), _placeholder(graph, "y", y)
    ws = graph.get_attr("weight")
    z = graph.call_function(F.linear, (xs, ws, None))
    z.meta["example_value"] = F.linear(x, root.weight)
    loss = graph.call_function(F.cross_entropy, (z, ys))
    loss.meta["example_value"] = F.cross_entropy(z.meta["example_value"], y)
    graph.output(loss)
    gm = GraphModule(root, graph)
    (report,) = rewrite_graph(gm.graph)
    assert report.status == "rewritten", report.reason
    gm.recompile()
    assert_close(gm(x, y).detach(), F.cross_entropy(x @ w.T, y))

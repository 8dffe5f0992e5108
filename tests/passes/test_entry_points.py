"""enable() / disable(), the CustomGraphPass, explain(), the backend by name, and the compile cache.

The last two run in subprocesses: the backend must be found by name in a process that has not
imported cce_inductor, and a second process sharing the first one's Inductor cache must compute
the same results (with torch >= 2.12 the pre-grad pass does not even run on a cache hit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import cce_inductor
from cce_inductor.passes import CCEGraphPass, Options
from cce_inductor.passes import enabling as enable_mod
from passes_helpers import assert_grads_close, assert_outputs_close, compiled_step, run_step, uses_op

B, T, D, V = 2, 7, 8, 97


@pytest.fixture(autouse=True)
def _clean_state():
    torch._dynamo.reset()
    previous = inductor_config.pre_grad_custom_pass
    yield
    inductor_config.pre_grad_custom_pass = previous
    torch._dynamo.reset()


def _problem(seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(D, V)
    h = torch.randn(B, T, D, requires_grad=True)
    y = torch.randint(0, V, (B, T))

    def fn(h, y):
        return F.cross_entropy(lin(h).float().view(-1, V), y.view(-1))

    return fn, [h, *lin.parameters()], (h, y)


class MarkerPass(CustomGraphPass):
    """A user's own pre-grad pass: records the loss calls it sees (before the rewrite)."""

    seen: list = []

    def __call__(self, graph):
        MarkerPass.seen.append(sum(1 for n in graph.nodes if n.target is F.cross_entropy))

    def uuid(self):
        return "marker-pass-v1"


# ----------------------------------------------------------------------------- enable / disable


@contextlib.contextmanager
def _graph_caches_off():
    """No compiled-graph cache hit, so that pre-grad passes run (the kernel caches stay on)."""
    import torch._functorch.config as functorch_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def _installed():
    return enable_mod._passes(inductor_config.pre_grad_custom_pass)


def test_enable_until_disable():
    cce_inductor.enable()
    assert [type(p) for p in _installed()] == [CCEGraphPass]
    cce_inductor.disable()
    assert inductor_config.pre_grad_custom_pass is None


def test_enable_as_context_manager_restores():
    with cce_inductor.enable(exact=True) as handle:
        assert handle.options == Options(exact=True)
        with cce_inductor.enable(detach_logits=True):  # replaces the options, does not stack
            (p,) = _installed()
            assert p.options == Options(detach_logits=True)
        (p,) = _installed()
        assert p.options == Options(exact=True)
    assert inductor_config.pre_grad_custom_pass is None


def test_enable_chains_with_an_existing_pass():
    marker = MarkerPass()
    inductor_config.pre_grad_custom_pass = marker
    cce_inductor.enable()
    passes = _installed()
    assert passes[0] is marker and isinstance(passes[1], CCEGraphPass)
    cce_inductor.disable()  # takes out only ours
    assert inductor_config.pre_grad_custom_pass is marker
    # defer_logits=False: deferring returned logits rewrites the graph before any pre-grad pass
    with cce_inductor.enable(defer_logits=False):
        MarkerPass.seen.clear()
        fn, params, args = _problem()
        expected, expected_grads = run_step(fn, params, args)
        with _graph_caches_off():
            out, grads, code = compiled_step(fn, params, args, backend="inductor")
        assert MarkerPass.seen == [1], "the user's pass ran first, on the unrewritten graph"
        assert uses_op(code)
        assert_outputs_close(out, expected)
        assert_grads_close(grads, expected_grads, ["h", "weight", "bias"])
    assert inductor_config.pre_grad_custom_pass is marker


def test_enable_chains_on_torch_holding_one_pass(monkeypatch):
    """torch < 2.13 holds one pre-grad pass: both run inside a ChainedPass."""
    monkeypatch.setattr(enable_mod, "_TAKES_LISTS", False)
    marker = MarkerPass()
    inductor_config.pre_grad_custom_pass = marker
    with cce_inductor.enable(defer_logits=False):
        chained = inductor_config.pre_grad_custom_pass
        assert isinstance(chained, enable_mod.ChainedPass)
        assert chained.uuid() == ("marker-pass-v1", CCEGraphPass(Options(defer_logits=False)).uuid())
        MarkerPass.seen.clear()
        fn, params, args = _problem()
        expected, _ = run_step(fn, params, args)
        with _graph_caches_off():
            out, _, code = compiled_step(fn, params, args, backend="inductor")
        assert MarkerPass.seen == [1] and uses_op(code)
        assert_outputs_close(out, expected)
    assert inductor_config.pre_grad_custom_pass is marker


def test_pass_is_picklable_and_keyed_on_source_and_options():
    p = CCEGraphPass(Options(detach_logits=True, impl="torch"))
    q = pickle.loads(pickle.dumps(p))
    assert q == p and q.uuid() == p.uuid()
    assert CCEGraphPass().uuid() != p.uuid()
    from cce_inductor.passes.graph_pass import source_hash

    assert source_hash() in p.uuid()


# ----------------------------------------------------------------------------- explain


def test_explain_reports_sites_shapes_bytes_and_reasons(caplog):
    torch.manual_seed(0)
    lin = nn.Linear(D, V)
    h = torch.randn(B, T, D)
    y = torch.randint(0, V, (B, T))
    p = torch.softmax(torch.randn(B * T, V), -1)

    def fn(h, y):
        z = lin(h)
        good = F.cross_entropy(z[..., :-1, :].float().reshape(-1, V), y[..., 1:].reshape(-1))
        bad = F.cross_entropy(z.view(-1, V), p)
        return good + bad

    with caplog.at_level(logging.INFO, logger="cce_inductor"):
        report = cce_inductor.explain(fn, h, y)
    good, bad = report.sites
    assert good.status == "rewritten" and good.details["shift"] == 1
    assert (good.tokens, good.hidden, good.vocab) == (B * T, D, V)
    assert good.bytes_avoided > 0 and good.location.startswith("test_entry_points.py:")
    assert bad.status == "skipped" and "probability targets" in bad.reason
    assert [r.node for r in good.remaining] == ["z"] and "used by .view()" in good.remaining[0].why
    text = str(report)
    for expected in ("1 rewritten, 1 left alone", "[rewritten] cross_entropy", "[skipped] cross_entropy",
                     f"logits {B * T} x {V} (float32), hidden {D}", "shift=1", "probability targets"):
        assert expected in text, (expected, text)
    assert "1 rewritten, 1 left alone" in caplog.text


def test_explain_repeats_and_survives_graph_breaks():
    torch.manual_seed(0)
    lin = nn.Linear(D, V)
    h = torch.randn(B, T, D)
    y = torch.randint(0, V, (B, T))

    def fn(h, y):
        z = lin(h)
        torch._dynamo.graph_break()
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    first = cce_inductor.explain(fn, h, y)
    second = cce_inductor.explain(fn, h, y)  # Dynamo reuses the graphs it traced: still reported
    assert str(first) == str(second)
    assert len(first.graphs) == 2 and [s.status for s in first.sites] == ["skipped"]
    assert first.sites[0].reason.startswith("no projection in this graph")
    (where,) = first.breaks
    assert where.location == f"test_entry_points.py:{fn.__code__.co_firstlineno + 2}"
    assert "graph_break" in where.cause and "(see the graph breaks below)" in str(first)


def test_explain_names_a_logging_break_and_its_fix():
    """A logger call between the head and the loss breaks the graph: explain() says where, why
    and the line that keeps the graph whole."""
    torch.manual_seed(0)
    lin = nn.Linear(D, V)
    h, y = torch.randn(B, T, D), torch.randint(0, V, (B, T))
    logger = logging.getLogger("cce_inductor.tests")

    def fn(h, y):
        z = lin(h)
        logger.info("between the head and the loss")
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    report = cce_inductor.explain(fn, h, y)
    assert [s.status for s in report.sites] == ["skipped"]
    (where,) = report.breaks
    assert where.location == f"test_entry_points.py:{fn.__code__.co_firstlineno + 2}"
    assert "Logger" in where.cause and "ignore_logg" in where.fix


def test_transformers_once_logging_is_skipped_by_dynamo():
    """transformers' warning_once / info_once are added to Dynamo's functions to skip, once, and
    nothing else is changed there."""
    logging_utils = pytest.importorskip("transformers.utils.logging")
    from cce_inductor.passes.log_calls import ignore_setting, trace_through_once_logging

    if not trace_through_once_logging():
        pytest.skip("this torch has no usable ignore_logging_functions")
    ignored = ignore_setting()[1]
    before = set(ignored)
    assert {logging_utils.warning_once, logging_utils.info_once} <= before
    assert trace_through_once_logging() and ignored == before


def test_explain_does_not_depend_on_a_cached_pass():
    """With the compile caches warm, the pass does not run (torch >= 2.12); explain still knows."""
    fn, params, args = _problem()
    with cce_inductor.enable():
        compiled_step(fn, params, args, backend="inductor")
        torch._dynamo.reset()
        compiled_step(fn, params, args, backend="inductor")
        report = cce_inductor.explain(fn, *args)
    assert [s.status for s in report.sites] == ["rewritten"]


# ----------------------------------------------------------------------------- subprocesses

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, torch.nn as nn, torch.nn.functional as F
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    assert "cce_inductor" not in sys.modules
    torch.manual_seed(0)
    lin = nn.Linear(8, 97)
    h = torch.randn(2, 7, 8, requires_grad=True)
    y = torch.randint(0, 97, (2, 7))
    params = [h, *lin.parameters()]

    def fn(h, y):
        logits = lin(h)
        return F.cross_entropy(logits[..., :-1, :].float().reshape(-1, 97), y[..., 1:].reshape(-1))

    def step(f):
        loss = f(h, y)
        return [loss.detach()] + [g.detach() for g in torch.autograd.grad(loss, params)]

    def rel(a, b):
        return max(((x - z).norm() / z.norm()).item() for x, z in zip(a, b))

    eager = step(fn)
    out = {}
    # 1. the backend by name, cce_inductor not imported: the entry point finds it
    got, code = run_and_get_code(lambda: step(torch.compile(fn, backend="cce", fullgraph=True)))
    out["imported_by_entry_point"] = "cce_inductor" in sys.modules
    out["backend_rel_err"] = rel(got, eager)
    out["backend_op_in_code"] = "cce_inductor.lce_forward" in "".join(code) if code else None
    # 2. enable() and the default backend
    import cce_inductor
    torch._dynamo.reset()
    with cce_inductor.enable():
        got2, code2 = run_and_get_code(lambda: step(torch.compile(fn, fullgraph=True)))
    out["enable_rel_err"] = rel(got2, eager)
    out["enable_op_in_code"] = "cce_inductor.lce_forward" in "".join(code2) if code2 else None
    out["loss"] = got[0].item()
    out["cache_hits"] = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    print("RESULT " + json.dumps(out))
    """
)


def _run_script(tmp_path):
    """The script in a new process with this process's Inductor cache directory: the first run
    fills it (or finds it filled by an earlier test run), the second must hit it."""
    script = tmp_path / "cce_cache_script.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_backend_by_name_and_second_process_reuses_the_cache(tmp_path):
    first = _run_script(tmp_path)
    assert first["imported_by_entry_point"]
    assert first["backend_op_in_code"] and first["enable_op_in_code"]
    assert first["backend_rel_err"] < 1e-5 and first["enable_rel_err"] < 1e-5
    second = _run_script(tmp_path)
    assert second["cache_hits"] > 0, "the second process did not hit the compile cache"
    assert second["backend_rel_err"] < 1e-5 and second["enable_rel_err"] < 1e-5
    assert second["loss"] == first["loss"]

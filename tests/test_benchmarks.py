"""The benchmark harness end to end in its CPU smoke mode: JSON, table, plot, failure handling."""

import contextlib
import io
import json
import math
import os
import statistics
import sys

import pytest
import torch

# benchmarks/ is a top-level folder of the repository, not part of the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import lce_bench, methods, plot, table  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run (one tiny shape, both regimes, a sweep of two N, one shared with the shape),
    its JSON and its printed output."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        lce_bench.main(["--smoke", "--shapes", "tiny-a", "--sweep-ns", "32", "64", "--out", str(out)])
    return json.loads(out.read_text()), buf.getvalue(), out


def test_smoke_json_holds_every_point_and_method(smoke):
    data, _, _ = smoke
    meta = data["meta"]
    for key in ("device", "torch", "triton", "python", "date", "command", "peers", "git_commit"):
        assert key in meta
    assert meta["torch"] == torch.__version__
    assert "--smoke" in meta["command"]
    assert set(meta["peers"]) == {"cut-cross-entropy", "liger-kernel"}

    cfg = data["config"]
    names = ("gemm", "torch", "cce_inductor", "cce_inductor_exact", "cut_cross_entropy", "cut_cross_entropy_exact",
             "liger")
    points = [(s["n"], s["d"], s["v"], r) for s in cfg["shapes"] for r in cfg["regimes"]]
    points += [(n, cfg["sweep_shape"]["d"], cfg["sweep_shape"]["v"], r)
               for n in cfg["sweep_ns"] for r in cfg["sweep_regimes"]]
    points = sorted(set(points))
    rows = {(m["n"], m["d"], m["v"], m["regime"], m["method"]): m for m in data["measurements"]}
    assert len(rows) == len(data["measurements"])  # no point measured twice (the sweep reuses N=64)
    assert set(rows) == {p + (name,) for p in points for name in names}
    assert sorted((r["n"], r["d"], r["v"], r["regime"]) for r in data["regimes"]) == points


def test_smoke_numbers_are_sane(smoke):
    data, _, _ = smoke
    main = {(s["n"], s["d"], s["v"]) for s in data["config"]["shapes"]}
    for rec in data["regimes"]:
        stats = rec["stats"]
        assert stats["mean_entropy_nats"] > 0 and 0 < stats["frac_p_ge_2^-12"] <= 1
        assert rec["t_ms"] > 0 and rec["grad_bytes"] > 0
        assert 0 < rec["torch_bf16_err_e"] < 0.1 and 0 < rec["torch_bf16_err_c"] < 0.1
    by_regime = {r["regime"]: r["stats"]["mean_entropy_nats"] for r in data["regimes"] if r["n"] == 64}
    assert by_regime["lm"] < by_regime["uniform"]  # the peaked regime is peaked

    for m in data["measurements"]:
        if m["method"] in ("cut_cross_entropy", "cut_cross_entropy_exact", "liger"):
            assert m["status"] == "skipped" and "smoke" in m["reason"]
            continue
        assert m["status"] == "ok", m
        in_main = (m["n"], m["d"], m["v"]) in main
        if m["method"] == "gemm":
            assert m["fwd_ms"] > 0 and math.isclose(m["fwd_ratio"], 1.0)
            assert m["bwd_ms"] is None and m["fwdbwd_ms"] is None
            continue
        assert m["fwdbwd_ms"] > 0 and m["fwdbwd_ratio"] > 0
        if in_main:
            assert m["fwd_ms"] > 0 and m["bwd_ms"] > 0
            assert set(m["timers"].values()) == {"perf_counter"}
            for name in ("fwd", "bwd", "fwdbwd"):  # the figure is the median of the interleaved rounds
                samples = m["rounds_ms"][name]
                assert len(samples) == data["config"]["rounds"] == 3
                assert m[f"{name}_ms"] == statistics.median(samples)
        else:  # the sweep times forward+backward only, in one round
            assert m["fwd_ms"] is None and m["bwd_ms"] is None
            assert len(m["rounds_ms"]["fwdbwd"]) == data["config"]["sweep_rounds"] == 1
        assert m["fwd_mem_bytes"] is None  # no memory statistics on the CPU
        assert math.isfinite(m["loss"]) and m["loss_rel_err"] < 1e-2
        if m["method"].startswith("cce_inductor"):  # float32 math on bf16 inputs: bf16 rounding of dE only
            assert m["err_e"] < 5e-3 and m["err_c"] < 5e-3


def test_smoke_prints_the_table_last(smoke):
    data, printed, _ = smoke
    text = table.markdown(data)
    assert printed.rstrip().endswith(text.rstrip())
    assert "| method | fwd | bwd | fwd+bwd |" in text
    assert "cuBLAS logits GEMM (T)" in text and "cce_inductor (exact)" in text
    assert "Sweep over N" in text and "N=32" in text
    assert "Not run here:" in text and "liger-kernel FLCE" in text
    assert table.fmt_bytes(8_000_000) == "8.0 MB" and table.fmt_bytes(24_000_000_000) == "24.00 GB"
    assert table.fmt_time(13.7, 1.0) == "13.70 ms (1.00 T)"


def test_plot_writes_a_png(smoke, tmp_path):
    pytest.importorskip("matplotlib")  # the plot's one dependency, in the "bench" extra, not "test"
    _, _, json_path = smoke
    out = tmp_path / "bench.png"
    plot.main([str(json_path), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _raising_method(exc):
    def setup(env):
        def loss(e, c, y):
            raise exc

        return methods.Prepared(loss)

    return methods.Method("broken", "broken", setup)


@pytest.mark.parametrize("exc, status", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB"), "oom"),
    (NotImplementedError("Triton kernels are not written yet"), "error"),
])
def test_failures_are_recorded_and_the_run_goes_on(exc, status):
    registry = dict(methods.METHODS, broken=_raising_method(exc))
    cfg = lce_bench.BenchConfig(
        shapes=(lce_bench.Shape("t", 16, 8, 40),), regimes=("uniform",), methods=("broken", "torch"),
        sweep=True, sweep_shape=lce_bench.Shape("t", 16, 8, 40), sweep_ns=(8, 16, 32), sweep_regimes=("uniform",),
        device="cpu", smoke=True, warmup_ms=0, rep_ms=0, min_reps=1, max_reps=1,
    )
    result = lce_bench.run(cfg, registry)
    rows = {(m.n, m.method): m for m in result.measurements}
    assert rows[(16, "broken")].status == status
    assert rows[(16, "torch")].status == "ok"  # the method after it still ran
    # In the sweep a failed method is not retried at larger N; smaller N are measured.
    assert rows[(8, "broken")].status == status
    assert rows[(32, "broken")].status == "skipped" and f"{status} at N=8" in rows[(32, "broken")].reason
    assert rows[(32, "torch")].status == "ok"
    json.dumps(lce_bench.to_json(result))


def test_a_failure_while_timing_drops_that_methods_times_only():
    calls = {"n": 0}

    def setup(env):
        def loss(e, c, y):
            calls["n"] += 1
            if calls["n"] > 3:  # the first call and the checks pass; a timing round fails
                raise RuntimeError("failed in round 1")
            return methods._torch_loss(e, c, y)
        return methods.Prepared(loss=loss)

    registry = dict(methods.METHODS, flaky=methods.Method("flaky", "flaky", setup))
    cfg = lce_bench.BenchConfig(
        shapes=(lce_bench.Shape("t", 16, 8, 40),), regimes=("uniform",), methods=("flaky", "torch"), sweep=False,
        device="cpu", smoke=True, warmup_ms=0, rep_ms=0, min_reps=1, max_reps=1,
    )
    rows = {m.method: m for m in lce_bench.run(cfg, registry).measurements}
    assert rows["flaky"].status == "error" and "while timing" in rows["flaky"].reason
    assert rows["flaky"].fwd_ms is None and rows["flaky"].loss is not None  # the checks' numbers stay
    assert rows["torch"].status == "ok" and len(rows["torch"].rounds_ms["fwd"]) == 3


def test_unavailable_methods_say_why():
    env = methods.Env(torch.device("cpu"), smoke=False)
    for name in ("cut_cross_entropy", "cut_cross_entropy_exact", "liger", "cce_inductor", "cce_inductor_corrected_dc"):
        with pytest.raises(methods.Unavailable, match="CUDA"):
            methods.METHODS[name].setup(env)
    assert methods.auto_chunker_config_key() in (None, "auto_chunker.enable", "AutoChunker.enable")


def test_cli_rejects_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit):
        lce_bench.config_from_args(["--out", "x.json"])
    cfg, _ = lce_bench.config_from_args(["--smoke", "--shapes", "tiny-a", "8x4x16", "--no-sweep"])
    assert [s.name for s in cfg.shapes] == ["tiny-a", "8x4x16"] and not cfg.sweep
    assert cfg.device == "cpu" and "torch_compile" not in cfg.methods


def test_smoke_compiled_method(tmp_path):
    """torch.compile under the auto-chunker config patch (where this torch has it): compiled once,
    then timed (its backward forbids retain_graph, so the backward timer needs fresh forwards).
    Inductor with its ATen fallbacks: the harness is under test here, not Inductor's C++ kernels."""
    import torch._inductor.config as inductor_config

    out = tmp_path / "c.json"
    with inductor_config.patch(fallback_by_default=True) if hasattr(inductor_config, "fallback_by_default") \
            else contextlib.nullcontext():
        lce_bench.main(["--smoke", "--methods", "torch_compile_chunked", "--shapes", "tiny-a", "--regimes", "uniform",
                        "--no-sweep", "--out", str(out)])
    m = {m["method"]: m for m in json.loads(out.read_text())["measurements"]}["torch_compile_chunked"]
    if methods.auto_chunker_config_key() is None:
        assert m["status"] == "skipped" and "auto_chunker" in m["reason"]
        return
    assert m["status"] == "ok", m
    assert m["fwd_ms"] > 0 and m["bwd_ms"] > 0 and m["fwdbwd_ms"] > 0 and m["first_call_s"] > 0
    assert m["err_e"] < 1e-2 and m["err_c"] < 1e-2


def test_time_budget_skips_sweep_points_and_checkpoints_are_written(tmp_path):
    cfg = lce_bench.BenchConfig(
        shapes=(lce_bench.Shape("t", 16, 8, 40),), regimes=("lm",), methods=("torch",),
        sweep=True, sweep_shape=lce_bench.Shape("t", 16, 8, 40), sweep_ns=(16, 32), sweep_regimes=("lm",),
        device="cpu", smoke=True, warmup_ms=0, rep_ms=0, min_reps=1, max_reps=1, time_budget_s=0.0,
    )
    out = tmp_path / "partial.json"
    seen = []

    def checkpoint(partial):
        seen.append(len(partial.measurements))
        lce_bench.write_json(partial, str(out))

    result = lce_bench.run(cfg, checkpoint=checkpoint)
    assert seen == [2]  # after the one shape point; the sweep point never started
    partial = json.loads(out.read_text())
    assert partial["meta"]["complete"] is False and "Incomplete run" in table.markdown(partial)
    assert result.meta["complete"] is True
    rows = {(m.n, m.method): m for m in result.measurements}
    assert rows[(16, "torch")].status == "ok"  # the shapes always run
    assert rows[(32, "torch")].status == "skipped" and "time budget" in rows[(32, "torch")].reason


def test_filtered_ours_reports_the_kernels_skipped_fraction():
    """On a GPU the filtered method measures s with cce_inductor.kernels.skipped_fraction; here the
    same call runs under the Triton interpreter (set by conftest) on a tiny input."""
    kernels = pytest.importorskip("cce_inductor.kernels")
    if not getattr(kernels, "AVAILABLE", False) or not hasattr(kernels, "skipped_fraction"):
        pytest.skip("no Triton kernels here")
    gpu_env = methods.Env(torch.device("cuda"), smoke=False)  # set up only; nothing runs on it
    prepared = methods.METHODS["cce_inductor"].setup(gpu_env)
    assert prepared.skipped_fraction is kernels.skipped_fraction
    assert methods.METHODS["cce_inductor_exact"].setup(gpu_env).skipped_fraction is None
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        from cce_inductor.testing import make_inputs

        device = "cuda" if torch.cuda.is_available() else "cpu"
        x = make_inputs("lm", 16, 16, 130, dtype=torch.bfloat16, device=device)
        s = prepared.skipped_fraction(x.e, x.c, x.targets)
        assert 0.0 <= s <= 1.0


def test_filtered_rows_say_how_often_the_filter_ran():
    """A filtered method's row notes in how many backward calls its filter ran
    (cce_inductor.filter_choice), from the method's own records, not the process's."""
    import collections
    import types

    from benchmarks.methods import Prepared
    from cce_inductor import filter_choice

    store, c = collections.OrderedDict(), torch.zeros(4, 4)
    with filter_choice.records(store):
        choice = filter_choice.choose(c)
        choice.counts.copy_(torch.tensor([10, 0], dtype=torch.int32))
        choice.record()
        assert not filter_choice.choose(c).filtered
    row = {"note": "impl='triton'"}
    lce_bench._note_filter_choice(row, Prepared(loss=None, filter_records=store), types.SimpleNamespace(c=c))
    assert row["note"] == "impl='triton'; filter ran in 1 of 2 backward calls (filter_choice, latest s 0.0000)"
    assert filter_choice.state(c) is None

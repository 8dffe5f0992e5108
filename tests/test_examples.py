"""Every example, and the model-level benchmark, runs at its small CPU size and does what it shows.

Each test calls the module's main() with the small size (the CPU path of the op behind the rewrite)
and checks the rewrite through explain()'s report, not only that the script finished.
"""

import importlib.util
import json
import math
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(relpath: str):
    """Import a script by its path (examples/ is not a package)."""
    path = ROOT / relpath
    name = "_under_test_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def test_quickstart():
    result = load("examples/quickstart.py").main(["--small", "--steps", "2"])
    assert len(result["report"].rewritten) == 1
    assert result["report"].bytes_avoided >= result["logits_bytes"]
    assert finite(result["losses"]) and result["losses"][1] < result["losses"][0]


def test_hf_causal_lm():
    result = load("examples/hf_causal_lm.py").main(["--small", "--steps", "2"])
    assert len(result["report"].rewritten) == 1
    assert result["logits_require_grad"] is False  # detach_logits=True
    assert finite(result["losses"])


def test_nanogpt():
    result = load("examples/nanogpt.py").main(["--small", "--steps", "2"])
    escaping, loss_only, detached = result["escaping"], result["loss_only"], result["detached"]
    for report in (escaping, loss_only, detached):
        assert len(report.rewritten) == 1
    assert escaping.rewritten[0].remaining, "returned logits must be reported as an N x V tensor that stays"
    assert not loss_only.rewritten[0].remaining
    assert loss_only.bytes_avoided > escaping.bytes_avoided
    assert detached.options.detach_logits
    assert finite(result["losses"]) and result["losses"][1] < result["losses"][0]


def test_classifier():
    result = load("examples/classifier.py").main(["--small", "--steps", "2"])
    assert len(result["report"].rewritten) == 1
    assert finite(result["losses"])


def test_explain_model():
    reports = load("examples/explain_model.py").main(["--small"])
    assert len(reports["loss"].rewritten) == 1 and not reports["loss"].rewritten[0].remaining
    assert len(reports["model"].rewritten) == 1 and reports["model"].rewritten[0].remaining
    assert not reports["weighted"].rewritten and len(reports["weighted"].skipped) == 1
    assert "weight" in reports["weighted"].skipped[0].reason


def test_convergence_small(tmp_path):
    record = load("examples/convergence.py").main(["--small", "--out", str(tmp_path)])
    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs the "bench" extra
        assert (tmp_path / "convergence.png").stat().st_size > 0
    assert json.loads((tmp_path / "convergence.json").read_text())["results"].keys() == record["results"].keys()
    results = record["results"]
    assert set(results) == {"eager", "compile", "cce", "cce_exact", "eager_reseeded"}
    steps = record["config"]["steps"]
    eager = results["eager"]["losses"]
    for way in ("cce", "cce_exact"):
        assert results[way]["explain"]["sites_rewritten"] == 1
    for way, res in results.items():
        assert len(res["losses"]) == steps and finite(res["losses"])
        if way == "eager_reseeded":  # another init: the noise scale, not a copy of eager's curve
            assert res["losses"][0] != eager[0]
            continue
        # float32 on the CPU: every way follows eager's curve to rounding
        assert max(abs(a - b) / abs(b) for a, b in zip(res["losses"], eager)) < 1e-4, way


def test_convergence_data_is_deterministic():
    conv = load("examples/convergence.py")
    cfg = conv.SMALL

    def stream():
        texts, _ = conv.read_stdlib_sources(cfg.text_bytes)
        return conv.tokenize(conv.train_tokenizer(texts, cfg.vocab), texts)

    first, second = stream(), stream()
    assert torch.equal(first, second)
    assert conv.make_batches(first, cfg)[0].equal(conv.make_batches(second, cfg)[0])


def test_model_step_small(tmp_path):
    out = tmp_path / "model_step.json"
    record = load("benchmarks/model_step.py").main(["--small", "--out", str(out), "--backends", "inductor", "cce"])
    assert json.loads(out.read_text())["device"] == record["device"]
    assert [(r["model"], r["backend"]) for r in record["results"]] == [
        (s["name"], b) for s in record["shapes"] for b in ("inductor", "cce")
    ]
    for r in record["results"]:
        assert r["fixed"]["tokens_per_s"] > 0
        assert r["max_batch"] == record["settings"]["max_batch"] and r["max_batch_capped"]
        assert r["compilations"] == 1, "the batch dimension must be compiled as dynamic"


def test_model_step_workspace_backend_without_search(tmp_path, capsys):
    """The third backend (backend="cce" with a 1 GiB workspace; on the CPU the option is ignored) at
    the fixed batch only: it compiles once, no batch is searched, and the report names it."""
    out = tmp_path / "model_step.json"
    record = load("benchmarks/model_step.py").main(
        ["--small", "--out", str(out), "--models", "llama-tiny", "--no-search", "--backends", "inductor", "cce_workspace"])
    assert [r["backend"] for r in record["results"]] == ["inductor", "cce_workspace"]
    for r in record["results"]:
        assert r["fixed"]["tokens_per_s"] > 0 and r["compilations"] == 1
        assert r["max_batch"] is None and r["at_max_batch"] is None and r["probes"] == []
    assert '| llama-tiny (1/16) | backend="cce", 1 GiB workspace |' in capsys.readouterr().out


class _FakeStep:
    """Stands in for model_step.TrainingStep: runs out of memory above ``limit``."""

    device = torch.device("cpu")

    def __init__(self, limit: int, error=torch.OutOfMemoryError):
        self.limit, self.error = limit, error

    def __call__(self, batch: int, seq: int):
        if batch > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")

    def free(self):
        pass


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError], ids=["OutOfMemoryError", "RuntimeError"])
def test_model_step_largest_batch_search(error):
    ms = load("benchmarks/model_step.py")
    best, capped, probes = ms.largest_batch(_FakeStep(37, error), seq=8, start=4, cap=512)
    assert not capped and 37 - 32 // 8 <= best <= 37
    assert all(ok == (b <= 37) for b, ok in probes)
    assert ms.largest_batch(_FakeStep(10**6), seq=8, start=4, cap=512)[:2] == (512, True)
    with pytest.raises(RuntimeError, match="unrelated"):
        ms.fits(_FakeStep(0, lambda msg: RuntimeError("unrelated failure")), 8, 8)

"""Every example, and the model-level benchmark, runs at its small CPU size and does what it shows.

Each test calls the module's main() with the small size (the CPU path of the op behind the rewrite)
and checks the rewrite through explain()'s report and the script's result, not only that it finished.

Inductor compiles here with its ATen fallbacks instead of generated C++ kernels
(``fallback_by_default``): the rewrite, the op's registration with Inductor and the scripts' own code
run as they do elsewhere, without minutes of C++ compilation for the models' bodies on a small CPU.
Inductor's code generation around the op is tested in tests/passes, and the examples run in full at
their GPU sizes in ``scripts/gpu_run.sh``'s examples stage.
"""

import contextlib
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
def _fresh_compiler_with_aten_fallbacks():
    import torch._inductor.config as inductor_config

    fallbacks = (inductor_config.patch(fallback_by_default=True) if hasattr(inductor_config, "fallback_by_default")
                 else contextlib.nullcontext())
    torch.compiler.reset()
    with fallbacks:
        yield
    torch.compiler.reset()


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def falls(losses) -> bool:
    return finite(losses) and all(b < a for a, b in zip(losses, losses[1:]))


def test_quickstart():
    result = load("examples/quickstart.py").main(["--small", "--steps", "2"])
    assert len(result["report"].rewritten) == 1
    assert result["report"].bytes_avoided >= result["logits_bytes"]
    assert falls(result["losses"])


def test_hf_causal_lm():
    result = load("examples/hf_causal_lm.py").main(["--small", "--steps", "2"])
    assert len(result["report"].rewritten) == 1 and result["report"].rewritten[0].deferred
    assert result["logits_formed"] == [False, False]  # returned, never read, never formed
    assert falls(result["losses"])


def test_nanogpt():
    result = load("examples/nanogpt.py").main(["--small", "--steps", "2"])
    returned, loss_only = result["returned"], result["loss_only"]
    for report in (returned, loss_only):
        assert len(report.rewritten) == 1 and not report.rewritten[0].remaining
    assert returned.rewritten[0].deferred and not loss_only.rewritten[0].deferred
    assert result["logits_formed"] == [False, False]
    assert falls(result["losses"])


def test_classifier():
    result = load("examples/classifier.py").main(["--small", "--steps", "2"])
    assert len(result["report"].rewritten) == 1
    assert result["report"].rewritten[0].details["bias"] is True
    assert falls(result["losses"])


def test_grpo():
    result = load("examples/grpo.py").main(["--small", "--iterations", "1"])
    [site] = result["report"].sites
    assert (site.kind, site.status, site.remaining) == ("token_stats", "rewritten", [])
    assert result["relative_difference"] < 1e-5  # float32: eager's loss to rounding
    assert finite(result["losses"]) and all(0 <= r <= result["length"] for r in result["rewards"])


def test_explain_model():
    reports = load("examples/explain_model.py").main(["--small"])
    assert len(reports["loss"].rewritten) == 1 and not reports["loss"].rewritten[0].deferred
    assert len(reports["model"].rewritten) == 1 and reports["model"].rewritten[0].deferred
    assert not reports["soft"].rewritten and len(reports["soft"].skipped) == 1
    assert "probability targets" in reports["soft"].skipped[0].reason


def test_convergence_small(tmp_path, capsys):
    """Two of the five ways (eager and backend="cce"; the others run the same code with another compile
    argument or seed), a few steps; the data is the same when made again."""
    conv = load("examples/convergence.py")
    record = conv.main(["--small", "--steps", "4", "--ways", "eager", "cce", "--out", str(tmp_path)])
    plotted = importlib.util.find_spec("matplotlib") is not None  # the plot needs the "bench" extra
    assert (tmp_path / "convergence.png").exists() == plotted
    assert ("convergence.png" in capsys.readouterr().out.strip().splitlines()[-1]) == plotted
    assert json.loads((tmp_path / "convergence.json").read_text())["results"].keys() == record["results"].keys()
    results = record["results"]
    eager = results["eager"]["losses"]
    assert results["cce"]["explain"]["sites_rewritten"] == 1
    for way, res in results.items():
        assert len(res["losses"]) == 4 and finite(res["losses"])
    # float32 on the CPU: the compiled way follows eager's curve to rounding
    assert max(abs(a - b) / abs(b) for a, b in zip(results["cce"]["losses"], eager)) < 1e-4
    assert results["cce"]["mean_abs_diff_to_eager"] < 1e-3 and results["eager"]["mean_abs_diff_to_eager"] == 0

    texts, _ = conv.read_stdlib_sources(conv.SMALL.text_bytes)  # deterministic data: the same tokens again
    stream = conv.tokenize(conv.train_tokenizer(texts, conv.SMALL.vocab), texts)
    assert conv.hashlib.sha256(stream.numpy().tobytes()).hexdigest()[:16] == record["data"]["sha256_of_tokens"]


def test_model_step_small(tmp_path, capsys):
    """backend="cce" with max_workspace_bytes=0 (on the CPU the same rewrite as plain backend="cce":
    the workspace is a Triton path) on the tiny Llama: the batch search runs to its cap with one
    compilation (the batch is dynamic), and the JSON and the table report it."""
    out = tmp_path / "model_step.json"
    record = load("benchmarks/model_step.py").main(
        ["--small", "--out", str(out), "--models", "llama-tiny", "--backends", "cce_exact"])
    assert json.loads(out.read_text())["device"] == record["device"]
    [r] = record["results"]
    assert (r["model"], r["backend"]) == ("llama-tiny", "cce_exact")
    assert r["fixed"]["tokens_per_s"] > 0
    assert r["max_batch"] == record["settings"]["max_batch"] and r["max_batch_capped"]
    assert r["compilations"] == 1, "the batch dimension must be compiled as dynamic"
    assert '| llama-tiny (1/16) | backend="cce", max_workspace_bytes=0 |' in capsys.readouterr().out


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

"""The README's runnable example runs as written (the README must stay true).

Inductor compiles with its ATen fallbacks here (``fallback_by_default``): the example's code runs as
written, without the C++ compilation of its model's kernels (Inductor's code generation around the
op is tested in tests/passes)."""

import contextlib
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    import torch._inductor.config as inductor_config

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    runnable = [b for b in blocks if "import cce_inductor" in b and "print(cce_inductor.explain" in b]
    assert runnable, "the README lost its runnable example"
    fallbacks = (inductor_config.patch(fallback_by_default=True) if hasattr(inductor_config, "fallback_by_default")
                 else contextlib.nullcontext())
    torch.compiler.reset()
    with fallbacks:
        exec(compile(runnable[0], "<README example>", "exec"), {})
    torch.compiler.reset()
    assert "1 rewritten" in capsys.readouterr().out

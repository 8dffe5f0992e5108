"""The README's runnable example runs as written (the README must stay true)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    runnable = [b for b in blocks if "import cce_inductor" in b and "print(cce_inductor.explain" in b]
    assert runnable, "the README lost its runnable example"
    exec(compile(runnable[0], "<README example>", "exec"), {})
    assert "1 rewritten" in capsys.readouterr().out

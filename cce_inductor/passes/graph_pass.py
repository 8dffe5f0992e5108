"""The rewrite as an Inductor ``CustomGraphPass`` (for ``pre_grad_custom_pass``).

Inductor keys its caches on ``uuid()``: a hash of the source files that decide what the rewrite
produces (this package's ``passes/``, ``ops.py``, ``token_stats.py`` and ``vocab_parallel.py``, whose
``linear_cross_entropy``, ``linear_token_stats`` and ``vocab_parallel_cross_entropy`` are traced into
the compiled graph) together with the options. The object
holds only its options: it is stateless and picklable. From torch 2.12 a pre-grad pass with a uuid
does not run on a cache hit, so nothing may depend on its side effects (its log lines appear on
cache misses only; use ``explain()``).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .options import Options
from .rewrite import rewrite_graph

_PACKAGE = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 of the pass's own sources and of the modules whose functions the rewrite inserts."""
    files = sorted((_PACKAGE / "passes").glob("*.py")) + [_PACKAGE / "ops.py", _PACKAGE / "token_stats.py",
                                                          _PACKAGE / "vocab_parallel.py"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class CCEGraphPass(CustomGraphPass):
    """Rewrites linear -> cross-entropy sites of a torch-IR graph to ``cce_inductor.linear_cross_entropy``."""

    def __init__(self, options: Options | None = None):
        self.options = options or Options()

    def __call__(self, graph: torch.fx.Graph) -> None:
        rewrite_graph(graph, self.options)

    def uuid(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.as_dict().items()))
        return f"cce_inductor-{source_hash()}-{opts}"

    def __eq__(self, other) -> bool:
        return isinstance(other, CCEGraphPass) and other.options == self.options

    def __hash__(self) -> int:
        return hash((CCEGraphPass, self.options))

    def __repr__(self) -> str:
        return f"CCEGraphPass({self.options})"


class SourceKey(CustomGraphPass):
    """A post-grad pass that changes nothing: its ``uuid()`` puts this package's sources in
    Inductor's cache keys for graphs that ``backend="cce"`` compiles. The compiled code bakes in
    what the op's fake implementations said (output strides, checked at run time), and the traced
    graph alone does not change when they do: without this key a compile cached by an earlier
    version would be reused after an upgrade."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return f"cce_inductor-{source_hash()}"

    def __eq__(self, other) -> bool:
        return isinstance(other, SourceKey)

    def __hash__(self) -> int:
        return hash(SourceKey)

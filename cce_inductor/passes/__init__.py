"""The torch.compile graph rewrite: linear -> cross-entropy in unmodified code becomes the CCE op.

Entry points:
    torch.compile(model, backend="cce")    backend.cce_backend (entry point, no import needed)
    cce_inductor.enable(**options)         enabling.enable: the rewrite as Inductor's pre-grad pass
    cce_inductor.disable()
    cce_inductor.explain(fn, *args, **kw)  explanation.explain: what is found, rewritten, skipped, why

Layout: nodes.py (node predicates, metadata), matcher.py (finds sites), rewrite.py (replaces them),
report.py (what happened at each site),
graph_pass.py (the CustomGraphPass), options.py, backend.py, enabling.py, explanation.py.
"""

from .backend import cce_backend
from .enabling import disable, enable
from .explanation import Explanation, explain
from .graph_pass import CCEGraphPass
from .options import Options
from .report import SiteReport
from .rewrite import rewrite_graph

__all__ = [
    "cce_backend",
    "enable",
    "disable",
    "explain",
    "Explanation",
    "CCEGraphPass",
    "Options",
    "SiteReport",
    "rewrite_graph",
]

"""The torch.compile graph rewrite: linear -> cross-entropy in unmodified code becomes the CCE op.

Entry points:
    torch.compile(model, backend="cce")    backend.cce_backend (entry point; no import needed)
    cce_inductor.enable(**options)         enabling.enable: the rewrite as Inductor's pre-grad pass,
    cce_inductor.disable()                 chained with passes already configured
    cce_inductor.explain(fn, *args, **kw)  explanation.explain: sites found, rewritten or skipped,
                                           why, shapes, N x V bytes avoided, N x V tensors kept

Hugging Face Trainer / accelerate accept only a fixed list of backend names, so
``torch_compile_backend="cce"`` is rejected there: call ``cce_inductor.enable()`` before training
and keep the default backend. ``torch.compile(mode="lite")`` turns custom passes (so enable()) off.

What is matched and what is left alone: the README's section of that name, and each site's reason
in explain(). Returned logits of a rewritten site are deferred (deferral.py, ``..deferred``): the
caller gets a tensor that forms them when read; under enable() through a wrapper of Inductor's
compile_fx (inductor_hook.py), which rewrites before the pre-grad passes run.

Options (``enable(**options)`` or ``torch.compile(..., backend="cce", options={...})``):
    defer_logits   returned logits formed only when read (default True)
    detach_logits  returned logits carry no gradient (no grad_fn; none flows through them)
    exact          the op's exact= (default True: no gradient filtering; False: the bounded filter)
    filter_dc      the op's filter_dc= (default False; with exact=False: dC filtered too, recompute skipped)
    impl           the op's impl= ("auto", "triton", "torch")
    max_workspace_bytes  the op's max_workspace_bytes= ("auto": a bounded workspace sized per call; 0: minimum memory)

Layout: nodes.py (node predicates, metadata), matcher.py (finds sites), rewrite.py (replaces them),
token_stats_match.py (heads read for per-token log-probs, entropy, arg-max, log-sum-exp: one
``linear_token_stats`` call each, their loss calls included), report.py (what happened at each
site), deferral.py (returned logits deferred), graph_pass.py
(the CustomGraphPass, SourceKey), options.py, backend.py, enabling.py, inductor_hook.py,
log_calls.py, explanation.py.
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

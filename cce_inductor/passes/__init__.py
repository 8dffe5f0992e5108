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

What is matched (on the Dynamo torch-IR graph, before AOTAutograd): ``F.cross_entropy`` /
``nn.CrossEntropyLoss``, ``F.nll_loss`` of ``log_softmax`` and ``F.linear_cross_entropy``, back
through token-dim reshapes, slices and transposes, lossless casts, scaling by a scalar, one softcap
and a bias add, to ``F.linear`` / ``nn.Linear`` / ``x @ W.T`` / ``torch.matmul`` / ``x @ W``
(tied embedding weights included). Left alone, with the reason in explain(): class ``weight=``,
probability targets, any other op between projection and loss, lossy casts, float64, an in-place
write between projection and loss, logits from another graph (a graph break).

Options (``enable(**options)`` or ``torch.compile(..., backend="cce", options={...})``):
    detach_logits  logits the compiled region *returns* come back as ``logits.detach()``: same
                   values, but no grad_fn, so no N x V gradient in the backward -- and gradients
                   no longer flow through them. For code that returns logits only to look at them.
    exact          the op's exact= (default True: no gradient filtering; False: the bounded filter)
    filter_dc      the op's filter_dc= (default False; with exact=False: dC filtered too, recompute skipped)
    impl           the op's impl= ("auto", "triton", "torch")
    max_workspace_bytes  the op's max_workspace_bytes= (None: off; memory for speed)

Layout: nodes.py (node predicates, metadata), matcher.py (finds sites), rewrite.py (replaces them),
report.py (what happened at each site), graph_pass.py (the CustomGraphPass), options.py,
backend.py, enabling.py, explanation.py.
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

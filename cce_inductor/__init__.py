"""cce_inductor: Cut Cross-Entropy for unmodified models, as a torch.compile graph rewrite.

Public API:
    linear_cross_entropy(e, c, targets, ...)  the loss of e @ c.T (+ bias) without the logits
    linear_token_stats(e, c, targets, ...)    per-token log-probs, entropy, argmax, lse, same way
    vocab_parallel_cross_entropy(e, c, ...)   linear_cross_entropy with the vocabulary split over ranks
    enable(**options) / disable()             turn the rewrite on for the default Inductor backend
    explain(fn, *args, **kwargs)              what the rewrite finds, rewrites or skips, and why
    torch.compile(model, backend="cce")       the rewrite as a named backend (no import needed)
"""

from .ops import linear_cross_entropy
from .passes import disable, enable, explain
from .token_stats import TokenStats, linear_token_stats
from .vocab_parallel import vocab_parallel_cross_entropy

__version__ = "0.1.0"
__all__ = ["linear_cross_entropy", "linear_token_stats", "TokenStats", "vocab_parallel_cross_entropy", "enable", "disable", "explain", "__version__"]

"""Triton kernels for cut cross-entropy (CUDA; the CPU under TRITON_INTERPRET=1).

Contract with ``ops.py`` (mirrors ``reference.chunked_forward`` / ``chunked_backward``):

    lce_forward(e, c, bias, targets, ignore_index, softcap, label_smoothing) -> (loss, lse)
    lce_backward(e, c, bias, targets, lse, grad_loss, grad_lse, ignore_index, softcap,
                 label_smoothing, filter_grad, needs_e, needs_c, needs_bias) -> (de, dc, dbias)

``forward.py`` says how the forward works; ``backward.py`` chooses the backward's strategy, each in
its own module with its algorithm, tiles and limits: ``backward_buffered.py`` (16-bit: a dz buffer
and GEMMs), with ``backward_filtered_de.py`` and ``backward_filtered_dc.py`` (the filter's GEMMs over
the kept tiles), and ``backward_atomic.py`` (float32 atomics); ``backward_shared.py`` holds what they
share (the gradient of a logit tile, the filter's rule and its bound). ``common.py`` holds the fixed
tile configs; ``workspace.py`` the ``max_workspace_bytes`` path. ``skipped_fraction`` measures the
filter.
"""

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    AVAILABLE = False

if AVAILABLE:
    from .backward import FILTER_EPS, lce_backward
    from .forward import lce_forward

    def skipped_fraction(e, c, targets, bias=None, *, ignore_index=-100, softcap=0.0,
                         label_smoothing=0.0, **backward_options) -> float:
        """Fraction s of (token tile, vocab tile) blocks whose gradient GEMMs the filter skips, for
        a mean-reduced loss on these inputs (runs forward and backward; syncs: benchmarks only)."""
        import torch

        from .forward import lce_forward as _fw

        targets = targets.long()
        loss, lse = _fw(e, c, bias, targets, ignore_index, softcap, label_smoothing)
        valid = (targets != ignore_index).sum().clamp_min(1)
        grad_loss = torch.ones_like(loss) / valid
        counts = torch.zeros(2, dtype=torch.int32, device=e.device)
        lce_backward(e, c, bias, targets, lse, grad_loss, torch.zeros_like(lse), ignore_index, softcap,
                     label_smoothing, True, True, True, bias is not None, tile_counts=counts,
                     **backward_options)
        computed, skipped = counts.tolist()
        return skipped / max(1, computed + skipped)

    __all__ = ["AVAILABLE", "FILTER_EPS", "lce_forward", "lce_backward", "skipped_fraction"]
else:  # pragma: no cover
    __all__ = ["AVAILABLE"]

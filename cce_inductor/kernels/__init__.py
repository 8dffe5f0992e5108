"""Triton kernels for cut cross-entropy (CUDA; the CPU under TRITON_INTERPRET=1).

Contract with ``ops.py`` (mirrors ``reference.chunked_forward`` / ``chunked_backward``):

    lce_forward(e, c, bias, targets, ignore_index, softcap, label_smoothing) -> (loss, lse)
    lce_backward(e, c, bias, targets, lse, grad_loss, grad_lse, ignore_index, softcap,
                 label_smoothing, filter_grad, needs_e, needs_c, needs_bias) -> (de, dc, dbias)
"""

try:
    import triton  # noqa: F401

    AVAILABLE = True
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    AVAILABLE = False


def lce_forward(*args, **kwargs):
    raise NotImplementedError("Triton kernels are not written yet")


def lce_backward(*args, **kwargs):
    raise NotImplementedError("Triton kernels are not written yet")

"""The pass forwards max_workspace_bytes to the op: the rewritten step runs the workspace op (here
under the Triton interpreter on the CPU) and equals eager."""

import pytest
import torch
import torch.nn.functional as F

import cce_inductor

from passes_helpers import assert_close, compiled_step, run_step


def _head_loss(h, w, y):
    logits = F.linear(h, w)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)


def test_max_workspace_bytes_reaches_the_op():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 24, generator=g, requires_grad=True)
    w = (torch.randn(61, 24, generator=g) / 5).requires_grad_()
    y = torch.randint(0, 61, (2, 9), generator=g)
    y[0, 3] = -100
    torch._dynamo.reset()
    out, grads, code = compiled_step(
        _head_loss, (h, w), (h, w, y),
        options={"impl": "triton", "max_workspace_bytes": 61 * 4 * 5},  # 5 tokens a chunk: 4 chunks
    )
    assert "lce_fused_reduced" in code
    ref_out, ref_grads = run_step(_head_loss, (h, w), (h, w, y))
    assert_close(out, ref_out, what="loss")
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, what="grad")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1GiB"])
def test_bad_max_workspace_bytes_is_rejected(bad):
    with pytest.raises(ValueError, match="max_workspace_bytes"):
        cce_inductor.enable(max_workspace_bytes=bad)

"""The pass forwards max_workspace_bytes to the op: the rewritten step runs the workspace op (here
under the Triton interpreter on the CPU) and equals eager."""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

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


@pytest.mark.parametrize("options, op", [({}, "lce_fused_reduced"), ({"max_workspace_bytes": 0}, "lce_forward"),
                                         ({"exact": False}, "lce_forward")], ids=["default", "zero", "filtered"])
def test_default_is_the_auto_workspace_and_zero_the_minimum_memory(options, op):
    """backend="cce" with no options runs the workspace op (its budget chosen per call); 0 asks for
    the exact recompute, and so does the filter (exact=False), which "auto" leaves alone."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 7, 24, generator=g, requires_grad=True)
    w = (torch.randn(53, 24, generator=g) / 5).requires_grad_()
    y = torch.randint(0, 53, (2, 7), generator=g)
    torch._dynamo.reset()
    out, grads, code = compiled_step(_head_loss, (h, w), (h, w, y), options={"impl": "triton", **options})
    assert f"cce_inductor.{op}" in code
    assert ("lce_fused_reduced" in code) == (op == "lce_fused_reduced")
    ref_out, ref_grads = run_step(_head_loss, (h, w), (h, w, y))
    assert_close(out, ref_out, what="loss")
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, what="grad")


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GiB", "Auto"])
def test_bad_max_workspace_bytes_is_rejected(bad):
    with pytest.raises(ValueError, match="max_workspace_bytes"):
        cce_inductor.enable(max_workspace_bytes=bad)


@pytest.mark.parametrize("options, mode", [({"impl": "triton"}, "workspace (auto): 1 chunk(s) of 14 tokens"),
                                           ({"impl": "triton", "max_workspace_bytes": 0}, "exact recompute"),
                                           ({"impl": "triton", "exact": False}, "filtered recompute (dE)"),
                                           ({}, "torch path")])
def test_explain_says_how_the_loss_is_computed(options, mode):
    h = torch.randn(2, 7, 24, requires_grad=True)
    w = torch.randn(53, 24, requires_grad=True)
    y = torch.randint(0, 53, (2, 7))
    torch._dynamo.reset()
    with cce_inductor.enable(**options):
        report = cce_inductor.explain(_head_loss, h, w, y)
    (site,) = report.rewritten
    assert site.details["mode"].startswith(mode), site.details["mode"]


def test_default_workspace_with_returned_logits_deferred():
    """A Hugging Face model compiled as a module on the Triton path (the interpreter here): the loss
    runs the workspace op, the returned logits are deferred, and loss, gradients and logits (when
    read) equal eager's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 97, (2, 11))
    ref = model(input_ids=ids, labels=ids)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="cce", options={"impl": "triton"})
    out, code = run_and_get_code(lambda: compiled(input_ids=ids, labels=ids))
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    assert any("lce_fused_reduced" in c for c in code)
    assert type(out.logits).__name__ == "DeferredLogits"
    assert_close(out.loss, ref.loss, what="loss")
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, what="grad")
    assert_close(out.logits, ref.logits, what="logits")

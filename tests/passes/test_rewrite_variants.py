"""The rewrite on the model code it must recognize, by its effects.

Each case compiles a small loss function with ``backend="cce"`` and ``fullgraph=True`` and checks:
the op appears in the generated code (forward and backward), no buffer of N x V elements is
allocated where the logits do not escape, and the loss and every gradient equal eager's within
1e-5 relative (float32). Sizes: B=2, T=7, D=8, V=97 (prime, and D < the number of tokens, so that
no weight-sized buffer is mistaken for an N x V one).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch._inductor.utils import run_and_get_code

import cce_inductor
from passes_helpers import (  # fresh_dynamo: an autouse fixture
    fresh_dynamo,
    assert_grads_close,
    assert_outputs_close,
    compiled_step,
    nxv_buffers,
    run_step,
    uses_op,
)

B, T, D, V = 2, 7, 8, 97


def _inputs(seed=0, t=T):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, t, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B, t), generator=g)
    y[0, :2] = -100  # ignored targets
    return h, y


def _linear(bias=True, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(D, V, bias=bias)


# ----------------------------------------------------------------------------- the cases
# Each builder returns (fn, params, args, tokens): tokens = rows of the logits that reach the loss.


def case_linear_bias_view():
    lin = _linear()
    h, y = _inputs()

    def fn(h, y):
        return F.cross_entropy(lin(h).view(-1, V), y.view(-1))

    return fn, [h, *lin.parameters()], (h, y), B * T


def case_x_at_wt_sum_then_divide():
    w = nn.Parameter(torch.randn(V, D) / 3)
    h, y = _inputs()

    def fn(h, y):
        z = h @ w.T
        return F.cross_entropy(z.reshape(-1, z.size(-1)), y.reshape(-1), reduction="sum") / 9.0

    return fn, [h, w], (h, y), B * T


def case_matmul_t_plus_bias():
    w = nn.Parameter(torch.randn(V, D) / 3)
    b = nn.Parameter(torch.randn(V) / 3)
    h, y = _inputs()

    def fn(h, y):
        z = torch.matmul(h, w.t()) + b
        return F.cross_entropy(z.flatten(0, 1), y.flatten())

    return fn, [h, w, b], (h, y), B * T


def case_bias_1v_after_head():
    """BART's final_logits_bias: a (1, V) buffer added after a head without a bias."""
    lin = _linear(bias=False)
    final_logits_bias = torch.randn(1, V)
    h, y = _inputs()

    def fn(h, y):
        z = lin(h) + final_logits_bias
        return F.cross_entropy(z.view(-1, V), y.view(-1))

    return fn, [h, *lin.parameters()], (h, y), B * T


def case_bias_11v_first_operand():
    lin = _linear(bias=False)
    b = nn.Parameter(torch.randn(1, 1, V) / 3)
    h, y = _inputs()

    def fn(h, y):
        return F.cross_entropy((b + lin(h)).flatten(0, 1), y.flatten())

    return fn, [h, b, *lin.parameters()], (h, y), B * T


def case_x_at_w_dv():
    w = nn.Parameter(torch.randn(D, V) / 3)  # stored as (D, V)
    h, y = _inputs()

    def fn(h, y):
        return F.cross_entropy((h @ w).flatten(0, -2), y.flatten())

    return fn, [h, w], (h, y), B * T


def case_tied_embedding():
    torch.manual_seed(2)
    emb = nn.Embedding(V, D)
    norm = nn.LayerNorm(D)
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()

    def fn(ids, labels):
        h = norm(emb(ids))
        logits = F.linear(h, emb.weight)
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))

    return fn, [emb.weight, *norm.parameters()], (ids, labels), B * (T - 1)


def case_hf_causal_lm_loss():
    """The shape of transformers' ForCausalLMLoss with logits_to_keep, softcap, num_items_in_batch."""
    lin = _linear(bias=False)
    h, y = _inputs()
    cap = 3.0

    def fn(h, labels):
        logits = lin(h[:, slice(0, None), :])
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
        logits = logits.float()
        labels = F.pad(labels, (0, 1), value=-100)
        shift_labels = labels[..., 1:].contiguous()
        logits = logits.view(-1, logits.size(-1))
        shift_labels = shift_labels.view(-1).to(logits.device)
        loss = F.cross_entropy(logits, shift_labels, ignore_index=-100, reduction="sum")
        return loss / 11

    return fn, [h, *lin.parameters()], (h, y), B * T


def case_keep_last_tokens():
    """h[:, -k:, :] before the head (transformers' logits_to_keep)."""
    lin = _linear()
    h, y = _inputs()

    def fn(h, y):
        logits = lin(h[:, -3:, :])
        return F.cross_entropy(logits.reshape(-1, V), y[:, -3:].reshape(-1))

    return fn, [h, *lin.parameters()], (h, y), B * 3


def case_shift_logits():
    """Older causal-LM code: shift the logits, not the labels (becomes the op's shift=1)."""
    lin = _linear()
    h, y = _inputs()

    def fn(h, labels):
        logits = lin(h)
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        return nn.CrossEntropyLoss()(shift_logits.view(-1, V), shift_labels.view(-1))

    return fn, [h, *lin.parameters()], (h, y), B * (T - 1)


def case_transpose_class_dim_none_mask():
    lin = _linear()
    h, y = _inputs()

    def fn(h, y):
        per_token = F.cross_entropy(lin(h).transpose(1, 2), y, reduction="none")  # (B, T)
        mask = (y % 3 != 0).float()
        return (per_token * mask).sum() / mask.sum()

    return fn, [h, *lin.parameters()], (h, y), B * T


def case_log_softmax_nll():
    lin = _linear()
    h, y = _inputs()

    def fn(h, y):
        logp = F.log_softmax(lin(h), dim=-1)
        return F.nll_loss(logp.flatten(0, 1), y.flatten())

    return fn, [h, *lin.parameters()], (h, y), B * T


def case_temperature_constant():
    lin = _linear()
    h, y = _inputs()

    def fn(h, y):
        return F.cross_entropy((lin(h) / 0.7).view(-1, V), y.view(-1))

    return fn, [h, *lin.parameters()], (h, y), B * T


def case_temperature_parameter():
    lin = _linear()
    temp = nn.Parameter(torch.tensor(1.3))
    h, y = _inputs()

    def fn(h, y):
        return F.cross_entropy((lin(h) * temp).view(-1, V), y.view(-1))

    return fn, [h, temp, *lin.parameters()], (h, y), B * T


def case_scale_around_softcap():
    lin = _linear()
    h, y = _inputs()

    def fn(h, y):
        z = 0.5 * lin(h)
        z = -2.0 * (4.0 * torch.tanh(z / 4.0))
        return F.cross_entropy(z.reshape(B * T, V), y.reshape(B * T))

    return fn, [h, *lin.parameters()], (h, y), B * T


def case_upcast_to_float64():
    """cross_entropy in float64 of float32 logits: the op's float32 loss is cast back."""
    lin = _linear()
    h, y = _inputs()

    def fn(h, y):
        return F.cross_entropy(lin(h).double().view(-1, V), y.view(-1))

    return fn, [h, *lin.parameters()], (h, y), B * T


def case_label_smoothing_ignore_index():
    lin = _linear()
    h, y = _inputs()
    y = torch.where(y == -100, torch.full_like(y, -1), y)

    def fn(h, y):
        return F.cross_entropy(lin(h).view(-1, V), y.view(-1), ignore_index=-1, label_smoothing=0.1)

    return fn, [h, *lin.parameters()], (h, y), B * T


def case_last_token_classifier():
    lin = _linear()
    h, y = _inputs()
    y = y % V

    def fn(h, y):
        return F.cross_entropy(lin(h[:, -1, :]), y[:, 0])

    return fn, [h, *lin.parameters()], (h, y), B  # N x V is only B x V here


def case_index_tensor_rows():
    lin = _linear()
    h, y = _inputs()
    idx = torch.tensor([0, 2, 3, 6])

    def fn(h, y, idx):
        return F.cross_entropy(lin(h)[:, idx].reshape(-1, V), y[:, idx].reshape(-1))

    return fn, [h, *lin.parameters()], (h, y, idx), B * 4


def case_two_heads():
    lin1, lin2 = _linear(seed=3), _linear(bias=False, seed=4)
    h, y = _inputs()

    def fn(h, y):
        a = F.cross_entropy(lin1(h).view(-1, V), y.view(-1))
        b = F.cross_entropy(lin2(h).view(-1, V), y.view(-1), reduction="sum")
        return a + 0.01 * b

    return fn, [h, *lin1.parameters(), *lin2.parameters()], (h, y), B * T


def case_fused_linear_cross_entropy():
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("F.linear_cross_entropy needs torch >= 2.13")
    lin = _linear()
    h, y = _inputs()

    def fn(h, y):
        return F.linear_cross_entropy(h.flatten(0, 1), lin.weight, y.flatten(), linear_bias=lin.bias)

    return fn, [h, *lin.parameters()], (h, y), B * T


CASES = {name[len("case_") :]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_variant_is_rewritten_and_exact(name):
    fn, params, args, tokens = CASES[name]()
    expected, expected_grads = run_step(fn, params, args)
    out, grads, code = compiled_step(fn, params, args)
    assert uses_op(code), "the CCE op is not in the generated code"
    assert nxv_buffers(code, tokens, V) == [], "an N x V buffer remains"
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, [f"param {i}" for i in range(len(params))])


def test_shift_becomes_the_ops_shift():
    fn, params, args, _ = case_shift_logits()
    report = cce_inductor.explain(fn, *args)
    (site,) = report.sites
    assert site.status == "rewritten" and site.details.get("shift") == 1


def test_enable_path_rewrites_too():
    fn, params, args, tokens = case_hf_causal_lm_loss()
    expected, expected_grads = run_step(fn, params, args)
    out, grads, code = compiled_step(fn, params, args, enable={})
    assert uses_op(code)
    assert nxv_buffers(code, tokens, V) == []
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, ["h", "weight"])


class _GemmaLikeHead(nn.Module):
    """transformers' ForCausalLMLoss after a head whose softcap is a float attribute (Gemma 2's
    config): under dynamic=True Dynamo passes the float in as a tensor and reads it with .item()
    -- a symbolic float -- and the view reads the vocabulary size from the logits."""

    def __init__(self):
        super().__init__()
        self.lm_head = _linear(bias=False)
        self.cap = 30.0

    def forward(self, h, labels):
        logits = self.lm_head(h[:, slice(0, None), :])
        logits = torch.tanh(logits / self.cap) * self.cap
        labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        logits = logits.float().view(-1, logits.size(-1))
        return F.cross_entropy(logits, labels.view(-1).to(logits.device), ignore_index=-100, reduction="sum") / 11


@pytest.mark.parametrize("name", ["gemma_like_head", "shift_logits", "transpose_class_dim_none_mask"])
def test_dynamic_shapes(name):
    """dynamic=True, three sequence lengths: one compiled graph, results equal eager's."""
    if name == "gemma_like_head":
        fn = _GemmaLikeHead()
        lin_params = list(fn.parameters())
    else:
        fn, params, _, _ = CASES[name]()
        lin_params = params[1:]
    compiled = torch.compile(fn, backend="cce", fullgraph=True, dynamic=True)
    for t in (5, 9, 12):
        h, y = _inputs(seed=t, t=t)
        expected, expected_grads = run_step(fn, [h, *lin_params], (h, y))
        (out, grads), code = run_and_get_code(lambda: run_step(compiled, [h, *lin_params], (h, y)))
        if t == 5:
            assert uses_op("\n".join(code)), "the CCE op is not in the generated code"
        assert_outputs_close(out, expected)
        assert_grads_close(grads, expected_grads, ["h"] + [f"param {i}" for i in range(len(lin_params))])


# ----------------------------------------------------------------------------- options


def test_options_reach_the_op():
    """exact= and impl= arrive as the op's arguments (impl="torch" runs on the CPU)."""
    from cce_inductor.passes import rewrite_graph

    fn, params, args, _ = case_linear_bias_view()
    seen = {}

    def backend(gm, example_inputs):
        rewrite_graph(gm.graph, cce_inductor.passes.Options(exact=True, impl="torch"))
        gm.recompile()
        for node in gm.graph.nodes:
            if node.target is cce_inductor.linear_cross_entropy:
                seen.update(node.kwargs)
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert seen["exact"] is True and seen["impl"] == "torch"


def test_backend_options_split_between_cce_and_inductor():
    fn, params, args, _ = case_linear_bias_view()
    expected, _ = run_step(fn, params, args)
    out, _, code = compiled_step(fn, params, args, options={"impl": "torch", "exact": True, "max_autotune": False})
    assert uses_op(code)
    assert_outputs_close(out, expected)
    with pytest.raises(Exception, match="unknown cce option|detach_logit"):
        cce_inductor.enable(detach_logit=True)

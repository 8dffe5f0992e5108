"""RL-style per-token statistics in unmodified code become one ``linear_token_stats`` call (issue 30).

Each case compiles a small function with ``backend="cce"`` and ``fullgraph=True`` and checks: the
token-statistics op appears in the generated code (forward and backward where a gradient is taken),
no buffer of N x V elements is allocated, explain() reports the head rewritten, and every output and
gradient (w.r.t. the hidden states, the weight, the bias, a learnable temperature) equals eager's
within 1e-5 relative (float32). Negative cases: the site is left alone, explain() names the operation
that stopped it, and the compiled function still equals eager.

Inductor compiles with its ATen fallbacks (``fallback_by_default``) where this torch has it: the
rewrite and the op's registration run as in any compile, without a C++ compilation per case (the
N x V check then also reads the sizes Inductor asserts for fallback outputs).
Sizes: B=2, T=7, D=8, V=97 (prime, and D < the tokens, so no weight-sized buffer looks N x V).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cce_inductor
from passes_helpers import (  # noqa: F401  (fresh_dynamo: an autouse fixture)
    fresh_dynamo,
    assert_grads_close,
    assert_outputs_close,
    compiled_step,
    nxv_buffers,
    run_step,
)

B, T, D, V = 2, 7, 8, 97
STATS_OPS = ("cce_inductor.token_stats_forward", "cce_inductor.token_stats_backward")
LCE_OPS = ("cce_inductor.lce_forward", "cce_inductor.lce_backward")


@pytest.fixture(autouse=True)
def _aten_fallbacks():
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "fallback_by_default"):
        with inductor_config.patch(fallback_by_default=True):
            yield
    else:
        yield


class Head(nn.Module):
    """A tiny policy head: hidden states in, logits out, with a learnable temperature."""

    def __init__(self, bias=True, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(D, V, bias=bias)
        with torch.no_grad():  # peaked rows next to flat ones
            self.proj.weight.mul_(torch.linspace(0.2, 3.0, V)[:, None])
        self.log_temp = nn.Parameter(torch.tensor(0.3))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    return h, ids


def _names(params):
    return [f"param {i}" for i in range(len(params))]


# ----------------------------------------------------------------------------- the forms
# Each builder returns (fn, params, args, tokens): tokens = rows of the logits read.


def case_gather_log_softmax_learnable_temperature():
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        z = m.proj(h) / m.log_temp.exp()
        return torch.gather(z.log_softmax(-1), -1, ids.unsqueeze(-1)).squeeze(-1)

    return fn, [h, *m.parameters()], (h, ids), B * T


def case_functional_log_softmax_dim2_gather_method_float():
    m, (h, ids) = Head(bias=False), _inputs()
    w = m.proj.weight

    def fn(h, ids):
        z = (h @ w.t()).float()
        return F.log_softmax(z, dim=2).gather(2, ids[..., None]).squeeze(2)

    return fn, [h, w], (h, ids), B * T


def case_take_along_dim_number_temperature():
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        logp = F.log_softmax(m.proj(h) / 0.7, dim=-1)
        return torch.take_along_dim(logp, ids[..., None], dim=-1).squeeze(-1)

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


def case_target_logit_minus_logsumexp():
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        z = m.proj(h)
        return z.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(z, -1)

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


def case_target_logit_minus_logsumexp_method_unsqueezed():
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        z = m.proj(h) * 1.3
        return z.gather(-1, ids.unsqueeze(-1)) - z.logsumexp(dim=-1, keepdim=True)  # (B, T, 1)

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


def case_categorical_log_prob_and_entropy():
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        dist = torch.distributions.Categorical(logits=m.proj(h) / m.log_temp.exp())
        return dist.log_prob(ids).sum() - 0.1 * dist.entropy().mean(), dist.log_prob(ids)

    return fn, [h, *m.parameters()], (h, ids), B * T


def case_entropy_logsumexp_minus_softmax_times_logits():
    m, (h, _) = Head(), _inputs()

    def fn(h):
        z = m.proj(h)
        return torch.logsumexp(z, -1) - (F.softmax(z, -1) * z).sum(-1)

    return fn, [h, *m.proj.parameters()], (h,), B * T


def case_entropy_p_log_p_exp():
    m, (h, _) = Head(), _inputs()

    def fn(h):
        logp = torch.log_softmax(m.proj(h) / m.log_temp.exp(), dim=-1)
        return -(logp.exp() * logp).sum(dim=-1)

    return fn, [h, *m.parameters()], (h,), B * T


def case_entropy_softmax_times_log_softmax_flattened():
    m, (h, _) = Head(), _inputs()

    def fn(h):
        z = m.proj(h).view(-1, V)
        return -(F.softmax(z, dim=1) * F.log_softmax(z, dim=1)).sum(1)

    return fn, [h, *m.proj.parameters()], (h,), B * T


def case_accuracy_masked():
    m, (h, ids) = Head(), _inputs()
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) > 0.3

    def fn(h, ids):
        correct = (m.proj(h).argmax(-1) == ids).float()
        return (correct * mask).sum() / mask.sum()

    return fn, [h], (h, ids), B * T


def case_accuracy_from_max_indices():
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        z = m.proj(h)
        top1 = (z.max(-1)[1] == ids).float().mean()
        return top1 + (torch.max(z, dim=-1, keepdim=True).indices == ids[..., None]).sum()

    return fn, [h], (h, ids), B * T


def case_dpo_halves_of_one_batch():
    """DPO: the chosen and rejected sequences as two halves of one batch, each with its own log-probs."""
    m, (h, ids) = Head(), _inputs()
    ref_chosen, ref_rejected = torch.tensor([-30.0]), torch.tensor([-31.0])

    def fn(h, ids):
        logp = m.proj(h).log_softmax(-1)
        chosen = logp[:1].gather(-1, ids[:1, :, None]).squeeze(-1).sum(-1)
        rejected = logp[1:].gather(-1, ids[1:, :, None]).squeeze(-1).sum(-1)
        return -F.logsigmoid(0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


def case_ce_plus_z_loss():
    m, (h, ids) = Head(), _inputs()
    ids[0, :3] = -100

    def fn(h, ids):
        z = m.proj(h).float()
        ce = F.cross_entropy(z.view(-1, V), ids.view(-1))
        return ce + 1e-2 * torch.logsumexp(z, dim=-1).pow(2).mean()

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


def case_ce_sum_plus_accuracy():
    m, (h, ids) = Head(), _inputs()
    ids[1, 4:] = -100

    def fn(h, ids):
        z = m.proj(h)
        loss = F.cross_entropy(z.flatten(0, 1), ids.flatten(), reduction="sum")
        valid = ids != -100
        accuracy = ((z.argmax(dim=-1) == ids) & valid).sum() / valid.sum()
        return loss, accuracy

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


def case_grpo_clipped_ratio_entropy_bonus():
    m, (h, ids) = Head(), _inputs()
    g = torch.Generator().manual_seed(4)
    old_logp = -torch.rand(B, T, generator=g) * 5
    adv = torch.randn(B, 1, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()

    def fn(h, ids):
        z = m.proj(h) / m.log_temp.exp()
        logp = torch.gather(z.log_softmax(-1), -1, ids[..., None]).squeeze(-1)
        ratio = torch.exp(logp - old_logp)
        pg = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
        entropy = torch.distributions.Categorical(logits=z).entropy()
        return ((pg - 0.01 * entropy) * mask).sum() / mask.sum()

    return fn, [h, *m.parameters()], (h, ids), B * T


def case_shifted_logits_softcap():
    """Next-token log-probs of a sequence (logits[:, :-1] with ids[:, 1:]) under a softcap."""
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        z = 5.0 * torch.tanh(m.proj(h) / 5.0)
        logits = z[:, :-1, :]
        logp = F.log_softmax(logits, dim=-1)
        return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1), logits.argmax(-1)

    return fn, [h, *m.proj.parameters()], (h, ids), B * (T - 1)


def case_negated_cross_entropy_flat_targets_plus_entropy():
    """PPO's log-probs as -cross_entropy(reduction="none") of flat targets, with an entropy bonus."""
    m, (h, ids) = Head(), _inputs()
    flat = ids.reshape(-1)

    def fn(h, flat):
        z = m.proj(h)
        logp = -F.cross_entropy(z.view(-1, V), flat, reduction="none")
        entropy = -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)
        return logp.sum() + 0.1 * entropy.mean(), logp

    return fn, [h, *m.proj.parameters()], (h, flat), B * T


def case_nll_of_log_softmax_plus_accuracy():
    m, (h, ids) = Head(), _inputs()
    ids[0, 1] = -1

    def fn(h, ids):
        z = m.proj(h)
        loss = F.nll_loss(F.log_softmax(z, -1).view(-1, V), ids.view(-1), ignore_index=-1)
        return loss, (z.argmax(-1) == ids).float().mean()

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


def case_per_token_temperature_learned():
    """A temperature per token, computed from the hidden states (gradients reach h through it too)."""
    m, (h, ids) = Head(bias=False), _inputs()
    torch.manual_seed(5)
    temp_head = nn.Linear(D, 1)

    def fn(h, ids):
        temperature = F.softplus(temp_head(h)) + 0.5  # (B, T, 1)
        dist = torch.distributions.Categorical(logits=m.proj(h) / temperature)
        return dist.log_prob(ids), dist.entropy()

    return fn, [h, m.proj.weight, *temp_head.parameters()], (h, ids), B * T


def case_selective_log_softmax_rows():
    """TRL's selective_log_softmax (float32): the target logit minus a logsumexp taken row by row."""
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        logits = m.proj(h)
        selected = torch.gather(logits, dim=-1, index=ids.unsqueeze(-1)).squeeze(-1)
        return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


def case_entropy_in_chunks():
    """TRL's entropy_from_logits: the flattened logits split in chunks, an entropy per chunk."""
    m, (h, _) = Head(), _inputs()

    def fn(h):
        logits = m.proj(h) / m.log_temp.exp()
        out = []
        for chunk in logits.reshape(-1, logits.shape[-1]).split(4, dim=0):
            logps = F.log_softmax(chunk, dim=-1)
            out.append(-(torch.exp(logps) * logps).sum(-1))
        return torch.cat(out).reshape(logits.shape[:-1])

    return fn, [h, *m.parameters()], (h,), B * T


def case_selective_log_softmax_row_loop():
    """TRL's selective_log_softmax for 16-bit logits (here float32): log_softmax and gather row by row."""
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        logits = m.proj(h)
        rows = []
        for row_logits, row_labels in zip(logits, ids):
            row_logps = F.log_softmax(row_logits, dim=-1)
            rows.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
        return torch.stack(rows)

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


def case_inside_a_checkpoint():
    """Head and statistics inside one torch.utils.checkpoint function (the rewrite enters its body)."""
    m, (h, ids) = Head(), _inputs()

    def inner(h, ids):
        z = m.proj(h) / 0.7
        logp = torch.gather(z.log_softmax(-1), -1, ids[..., None]).squeeze(-1)
        return logp, torch.distributions.Categorical(logits=z).entropy()

    def fn(h, ids):
        logp, entropy = torch.utils.checkpoint.checkpoint(inner, h, ids, use_reentrant=False)
        return (logp + 0.1 * entropy).sum()

    return fn, [h, *m.proj.parameters()], (h, ids), B * T


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_form_rewritten_and_equal_to_eager(name):
    fn, params, args, tokens = CASES[name]()
    expected, expected_grads = run_step(fn, params, args)
    out, grads, code = compiled_step(fn, params, args)
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, _names(params))
    needs_grad = any(g is not None for g in expected_grads)
    assert STATS_OPS[0] in code and (STATS_OPS[1] in code) == needs_grad
    assert not any(op in code for op in LCE_OPS), "one op per head: the loss calls go into the same call"
    assert nxv_buffers(code, tokens, V, fallbacks=True) == []
    [site] = cce_inductor.explain(fn, *args).sites
    assert (site.kind, site.status, site.remaining) == ("token_stats", "rewritten", []), site.reason


@pytest.mark.parametrize("name", ["grpo_clipped_ratio_entropy_bonus",
                                  "negated_cross_entropy_flat_targets_plus_entropy"])
def test_dynamic_shapes(name):
    """Symbolic token dims: no size is baked into the rewritten graph (the flat targets are
    reshaped to the logits' token dims read from the embeddings)."""
    fn, params, args, tokens = CASES[name]()
    expected, expected_grads = run_step(fn, params, args)
    out, grads, code = compiled_step(fn, params, args, dynamic=True)
    assert STATS_OPS[0] in code
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, _names(params))


def test_under_enable():
    fn, params, args, tokens = case_categorical_log_prob_and_entropy()
    expected, expected_grads = run_step(fn, params, args)
    out, grads, code = compiled_step(fn, params, args, enable={})
    assert all(op in code for op in STATS_OPS)
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, _names(params))


def test_the_nxv_check_sees_the_logits_of_a_plain_compile():
    fn, params, args, tokens = case_grpo_clipped_ratio_entropy_bonus()
    _, _, code = compiled_step(fn, params, args, backend="inductor")
    assert nxv_buffers(code, tokens, V, fallbacks=True)


def test_negated_cross_entropy_stays_with_the_loss_rewrite():
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        return -F.cross_entropy(m.proj(h).view(-1, V), ids.view(-1), reduction="none")

    params = [h, *m.proj.parameters()]
    expected, expected_grads = run_step(fn, params, (h, ids))
    out, grads, code = compiled_step(fn, params, (h, ids))
    assert all(op in code for op in LCE_OPS) and STATS_OPS[0] not in code
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, _names(params))


# ----------------------------------------------------------------------------- left alone


def _returned_logits(m):
    def fn(h, ids):
        z = m.proj(h)
        return z.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1), z

    return fn


def _unknown_consumer(m):
    def fn(h, ids):
        z = m.proj(h)
        logp = z.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
        return logp.sum() + z.topk(3, dim=-1).values.sum()

    return fn


def _two_target_sets(m):
    def fn(h, ids):
        logp = m.proj(h).log_softmax(-1)
        return logp.gather(-1, ids[..., None]).sum() - logp.gather(-1, ids.flip(0)[..., None]).sum()

    return fn


def _rows_of_other_targets(m):
    def fn(h, ids):
        logits = m.proj(h)
        swapped = [ids[1], ids[0]]  # row 0 of the logits with row 1 of the ids
        return torch.stack([row.log_softmax(-1).gather(-1, labels[..., None]) for row, labels in zip(logits, swapped)])

    return fn


def _two_scalings(m):
    def fn(h, ids):
        z = m.proj(h)
        logp = (z / 0.5).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
        return logp.sum(), z.argmax(-1)

    return fn


def _softmax_returned(m):
    def fn(h, ids):
        z = m.proj(h)
        return torch.logsumexp(z, -1).sum(), F.softmax(z, -1)

    return fn


def _ignore_index_is_a_class(m):
    def fn(h, ids):
        z = m.proj(h)
        ce = F.cross_entropy(z.view(-1, V), ids.view(-1), ignore_index=0)
        return ce + z.log_softmax(-1).gather(-1, ids[..., None]).sum()

    return fn


def _per_token_temperature_with_bias(m):
    def fn(h, ids):
        z = m.proj(h) / (h.norm(dim=-1, keepdim=True) + 1.0)
        return z.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)

    return fn


@pytest.mark.parametrize(
    "build, why",
    [
        (_unknown_consumer, "topk"),
        (_two_target_sets, "different targets"),
        (_two_scalings, "scaled or biased differently"),
        (_softmax_returned, "returned from the compiled region"),
        (_ignore_index_is_a_class, "ignore_index=0 is a class the gathers read"),
        (_per_token_temperature_with_bias, "bias / T would be N x V"),
        (_rows_of_other_targets, "not the same part of targets"),
    ],
    ids=["unknown_consumer", "two_target_sets", "two_scalings", "softmax_returned",
         "ignore_index_is_a_class", "per_token_temperature_with_bias", "rows_of_other_targets"],
)
def test_left_alone_with_the_reason(build, why):
    m, (h, ids) = Head(), _inputs()
    fn = build(m)
    [site] = [s for s in cce_inductor.explain(fn, h, ids).sites if s.kind == "token_stats"]
    assert site.status == "skipped" and why in site.reason, site.reason


def test_returned_logits_deferred():
    """Logits returned next to their statistics: the caller gets them deferred (formed when read,
    with eager's values and gradients); with defer_logits=False the site is left alone."""
    from cce_inductor.deferred import DeferredLogits

    m, (h, ids) = Head(), _inputs()
    fn = _returned_logits(m)
    params = [h, *m.proj.parameters()]
    expected, expected_grads = run_step(fn, params, (h, ids))
    out, grads, code = compiled_step(fn, params, (h, ids))
    assert isinstance(out[1], DeferredLogits) and STATS_OPS[0] in code
    assert nxv_buffers(code, B * T, V, fallbacks=True) == []
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, _names(params))
    # read and differentiated through: eager's gradients
    loss, logits = torch.compile(fn, backend="cce", fullgraph=True)(h, ids)
    (loss.sum() + logits.square().sum()).backward()
    got = [p.grad for p in params]
    for p in params:
        p.grad = None
    loss, logits = fn(h, ids)
    (loss.sum() + logits.square().sum()).backward()
    assert_grads_close(got, [p.grad for p in params], _names(params))
    [site] = cce_inductor.explain(fn, h, ids).sites
    assert site.status == "rewritten" and site.deferred == ["z"] and not site.remaining
    with cce_inductor.enable(defer_logits=False):
        [site] = cce_inductor.explain(fn, h, ids).sites
    assert site.status == "skipped" and "returned from the compiled region" in site.reason


def test_left_alone_site_still_equals_eager():
    m, (h, ids) = Head(), _inputs()
    fn = _unknown_consumer(m)
    params = [h, *m.proj.parameters()]
    expected, expected_grads = run_step(fn, params, (h, ids))
    out, grads, code = compiled_step(fn, params, (h, ids))
    assert STATS_OPS[0] not in code
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, _names(params))


def test_loss_calls_alone_are_not_a_statistics_site():
    """A head read only by a loss call is the cross-entropy rewrite's, reported once, as before."""
    m, (h, ids) = Head(), _inputs()

    def fn(h, ids):
        return F.cross_entropy(m.proj(h).view(-1, V), ids.view(-1))

    [site] = cce_inductor.explain(fn, h, ids).sites
    assert (site.kind, site.status) == ("cross_entropy", "rewritten")


def test_hugging_face_policy():
    """A Hugging Face causal LM as the policy (hidden size D < the tokens), inside the compiled loss:
    its logits (sliced for the next-token shift, scaled by a temperature) feed the log-probs and
    Categorical's entropy."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))

    def fn(ids):
        logits = model(input_ids=ids).logits[:, :-1, :] / 0.7
        logp = torch.gather(logits.log_softmax(-1), -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (logp - 0.01 * torch.distributions.Categorical(logits=logits).entropy()).mean()

    params = list(model.parameters())
    expected, expected_grads = run_step(fn, params, (ids,))
    out, grads, code = compiled_step(fn, params, (ids,))
    assert all(op in code for op in STATS_OPS)
    assert nxv_buffers(code, B * (T - 1), V, fallbacks=True) == []
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, [n for n, _ in model.named_parameters()])


# ----------------------------------------------------------------------------- on a GPU


def _grpo_head_loss(h, w, ids, old_logp, adv, mask):
    logits = (h @ w.T) / 0.9
    logp = torch.gather(logits.log_softmax(-1), -1, ids[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old_logp)
    pg = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    return ((pg - 0.01 * entropy) * mask).sum() / mask.sum()


@pytest.mark.gpu
def test_gpu_grpo_bf16_values_and_peak_memory():
    """bfloat16 on a GPU, N = 4096, V = 32768: the rewritten loss and gradients are at least as close
    to the float32 program's (same bfloat16 inputs) as eager bfloat16 is (within 2x), and the step's
    peak memory is below plain torch.compile's by at least half the bfloat16 logits."""
    n, d, v = 4096, 256, 32768
    g = torch.Generator(device="cuda").manual_seed(0)
    h0 = torch.randn(2, n // 2, d, device="cuda", generator=g).bfloat16()
    w0 = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).bfloat16()
    ids = torch.randint(0, v, (2, n // 2), device="cuda", generator=g)
    # the sampling policy's log-probs near the current ones (ratios in [0.9, 1.1], as in PPO's first
    # epoch): no token sits at the clip's edge, where a rounding in either program flips its gradient
    with torch.no_grad():
        logp = ((h0.float() @ w0.float().T) / 0.9).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    old = logp + (torch.rand(2, n // 2, device="cuda", generator=g) - 0.5) * 0.2
    del logp
    adv = torch.randn(2, 1, device="cuda", generator=g)
    mask = (torch.rand(2, n // 2, device="cuda", generator=g) > 0.2).float()

    def step(fn, dtype):
        h, w = h0.to(dtype, copy=True).requires_grad_(), w0.to(dtype, copy=True).requires_grad_()
        loss = fn(h, w, ids, old, adv, mask)
        loss.backward()
        return loss.detach().float(), h.grad.float(), w.grad.float()

    def peak(fn):
        step(fn, torch.bfloat16)  # compiles
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = step(fn, torch.bfloat16)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, out

    gold = step(_grpo_head_loss, torch.float32)
    eager = step(_grpo_head_loss, torch.bfloat16)
    torch._dynamo.reset()
    plain_peak, _ = peak(torch.compile(_grpo_head_loss, fullgraph=True))
    torch._dynamo.reset()
    cce = torch.compile(_grpo_head_loss, backend="cce", fullgraph=True)
    cce_peak, got = peak(cce)
    [site] = cce_inductor.explain(_grpo_head_loss, h0, w0, ids, old, adv, mask).sites
    assert (site.kind, site.status) == ("token_stats", "rewritten"), site.reason
    for what, a, e, ref in zip(("loss", "dh", "dW"), got, eager, gold):
        err, eager_err = ((a - ref).norm() / ref.norm()).item(), ((e - ref).norm() / ref.norm()).item()
        assert err <= 2 * eager_err, f"{what}: {err:.2e} against eager bfloat16's {eager_err:.2e}"
    logits_bytes = n * v * 2
    assert cce_peak <= plain_peak - logits_bytes // 2, (cce_peak, plain_peak, logits_bytes)

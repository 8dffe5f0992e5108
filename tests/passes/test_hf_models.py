"""Hugging Face models, unmodified, compiled with backend="cce".

Small random configs (built from config, nothing downloaded): Llama, Mistral, Qwen2, Gemma 2 with
final_logit_softcapping, GPT-2 with tied input/output embeddings. The training step
``model(input_ids=ids, labels=labels).loss`` -- transformers' own ForCausalLMLoss (pad + shift of
the labels, float() of the logits, view, cross_entropy) -- compiled with fullgraph=True must equal
eager's loss and gradients within 1e-5, with the op in the generated code and no N x V buffer.
V = 101 (prime) and hidden 16 < the 24 tokens, so that no weight-sized buffer looks like N x V.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cce_inductor  # noqa: E402
from passes_helpers import (  # noqa: E402  (fresh_dynamo: an autouse fixture)
    fresh_dynamo,
    assert_close,
    assert_grads_close,
    assert_outputs_close,
    compiled_step,
    nxv_buffers,
    run_step,
    uses_op,
)

V, HIDDEN, B, T = 101, 16, 2, 12
_COMMON = dict(
    vocab_size=V,
    hidden_size=HIDDEN,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_COMMON))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_COMMON))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_COMMON))


def _gemma2():
    config = transformers.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=30.0)
    return transformers.Gemma2ForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=V, n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    model = transformers.GPT2LMHeadModel(config)
    # GPT2LMHeadModel's name does not tell transformers its loss type; without this it logs a
    # warning from inside forward (which Dynamo cannot trace). The model code is unchanged.
    model.loss_type = "ForCausalLM"
    return model


MODELS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gemma2": _gemma2, "gpt2": _gpt2}


def _model(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    model.train()
    return model


def _batch(t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    return ids, labels


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_step_equals_eager(name):
    model = _model(name)
    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def step(ids, labels):
        return model(input_ids=ids, labels=labels).loss

    ids, labels = _batch()
    expected, expected_grads = run_step(step, params, (ids, labels))
    out, grads, code = compiled_step(step, params, (ids, labels))
    assert uses_op(code)
    assert nxv_buffers(code, B * T, V) == []
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, names)

    report = cce_inductor.explain(step, ids, labels)
    assert [s.status for s in report.sites] == ["rewritten"]
    if name == "gemma2":
        assert report.sites[0].details["softcap"] == 30.0


def test_model_returning_logits_keeps_them():
    """Compiling the model itself: its output carries the logits, which stay exact."""
    model = _model("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    ids, labels = _batch()

    def forward(ids, labels):
        out = model(input_ids=ids, labels=labels)
        return out.loss, out.logits

    expected, expected_grads = run_step(forward, params, (ids, labels))
    out, grads, code = compiled_step(forward, params, (ids, labels))
    assert uses_op(code)
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, [n for n, _ in model.named_parameters()])
    (site,) = cce_inductor.explain(forward, ids, labels).sites
    assert site.status == "rewritten" and site.remaining and "returned" in site.remaining[0].why


def test_detach_logits_on_the_model_output():
    """detach_logits=True: the model's returned logits carry no gradient; the loss is unchanged."""
    model = _model("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    ids, labels = _batch()

    def forward(ids, labels):
        return model(input_ids=ids, labels=labels)

    expected, expected_grads = run_step(forward, params, (ids, labels))
    out, grads, code = compiled_step(forward, params, (ids, labels), options={"detach_logits": True})
    assert uses_op(code)
    assert not out.logits.requires_grad
    assert_close(out.logits, expected.logits.detach())
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, [n for n, _ in model.named_parameters()])


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_dynamic_sequence_lengths(name):
    """dynamic=True: sizes stay symbolic (and Gemma 2's softcap becomes a symbolic float)."""
    model = _model(name)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(ids, labels):
        return model(input_ids=ids, labels=labels).loss

    compiled = torch.compile(step, backend="cce", fullgraph=True, dynamic=True)
    for t in (9, 12, 17):
        ids, labels = _batch(t, seed=t)
        expected, expected_grads = run_step(step, params, (ids, labels))
        out, grads = run_step(compiled, params, (ids, labels))
        assert_outputs_close(out, expected)
        assert_grads_close(grads, expected_grads, [n for n, _ in model.named_parameters()])


def test_num_items_in_batch_sum_then_divide():
    """Trainer passes num_items_in_batch: ForCausalLMLoss sums and divides."""
    model = _model("qwen2")
    params = [p for p in model.parameters() if p.requires_grad]
    ids, labels = _batch()
    n_items = torch.tensor(int((labels[:, 1:] != -100).sum()) + 5)

    def step(ids, labels, n_items):
        return model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss

    expected, expected_grads = run_step(step, params, (ids, labels, n_items))
    out, grads, code = compiled_step(step, params, (ids, labels, n_items))
    assert uses_op(code)
    assert_outputs_close(out, expected)
    assert_grads_close(grads, expected_grads, [n for n, _ in model.named_parameters()])
    assert cce_inductor.explain(step, ids, labels, n_items).sites[0].details["reduction"] == "sum"

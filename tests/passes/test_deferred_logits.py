"""Returned logits are formed only when read (``cce_inductor.deferred``).

A model compiled as a module returns its logits next to the loss (every Hugging Face causal LM
does). With ``backend="cce"`` the compiled graph returns what they are made of instead, and the
caller gets a :class:`DeferredLogits`: unread, no N x V buffer, matmul or gradient exists anywhere
(generated code and profiler); read by any op -- in eager code, after an optimizer step, or in
another compiled region -- they have eager's values and gradients.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import cce_inductor
from cce_inductor.deferred import DeferredLogits
from passes_helpers import assert_close, fresh_dynamo, nxv_buffers  # noqa: F401  (autouse fixture)

transformers = pytest.importorskip("transformers")

V, HIDDEN, B, T = 101, 16, 2, 12
FALLBACKS = hasattr(torch._inductor.config, "fallback_by_default")


@pytest.fixture(autouse=True)
def _aten_fallbacks():
    """Inductor's ATen fallbacks instead of generated C++ kernels (where torch has them): what is
    checked here is the rewrite and the deferral; the N x V check reads fallback outputs too."""
    if not FALLBACKS:
        yield
        return
    with torch._inductor.config.patch(fallback_by_default=True):
        yield


def _llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def _ids(seed=1):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _inside_the_op(event) -> bool:
    while event is not None:
        if event.name.startswith("cce_inductor::"):
            return True
        event = event.cpu_parent
    return False


def _vocab_matmuls(fn) -> list:
    """Shapes of the matmuls that fn runs with a vocabulary-sized operand outside the op (profiler;
    the op's CPU path multiplies chunks of the vocabulary)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    found = []
    for event in prof.events():
        if _inside_the_op(event):
            continue
        if event.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
            shapes = [tuple(s) for s in event.input_shapes if s]
            if any(V in s for s in shapes):
                found.append((event.name, shapes))
    return found


def test_unread_logits_cost_nothing_and_the_loss_is_eagers():
    model, ids = _llama(), _ids()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="cce")

    def step():
        out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()  # the output stays alive through the backward, as in a training loop
        return out

    out, code = run_and_get_code(step)
    assert isinstance(out.logits, DeferredLogits) and not out.logits.formed
    assert out.logits.shape == (B, T, V) and out.logits.dtype == torch.float32 and out.logits.requires_grad
    assert nxv_buffers("\n".join(code), B * T, V, fallbacks=FALLBACKS) == []
    for p in model.parameters():
        p.grad = None
    assert _vocab_matmuls(lambda: compiled(input_ids=ids, labels=ids).loss.backward()) == []

    expected = ref(input_ids=ids, labels=ids)
    expected.loss.backward()
    assert_close(out.loss, expected.loss)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, what=name)
    assert "deferred" in str(cce_inductor.explain(model, input_ids=ids, labels=ids))


def test_read_logits_have_eagers_values_and_gradients():
    model, ids = _llama(), _ids()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="cce")
    out = compiled(input_ids=ids, labels=ids)
    expected = ref(input_ids=ids, labels=ids)
    logits, want = out.logits, expected.logits

    # metadata needs no data
    assert (logits.shape, logits.stride(), logits.dtype, logits.device) == (want.shape, want.stride(), want.dtype, want.device)
    assert not logits.formed
    # every way of reading gives eager's values
    assert_close(logits[:, -1], want[:, -1])
    assert logits.formed
    assert torch.equal(logits.argmax(-1), want.argmax(-1))
    assert_close(logits.float().cpu(), want)
    assert_close(logits.detach(), want.detach())
    assert not isinstance(logits.detach(), DeferredLogits)
    assert_close(torch.tensor(logits.detach().numpy()), want.detach())
    assert_close(torch.tensor(logits.tolist()), want.detach())
    assert "grad_fn=" in repr(logits) and "tensor(" in repr(logits)
    buffer = io.BytesIO()
    torch.save({"logits": logits}, buffer)
    buffer.seek(0)
    assert_close(torch.load(buffer)["logits"], want.detach())
    assert_close(copy.deepcopy(logits.detach()), want.detach())
    with pytest.raises(RuntimeError, match="requires grad"):
        logits.numpy()

    # a gradient through both the loss and the logits reaches the model as in eager mode
    params, ref_params = list(model.parameters()), list(ref.parameters())
    got = torch.autograd.grad(out.loss + logits.square().mean(), params)
    wanted = torch.autograd.grad(expected.loss + want.square().mean(), ref_params)
    for (name, _), a, b in zip(model.named_parameters(), got, wanted):
        assert_close(a, b, what=name)


def test_optimizer_step_before_the_read_keeps_the_forwards_values():
    model, ids = _llama(), _ids()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="cce")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()  # changes lm_head.weight in place: the deferred logits keep a copy of it first
    assert not out.logits.formed
    assert_close(out.logits, ref(input_ids=ids).logits)

    out = compiled(input_ids=ids, labels=ids)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # any other in-place change: a read raises, never other values
    with pytest.raises(RuntimeError, match="modified in place"):
        out.logits.sum()


@pytest.mark.parametrize("tokens", [4, 64], ids=["logits_smaller_than_weight", "weight_smaller"])
def test_optimizer_step_keeps_the_smaller_of_logits_and_weight(tokens):
    from cce_inductor.deferred import Recipe, defer

    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, V)  # weight V x D = 1616 floats; logits tokens x V
    h = torch.randn(tokens, HIDDEN, requires_grad=True)
    want = head(h).detach()
    logits = defer(Recipe(lambda x, w, b: F.linear(x, w, b), "linear"), want, [h, head.weight, head.bias])
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    head(h).sum().backward()
    opt.step()
    assert logits.formed == (tokens * V <= V * HIDDEN)
    assert_close(logits, want)  # the forward's weights, not the stepped ones


class _SoftcapHead(nn.Module):
    """A head with a bias, a temperature and a softcap on the returned logits."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, V)

    def forward(self, x, y):
        logits = self.head(torch.tanh(self.body(x))) / 0.7
        logits = 30.0 * torch.tanh(logits / 30.0)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "autocast_bf16"])
def test_recipe_replays_softcap_scale_bias_and_autocast(dtype):
    torch.manual_seed(0)
    model, x, y = _SoftcapHead(), torch.randn(B, T, HIDDEN), _ids()
    compiled = torch.compile(model, backend="cce", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        loss, logits = compiled(x, y)
        want_loss, want = model(x, y)
    assert isinstance(logits, DeferredLogits) and logits.dtype == want.dtype == dtype
    # read outside autocast, formed as under it (the hidden states are Inductor's: not bitwise)
    rtol = 1e-2 if dtype is torch.bfloat16 else 1e-5
    assert_close(logits.float(), want.float(), rtol=rtol)
    assert_close(loss, want_loss, rtol=rtol)


def test_logits_read_in_another_compiled_region():
    torch.manual_seed(0)
    model, x, y = _SoftcapHead(), torch.randn(B, T, HIDDEN), _ids()
    ref = copy.deepcopy(model)

    def token_loss(logits, labels):  # a second compiled region reading them (torchtitan's layout)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")

    _, logits = torch.compile(model, backend="cce")(x, y)
    got = torch.compile(token_loss, backend="cce")(logits, y)
    want = token_loss(ref(x, y)[1], y)
    assert_close(got, want)
    got.backward()
    want.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, what=name)


def test_options_turn_deferral_off_or_detach():
    torch.manual_seed(0)
    model, x, y = _SoftcapHead(), torch.randn(B, T, HIDDEN), _ids()
    _, plain = torch.compile(model, backend="cce", options={"defer_logits": False})(x, y)
    assert type(plain) is torch.Tensor
    torch._dynamo.reset()
    _, detached = torch.compile(model, backend="cce", options={"detach_logits": True})(x, y)
    assert isinstance(detached, DeferredLogits) and not detached.requires_grad
    assert torch.equal(detached, plain.detach())


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_eval_returns_deferred_logits_with_eagers_values(mode):
    model, ids = _llama().eval(), _ids()
    compiled = torch.compile(model, backend="cce")
    with mode():
        out = compiled(input_ids=ids, labels=ids)
        want = model(input_ids=ids, labels=ids)
    assert isinstance(out.logits, DeferredLogits) and not out.logits.formed
    assert not out.logits.requires_grad
    assert_close(out.logits, want.logits)
    assert_close(out.loss, want.loss)


def test_enable_defers_for_the_default_backend():
    model, ids = _llama(), _ids()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model)  # backend="inductor", as HF Trainer / accelerate compile
    with cce_inductor.enable():
        out, code = run_and_get_code(lambda: compiled(input_ids=ids, labels=ids))
    out.loss.backward()
    assert isinstance(out.logits, DeferredLogits)
    assert nxv_buffers("\n".join(code), B * T, V, fallbacks=FALLBACKS) == []
    expected = ref(input_ids=ids, labels=ids)
    expected.loss.backward()
    assert_close(out.logits, expected.logits)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, what=name)
    import torch._inductor.compile_fx as compile_fx_module

    assert not getattr(compile_fx_module.compile_fx, "_cce_deferring", False)  # put back on leaving


def test_gradient_checkpointing():
    model, ids = _llama(), _ids()
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = torch.compile(model, backend="cce")(input_ids=ids, labels=ids)
    out.loss.backward()
    assert isinstance(out.logits, DeferredLogits) and not out.logits.formed
    expected = ref(input_ids=ids, labels=ids)
    expected.loss.backward()
    assert_close(out.loss, expected.loss)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, what=name)


def test_hf_trainer_with_torch_compile_under_enable(tmp_path):
    """Trainer(torch_compile=True) compiles with backend="inductor" (accelerate accepts no other
    name); inside ``cce_inductor.enable()`` the loss is rewritten and the logits deferred."""
    pytest.importorskip("accelerate")
    model, ids = _llama(), _ids()
    ref = copy.deepcopy(model)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), torch_compile=True, max_steps=1, per_device_train_batch_size=B,
        learning_rate=0.0, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    with cce_inductor.enable():
        _, code = run_and_get_code(trainer.train)
    code = "\n".join(code)
    assert "cce_inductor.lce_forward" in code and nxv_buffers(code, B * T, V, fallbacks=FALLBACKS) == []
    expected = ref(input_ids=ids, labels=ids).loss
    assert abs(trainer.state.log_history[-1]["train_loss"] - expected.item()) < 1e-4

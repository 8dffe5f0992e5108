"""On a GPU: evaluation of a large-vocabulary model needs O(N) memory beyond the model.

An evaluation loop -- ``model.eval()``, ``torch.no_grad()``, ``out = model(input_ids=ids,
labels=labels)`` with the model compiled as a module (its output carries the logits) -- at
V = 256000: with ``backend="cce"`` the no-grad graph is rewritten to the op's forward and the
returned logits are deferred, so the peak above the model stays a small fraction of the bfloat16
logits (what remains is per-token: activations, log-sum-exps); plain torch.compile holds at least
the logits. The losses agree.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.gpu

V, HIDDEN, B, T = 256000, 256, 4, 1024


def _peak_of_eval(backend: str, ids):
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
    )
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(input_ids=ids, labels=ids)  # compile
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = compiled(input_ids=ids, labels=ids)
        loss = out.loss.float().item()
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    del out, model, compiled
    torch.cuda.empty_cache()
    return peak, loss


def test_eval_under_no_grad_needs_per_token_memory():
    ids = torch.randint(3, V, (B, T), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    logits_bytes = B * T * V * torch.bfloat16.itemsize
    plain_peak, plain_loss = _peak_of_eval("inductor", ids)
    cce_peak, cce_loss = _peak_of_eval("cce", ids)
    print(f"\neval peak above the model: torch.compile {plain_peak / 1e6:.1f} MB, backend='cce' "
          f"{cce_peak / 1e6:.1f} MB; logits (bf16) {logits_bytes / 1e6:.1f} MB")
    assert plain_peak >= logits_bytes
    assert cce_peak <= 0.05 * logits_bytes
    assert abs(cce_loss - plain_loss) <= 2e-2 * abs(plain_loss)

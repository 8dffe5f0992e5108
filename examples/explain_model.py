"""Reading cce_inductor.explain(): what the rewrite found in a model, what it rewrote or left alone, and why.

    python examples/explain_model.py            # Gemma-2-2B's head (V = 256000) on a GPU, a tiny Gemma 2 on the CPU
    python examples/explain_model.py --small

explain(fn, *args, **kwargs) compiles fn on the given inputs with the rewrite and returns a report:
each cross-entropy site, the chain between it and the projection (slices, casts, softcapping), what
was done with it, the shapes, and the N x V bytes no longer materialized. Three cases:
  1. a Hugging Face Gemma 2 training step that returns the loss: rewritten (shift, softcap, tied weights);
  2. the same model called as it is, which also returns the logits: rewritten, and the returned
     logits deferred (formed only if something reads them; backend="cce"'s defer_logits);
  3. a distillation loss against a teacher's probabilities (soft targets): left alone, with the reason.

Expected output: three reports -- 1: one call "[rewritten]" with its softcap and the N x V bytes
avoided; 2: the same, with a line saying the returned logits are deferred; 3: one call "[skipped]"
whose reason names the probability targets -- and a last line that sums them up.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM

import cce_inductor


class DistilledClassifier(nn.Module):
    """A head trained on a teacher's probabilities: the op takes class indices, so the rewrite must
    skip it."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.head = nn.Linear(dim, classes)

    def forward(self, x, teacher_probs):
        return F.cross_entropy(self.head(x), teacher_probs)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CPU size (automatic without a GPU)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    # Gemma 2 (2B)'s head: hidden 2304, vocabulary 256000, final logit softcapping 30 (2 of its 26 layers).
    if small:
        vocab, hidden, layers, heads, kv_heads, head_dim, batch, seq = 4096, 64, 1, 4, 2, 16, 2, 32
    else:
        vocab, hidden, layers, heads, kv_heads, head_dim, batch, seq = 256000, 2304, 2, 8, 4, 256, 2, 1024
    config = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          head_dim=head_dim, final_logit_softcapping=30.0, use_cache=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Gemma2ForCausalLM(config).to(device, dtype)
    input_ids = torch.randint(0, vocab, (batch, seq), device=device)

    def training_loss(input_ids):
        return model(input_ids=input_ids, labels=input_ids).loss

    reports = {}
    print("=== 1. explain(training_loss, input_ids): a Gemma 2 training step returning the loss\n", flush=True)
    reports["loss"] = cce_inductor.explain(training_loss, input_ids)
    print(reports["loss"], flush=True)

    print("\n=== 2. explain(model, input_ids=..., labels=...): the model's output also holds the logits\n", flush=True)
    reports["model"] = cce_inductor.explain(model, input_ids=input_ids, labels=input_ids)
    print(reports["model"], flush=True)

    print("\n=== 3. explain(student, x, teacher_probs): a cross-entropy against soft targets\n", flush=True)
    student = DistilledClassifier(hidden, vocab).to(device, dtype)
    x = torch.randn(batch * seq, hidden, device=device, dtype=dtype)
    teacher_probs = torch.softmax(torch.randn(batch * seq, vocab, device=device), -1).to(dtype)
    reports["soft"] = cce_inductor.explain(student, x, teacher_probs)
    print(reports["soft"], flush=True)
    print(f"\nDone: loss calls rewritten: {len(reports['loss'].rewritten)} in 1, {len(reports['model'].rewritten)} in 2 "
          f"(the returned logits deferred), {len(reports['soft'].rewritten)} in 3 (soft targets: left alone).",
          flush=True)
    return reports


if __name__ == "__main__":
    main()

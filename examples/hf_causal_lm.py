"""A Hugging Face causal-LM training loop compiled with backend="cce"; the model's code is untouched.

    python examples/hf_causal_lm.py            # Llama-3.2-1B-like (16 layers, V = 128256) on a GPU, ~2-3 minutes
    python examples/hf_causal_lm.py --small    # a tiny Llama (the default without a GPU)

The model is transformers' own LlamaForCausalLM from a config (random weights; nothing is
downloaded). The batch is what a data collator makes: right padding, an attention mask, labels with
-100 at the padding. `model(input_ids=..., attention_mask=..., labels=...)` computes the loss inside
the model (HF's ForCausalLMLoss: label shift, float32 upcast, cross_entropy, ignore_index=-100); the
rewrite finds it there.

A Hugging Face model also returns its logits. backend="cce" hands them back deferred (option
defer_logits, on by default): a tensor that forms its values only when something reads them, with
eager's values and gradients. This loop never reads them, so no N x V tensor is ever formed (holding
the output across the optimizer step costs a copy of the head's weight there, so that a later read
would still see the forward's weights). (With HF Trainer, whose accelerate backend list is fixed, use
``with cce_inductor.enable(): trainer.train()`` instead of backend="cce".)

Expected output: explain()'s report with one loss call (HF's ForCausalLMLoss), rewritten, and a
line saying the returned logits are deferred; then one line per step whose loss falls from about
ln(V) (9.0 on the CPU, 11.8 on a GPU) -- the loop trains on one collated batch of random tokens again
at every step, a stand-in for a data loader, so the model memorizes it -- with the returned logits'
shape and "formed: False"; on a GPU, the peak memory.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cce_inductor


def collated_batch(vocab: int, batch: int, seq: int, step: int, device: str) -> dict:
    """Random token rows of different lengths, right-padded as a DataCollator would."""
    gen = torch.Generator().manual_seed(step)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    attention_mask = (torch.arange(seq) < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels).items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CPU size (automatic without a GPU)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    if small:
        config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, use_cache=False)
        batch, seq = 4, 64
    else:  # Llama-3.2-1B's shape: 16 layers, hidden 2048, vocabulary 128256, tied embeddings
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                             tie_word_embeddings=True, rope_theta=500000.0, use_cache=False)
        batch, seq = 4, 2048
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    model.train()

    report = cce_inductor.explain(model, **collated_batch(config.vocab_size, batch, seq, 0, device))
    print(report, flush=True)

    compiled = torch.compile(model, backend="cce")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batch_inputs = collated_batch(config.vocab_size, batch, seq, 0, device)  # one batch, trained on repeatedly
    losses, formed = [], []
    for step in range(args.steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            outputs = compiled(**batch_inputs)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(outputs.loss.item())
        formed.append(bool(getattr(outputs.logits, "formed", True)))  # deferred logits: formed only once read
        print(f"step {step}: loss {losses[-1]:.4f}, logits returned {tuple(outputs.logits.shape)}, "
              f"formed: {formed[-1]}", flush=True)
    if device == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    print(f"Done: {len(report.rewritten)} of {len(report.sites)} loss call(s) rewritten; loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f} over {len(losses)} steps (one batch trained on repeatedly, so it falls); "
          f"the returned logits formed in {sum(formed)} of {len(formed)} steps.", flush=True)
    return {"report": report, "losses": losses, "logits_formed": formed}

if __name__ == "__main__":
    main()

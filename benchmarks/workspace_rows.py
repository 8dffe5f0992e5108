"""The workspace path's row kernel alone, under its launch variants, on one chunk of logits.

    python -m benchmarks.workspace_rows [--shapes N,D,V ...] [--rounds 3]

For each shape, the chunk ``max_workspace_bytes=2**30`` gives (``workspace.workspace_rows``) of
LM-like bf16 logits (``testing.make_inputs``, the chunk's rows of e @ c.T), mean loss: the row kernel
(lse, loss, dz in place) timed in interleaved rounds (benchmarks/rounds.py), each call on a fresh
copy of the logits, under each of ``VARIANTS`` (block bytes per load, warps, programs per SM, the
next block's load issued before this one's math, evict_first hints on the second sweep, the
launch's num_stages). Per variant: its registers and spills, ms per call (the copy's time, measured
alone, taken off), the bandwidth of its three passes over the chunk (read, read, write), its loss
and dz against the default's.
(results/h200-2026-12-01m/workspace_rows.log also times a version of the kernel whose first sweep kept
its running max and sum per lane, reduced once per row: 5-9% slower with 16 warps, up to 2x with 8;
since removed.) Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
from triton.testing import do_bench

from cce_inductor.kernels import workspace
from cce_inductor.testing import make_inputs

from .points import GOAL_SHAPES
from .rounds import interleaved_ms

# (label, then the launcher's keywords in SPEC_KEYWORDS' order); the first is the default.
SPEC_KEYWORDS = ("block_bytes", "warps", "programs_per_sm", "prefetch", "evict_sweep2", "stages")
VARIANTS = [
    ("32 KB blocks, 16 warps, 1 program/SM (default)", 32768, 16, 1, False, False, None),
    ("32 KB, 16 warps, 1/SM, num_stages 1", 32768, 16, 1, False, False, 1),
    ("32 KB, 16 warps, 1/SM, num_stages 4", 32768, 16, 1, False, False, 4),
    ("32 KB, 16 warps, 1/SM, prefetch", 32768, 16, 1, True, False, None),
    ("32 KB, 16 warps, 1/SM, prefetch, evict_first", 32768, 16, 1, True, True, None),
    ("16 KB, 16 warps, 1/SM, prefetch", 16384, 16, 1, True, False, None),
    ("64 KB, 16 warps, 1/SM, prefetch", 65536, 16, 1, True, False, None),
    ("16 KB, 8 warps, 2/SM", 16384, 8, 2, False, False, None),
    ("16 KB, 8 warps, 2/SM, prefetch", 16384, 8, 2, True, False, None),
    ("16 KB, 8 warps, 2/SM, prefetch, evict_first", 16384, 8, 2, True, True, None),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(GOAL_SHAPES), help="N,D,V each")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for shape in args.shapes:
        n, d, v = map(int, shape.split(","))
        inputs = make_inputs("lm", n, d, v, device="cuda", seed=0)
        rows = workspace.workspace_rows(n, v, 2, 2**30)
        logits = inputs.e[:rows] @ inputs.c.T
        targets = inputs.targets[:rows]
        weight = torch.full((), 1.0 / n, device="cuda")
        del inputs
        z, loss = torch.empty_like(logits), torch.empty(rows, device="cuda")
        copy_ms = do_bench(lambda: z.copy_(logits), return_mode="median")
        gb = 3 * z.numel() * z.element_size() / 1e9
        print(f"\n=== N={n} D={d} V={v}: a chunk of {rows} x {v} bf16 logits ({gb / 3:.2f} GB); "
              f"its copy {copy_ms:.3f} ms", flush=True)

        def call(*spec):
            def run():
                z.copy_(logits)
                return workspace._launch_rows(z, targets, weight, loss, -100, 0.0, 0.0, True,
                                              **dict(zip(SPEC_KEYWORDS, spec)))
            return run

        variants, results = {}, {}
        for label, *spec in VARIANTS:  # compile each, keep its result; one that fails is reported
            try:
                compiled = call(*spec)()
                print(f"  {label}: {getattr(compiled, 'n_regs', '?')} registers, "
                      f"{getattr(compiled, 'n_spills', '?')} spills", flush=True)
                results[label] = (loss.clone(), z.clone())
                variants[label] = call(*spec)
            except Exception as exc:
                print(f"  {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
        default_loss, default_dz = results[VARIANTS[0][0]]
        for label, samples in interleaved_ms(variants, rounds=args.rounds).items():
            ms = statistics.median(samples) - copy_ms
            got_loss, got_dz = results[label]
            print(f"  {label:<50} {ms:6.3f} ms  {gb / ms:5.2f} TB/s  (rounds {min(samples) - copy_ms:.3f}-"
                  f"{max(samples) - copy_ms:.3f})  loss {float((got_loss - default_loss).abs().max()):.1e} "
                  f"dz {float((got_dz.float() - default_dz.float()).abs().max()):.1e} from the default",
                  flush=True)
        del logits, z


if __name__ == "__main__":
    main()

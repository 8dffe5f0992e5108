"""The workspace path's row kernel alone, under its launch variants, on one chunk of logits.

    python -m benchmarks.workspace_rows [--shapes N,D,V ...] [--rounds 3] [--softcaps 0 30] [--baseline FILE]
    python -m benchmarks.workspace_rows --offline      (no GPU: registers and spills for sm_90)

For each shape, the chunk ``max_workspace_bytes=2**30`` gives (``workspace.workspace_rows``) of
LM-like bf16 logits (``testing.make_inputs``, the chunk's rows of e @ c.T), mean loss, under each of
``--softcaps`` (a final logit softcap: more registers per thread): the row kernel
(lse, loss, dz in place) timed in interleaved rounds (benchmarks/rounds.py), each call on a fresh
copy of the logits, under each of ``VARIANTS`` (block bytes per load, warps, programs per SM, the
next block's load issued before this one's math, evict_first hints on the second sweep). Per
variant: its registers and spills, ms per call (the copy's time, measured alone, taken off), the
bandwidth of its three passes over the chunk (read, read, write), its loss and dz against the
default's. ``--baseline FILE`` times another version of the kernel's module (e.g. the previous
commit's, from ``git show``) under the first two variants' launches in the same rounds, so that a
change of the kernel's math is measured side by side. ``--offline`` compiles the variants for sm_90 with the local Triton instead
(``offline_resources``; Triton's pipeliner leaves these loops alone: the launch's num_stages 1 and 3
gave the same PTX, so it is not a variant).
(results/h200-2026-12-01m/workspace_rows.log also times a version of the kernel whose first sweep kept
its running max and sum per lane, reduced once per row: 5-9% slower with 16 warps, up to 2x with 8;
since removed.) Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
import itertools
import pathlib
import statistics

import torch
import triton
from triton.testing import do_bench

from cce_inductor.kernels import workspace
from cce_inductor.testing import make_inputs

from .points import GOAL_SHAPES
from .rounds import interleaved_ms

# (label, then the launcher's keywords in SPEC_KEYWORDS' order); the first is the default.
SPEC_KEYWORDS = ("block_bytes", "warps", "programs_per_sm", "prefetch", "evict_sweep2")
VARIANTS = [
    ("16 KB, 8 warps, 2/SM, prefetch, evict_first (default)", 16384, 8, 2, True, True),
    ("32 KB, 16 warps, 1/SM, prefetch (the default to 2026-12-02)", 32768, 16, 1, True, False),
    ("32 KB, 16 warps, 1/SM, no prefetch (the default to 2026-12-01)", 32768, 16, 1, False, False),
    ("32 KB, 16 warps, 1/SM, prefetch, evict_first", 32768, 16, 1, True, True),
    ("16 KB, 16 warps, 1/SM, prefetch", 16384, 16, 1, True, False),
    ("16 KB, 8 warps, 2/SM", 16384, 8, 2, False, False),
    ("16 KB, 8 warps, 2/SM, prefetch", 16384, 8, 2, True, False),
    ("8 KB, 8 warps, 2/SM, prefetch, evict_first", 8192, 8, 2, True, True),
]


def offline_resources(arch: int = 90, vocab: int = 256000) -> list[tuple[str, bool, int, int, int, int]]:
    """Each variant compiled for sm_``arch`` without a GPU (Triton's own ptxas; V and the row stride
    divisible by 16, as at the goal shapes), plain and with softcap + label smoothing:
    (label, softcap and smoothing, registers per thread, stack bytes per thread (spills), 16-byte
    global loads in the PTX, programs that fit on an SM by its 64K registers)."""
    import re
    import subprocess
    import tempfile

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(workspace._fused_rows_kernel, triton.runtime.JITFunction):
        raise SystemExit("--offline compiles for a GPU: run it without TRITON_INTERPRET=1")
    signature = {"Z": "*bf16", "Targets": "*i64", "Weight": "*fp32", "Loss": "*fp32", "M": "i32", "V": "i32",
                 "stride_zm": "i32", "ignore_index": "i32", "softcap": "fp32", "target_weight": "fp32",
                 "uniform_weight": "fp32"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6)}  # pointers, V, the row stride
    rows = []
    for label, *spec in VARIANTS:
        launch = dict(zip(SPEC_KEYWORDS, spec))
        for options in (False, True):
            constants = dict(BLOCK_V=workspace._gpu_block_v(vocab, 2, launch["block_bytes"]),
                             HAS_SOFTCAP=options, HAS_SMOOTHING=options, WRITE_GRAD=True, ROUND_BF16=False,
                             PREFETCH=launch["prefetch"], EVICT_SWEEP2=launch["evict_sweep2"], FAST_RCP=True)
            source = ASTSource(fn=workspace._fused_rows_kernel,
                               signature={**signature, **{k: "constexpr" for k in constants}},
                               constexprs=constants, attrs=aligned)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": launch["warps"]})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                                       capture_output=True, text=True, check=True).stdout
            registers = int(re.search(r"REG:(\d+)", usage).group(1))
            stack = int(re.search(r"STACK:(\d+)", usage).group(1))
            fit = 65536 // (-(-registers // 8) * 8 * 32 * launch["warps"])  # registers go out 8 at a time
            rows.append((label, options, registers, stack, fit, len(re.findall(r"ld\.global\S*\.v4", compiled.asm["ptx"]))))
    return rows


def _load_baseline(path: pathlib.Path):
    """``path`` imported as a sibling of cce_inductor/kernels/workspace.py (its relative imports resolve)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cce_inductor.kernels._workspace_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(GOAL_SHAPES), help="N,D,V each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--softcaps", nargs="+", type=float, default=[0.0],
                        help="final logit softcaps to time the rows under (0: none; Gemma 2's is 30)")
    parser.add_argument("--baseline", type=pathlib.Path,
                        help="another version of cce_inductor/kernels/workspace.py (e.g. from `git show`): "
                             "its row kernel timed too, under the first two variants' launches")
    parser.add_argument("--offline", action="store_true",
                        help="no GPU: compile each variant for sm_90 and print its registers and spills")
    args = parser.parse_args(argv)
    if args.offline:
        print("triton", triton.__version__, "sm_90, V = 256000")
        for label, options, registers, stack, fit, loads in offline_resources():
            print(f"  {label:<50} {'softcap+smoothing' if options else 'plain':<18} {registers:4d} registers "
                  f"{stack:5d} stack bytes  {fit} per SM fit  {loads:3d} 16-byte loads")
        return
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    baseline = _load_baseline(args.baseline) if args.baseline else None
    for shape, softcap in itertools.product(args.shapes, args.softcaps):
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
        print(f"\n=== N={n} D={d} V={v}, softcap {softcap:g}: a chunk of {rows} x {v} bf16 logits "
              f"({gb / 3:.2f} GB); its copy {copy_ms:.3f} ms", flush=True)

        def call(module, *spec):
            def run():
                z.copy_(logits)
                return module._launch_rows(z, targets, weight, loss, -100, softcap, 0.0, True,
                                           **dict(zip(SPEC_KEYWORDS, spec)))
            return run

        runs = [(label, call(workspace, *spec)) for label, *spec in VARIANTS]
        if baseline is not None:
            runs += [(f"baseline: {label}", call(baseline, *spec)) for label, *spec in VARIANTS[:2]]
        variants, results = {}, {}
        for label, run in runs:  # compile each, keep its result; one that fails is reported
            try:
                compiled = run()
                print(f"  {label}: {getattr(compiled, 'n_regs', '?')} registers, "
                      f"{getattr(compiled, 'n_spills', '?')} spills", flush=True)
                results[label] = (loss.clone(), z.clone())
                variants[label] = run
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

"""Where the op's forward+backward time goes, against its forward and backward timed apart.

    python -m benchmarks.fwdbwd_parts [--shapes N,D,V ...] [--regimes uniform lm]
                                      [--workspace-programs 132 78 ...] [--workspace-variants 0 1 ...]

bf16, the public op ``linear_cross_entropy(e, c, targets)`` (mean, exact) with e and c requiring
grad. Per shape and regime, in interleaved rounds (benchmarks/rounds.py): T = the cuBLAS logits GEMM
(the ratios are to its fastest round, so they lean high), the forward under grad mode,
forward+backward (the grads set to None before each call, as the benchmark's do_bench does), and
their difference (the backward); then the CUDA kernels of one forward+backward by total time
(torch.profiler). Why: in the op-level benchmark, the Gemma uniform point's forward+backward took ~4
ms more than its forward and backward timed apart, and the other points did not
(results/h200-2026-12-01c, -d). ``--workspace-programs``: the workspace path
(``max_workspace_bytes=2**30``) forward+backward with its row kernel launched on that many programs
(default: one per SM), for whether fewer rows in flight let the row's second sweep find it in L2
(132 rows of 512 KB at V = 256000 do not fit in 50 MB). ``--workspace-variants``: the same
forward+backward with the row kernel launched as ``benchmarks/workspace_rows.py``'s VARIANTS of
those indices (0: the default), to see a variant's gain at op level. ``--sustained K``: K forward+backward calls
back to back (after K untimed ones) under the profiler, their kernels' time per call against the
loop's time per call (CUDA events): the difference is time the GPU spent between kernels; kernels
slower than in the single profiled call mean a lower clock under sustained load; with workspace
variants or programs, each of those runs profiled the same way twice, alternating, with the row
kernel's own time per call. Prints only."""

from __future__ import annotations

import argparse
import functools
import statistics
from unittest import mock

import torch
import triton

from cce_inductor import linear_cross_entropy
from cce_inductor.kernels import workspace

from . import workspace_rows
from .points import add_point_arguments, points
from .rounds import interleaved_ms, print_profile, summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_point_arguments(parser, regimes=("uniform", "lm"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workspace-programs", nargs="*", type=int, default=[])
    parser.add_argument("--workspace-variants", nargs="*", type=int, default=[],
                        choices=range(len(workspace_rows.VARIANTS)), metavar="INDEX")
    parser.add_argument("--sustained", type=int, default=0, metavar="K",
                        help="also profile K forward+backward calls back to back")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for n, d, v, regime, inp in points(args):
        e = inp.e.detach().requires_grad_()
        c = inp.c.detach().requires_grad_()
        y = inp.targets

        def forward(**options):
            return linear_cross_entropy(e, c, y, **options)

        def fwdbwd(**options):
            e.grad = c.grad = None
            forward(**options).backward()

        runs = {"T (e @ c.T)": lambda: e.detach() @ c.detach().T, "forward": forward, "forward+backward": fwdbwd}
        for programs in args.workspace_programs:
            def ws(programs=programs):
                # (scale_ reads sm_count too: it moves no bytes at the upstream gradient 1 used here)
                with mock.patch.object(workspace, "sm_count", lambda device: programs):
                    fwdbwd(max_workspace_bytes=2**30)
            runs[f"workspace 1 GiB fw+bw, {programs} row programs"] = ws
        launch_rows = workspace._launch_rows
        for index in args.workspace_variants:
            label, *spec = workspace_rows.VARIANTS[index]
            launch = functools.partial(launch_rows, **dict(zip(workspace_rows.SPEC_KEYWORDS, spec)))

            def ws_variant(launch=launch):
                with mock.patch.object(workspace, "_launch_rows", launch):
                    fwdbwd(max_workspace_bytes=2**30)
            runs[f"workspace 1 GiB fw+bw, rows: {label}"] = ws_variant
        times = interleaved_ms(runs, args.rounds)
        gemm_ms = min(times["T (e @ c.T)"])
        print(f"N={n} D={d} V={v} {regime}:", flush=True)
        for label, samples in times.items():
            print(f"  {label:<72} {summary(samples, gemm_ms)}", flush=True)
        fw, fb = (statistics.median(times[k]) for k in ("forward", "forward+backward"))
        print(f"  {'backward (difference)':<72} {fb - fw:7.2f} ms  {(fb - fw) / gemm_ms:5.3f} T", flush=True)
        print_profile(fwdbwd, "forward+backward", rows=12)
        if args.sustained:
            sustained_profile(fwdbwd, args.sustained)
            # the workspace variants twice, alternating, so that a drift of the clock between
            # profiles shows as a spread between a variant's two profiles rather than as a gain
            variant_runs = [(label, run) for label, run in runs.items() if label.startswith("workspace")]
            for _ in range(2):
                for label, run in variant_runs:
                    print(f"  {label}:", flush=True)
                    sustained_profile(run, args.sustained, kernel="_fused_rows_kernel")


def sustained_profile(run, calls: int, kernel: str | None = None) -> None:
    """Kernel time per call of ``calls`` back-to-back calls against their wall time per call; with
    ``kernel``, also the time per call of the kernels whose name contains it."""
    for _ in range(calls):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(calls):
            run()
        end.record()
        torch.cuda.synchronize()
    kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(ev.time_range.elapsed_us() for ev in kernels) / 1e3 / calls
    wall_ms = start.elapsed_time(end) / calls
    print(f"  sustained, {calls} calls: kernels {busy_ms:.2f} ms per call, loop {wall_ms:.2f} ms per call, "
          f"between kernels {wall_ms - busy_ms:.2f} ms", flush=True)
    if kernel is not None:
        own_ms = sum(ev.time_range.elapsed_us() for ev in kernels if kernel in ev.name) / 1e3 / calls
        print(f"  sustained, {calls} calls: {kernel} {own_ms:.3f} ms per call", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)


if __name__ == "__main__":
    main()

"""The buffered backward's variants side by side: window sizes, filtering, the dE GEMM's tile configs.

    python -m benchmarks.backward_variants [--shapes N,D,V ...] [--regimes lm uniform] [--windows]
                                           [--no-filtered] [--configs] [--epilogue]
                                           [--buffer-shapes RxW ...] [--de-variants] [--dc-variants]

bf16. Per shape and data regime, median times (``do_bench``) of the backward in units of T = the
cuBLAS logits GEMM measured first in the same process: exact (dE by cuBLAS), then filtered (dE by
``_filtered_de_kernel`` over the kept tiles) at filter_eps = 0 (every tile kept: the Triton GEMM
against cuBLAS's), the default FILTER_EPS, 2^-2, and 1e9 (every tile skipped: the filtered path's
floor), each with the fraction s of tiles skipped. ``--epilogue``: the exact backward with the dz
kernel's lean and masked epilogues (LEAN_DZ_EPILOGUE), in interleaved rounds (benchmarks/rounds.py).
``--windows``: the exact backward with the fewest, evenly sized windows of tokens
(WAVE_ALIGNED_WINDOWS off) against the default windows sized to fill the dz kernel's waves, with
each one's window size and the default's kernels by time (torch.profiler). ``--buffer-shapes RxW
...``: the exact and (unless --no-filtered) the filtered backward with windows of R tokens and chunks
of W vocabulary entries (``buffered_window`` patched), in interleaved rounds with each one's default,
each with its scratch. ``--configs``: the eps = 0 point for each candidate config of the dE GEMM.
``--de-variants``: the filtered backward (default eps) with each candidate config of the dE GEMM, each
at the window and chunk that buffered_window picks for it, in interleaved rounds with the exact one.
``--dc-variants``: the filtered backward with dC exact (cuBLAS over the whole buffer) and corrected
(the filtered dC GEMM with the skipped tiles' stand-ins) for each candidate config of that GEMM, in
interleaved rounds with the exact one; then the errors of exact mode and of both filtered dCs against
float64 math on the same inputs, and the corrected one's kernels by time.
(Its log in results/h200-2026-12-01g also compares two ways of listing the kept tiles, since removed.)
Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from triton.testing import do_bench

from cce_inductor import reference
from cce_inductor.kernels import FILTER_EPS, backward, lce_backward, lce_forward
from cce_inductor.kernels.common import TileConfig, filtered_dc_config, filtered_de_config

from .points import add_point_arguments, points
from .rounds import interleaved_ms, print_profile, summary

# (tokens, vocabulary per K step, D per program) x warps x stages; tokens = the dz kernel's tile.
# Shared memory per program: stages x (tokens + D) x K x 2 B; under ~113 KB two programs share an SM,
# so one's accumulator read-modify-write overlaps the other's main loop.
DE_CONFIGS = [
    TileConfig(block_n=128, block_v=64, block_d=128, num_warps=8, num_stages=4, tma=True),
    TileConfig(block_n=128, block_v=64, block_d=256, num_warps=8, num_stages=4, tma=True),
    TileConfig(block_n=128, block_v=64, block_d=256, num_warps=8, num_stages=3, tma=True),
    TileConfig(block_n=128, block_v=64, block_d=128, num_warps=4, num_stages=3, tma=True),
]

# The filtered dC GEMM's candidates: (vocabulary rows, tokens per K step, D per program) x warps x stages;
# the rows divide the dz kernel's 256-entry vocab tile (one column of keep flags per output tile).
DC_CONFIGS = [
    TileConfig(block_n=64, block_v=128, block_d=256, num_warps=8, num_stages=3, tma=True),
    TileConfig(block_n=64, block_v=128, block_d=128, num_warps=8, num_stages=4, tma=True),
    TileConfig(block_n=64, block_v=256, block_d=128, num_warps=8, num_stages=3, tma=True),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_point_arguments(parser)
    parser.add_argument("--windows", action="store_true", help="also the exact backward with evenly sized windows")
    parser.add_argument("--filtered", action=argparse.BooleanOptionalAction, default=True,
                        help="the filtered points (on by default)")
    parser.add_argument("--configs", action="store_true", help="also each candidate config of the dE GEMM")
    parser.add_argument("--epilogue", action="store_true",
                        help="also the exact backward with the dz kernel's masked epilogue (LEAN_DZ_EPILOGUE off)")
    parser.add_argument("--profile-eps", nargs="*", type=float, default=[],
                        help="profile the filtered backward's kernels at these filter_eps")
    parser.add_argument("--buffer-shapes", nargs="*", default=[], metavar="ROWSxCOLS",
                        help="exact and filtered backward with windows of ROWS tokens and chunks of COLS entries")
    parser.add_argument("--de-variants", action="store_true",
                        help="the filtered backward with each candidate config of the dE GEMM, in rounds")
    parser.add_argument("--dc-variants", action="store_true",
                        help="the filtered backward with dC exact (cuBLAS) and corrected (each dC GEMM config), "
                             "in rounds")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of --epilogue, --buffer-shapes, --de-variants and --dc-variants")
    args = parser.parse_args(argv)
    for n, d, v, regime, inp in points(args):
        e, c, y = inp.e, inp.c, inp.targets
        g = torch.full((n,), 1.0 / n, device="cuda")
        zero = torch.zeros_like(g)
        _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
        gemm_ms = do_bench(lambda: e @ c.T, return_mode="median")
        print(f"N={n} D={d} V={v} {regime}: T (e @ c.T) {gemm_ms:.2f} ms", flush=True)

        def backward_ms(filter_grad, **options):
            run = lambda: lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0,  # noqa: E731
                                       filter_grad, True, True, False, **options)
            return do_bench(run, return_mode="median")

        exact_ms = backward_ms(False)

        def show(label, ms, extra=""):
            print(f"  {label:<44} {ms:7.2f} ms  {ms / gemm_ms:5.2f} T  ({ms / exact_ms:.3f} x exact){extra}",
                  flush=True)

        def windows():
            return f"  windows of {backward.buffered_window(e, v)[0]} tokens"

        show("exact", exact_ms, windows())
        if args.epilogue:
            def with_epilogue(lean):
                def run():
                    with mock.patch.object(backward, "LEAN_DZ_EPILOGUE", lean):
                        lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, False, True, True, False)
                return run

            rounds = interleaved_ms({f"exact, LEAN_DZ_EPILOGUE={lean}": with_epilogue(lean) for lean in (True, False)},
                                    rounds=args.rounds)
            for label, samples in rounds.items():
                print(f"  {label:<44} {summary(samples, gemm_ms)}", flush=True)
        if args.buffer_shapes:
            def with_shape(shape, filter_grad):
                def run():
                    with mock.patch.object(backward, "buffered_window", lambda *args, **kwargs: shape):
                        lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, filter_grad, True, True, False)
                return run

            variants = {}
            for filter_grad in (False, True) if args.filtered else (False,):
                default = backward.buffered_window(e, v, filtered=filter_grad)
                for shape in [default] + [tuple(map(int, text.split("x"))) for text in args.buffer_shapes]:
                    rows, cols = shape
                    if filter_grad and -(-cols // backward.buffered_config(e).block_v) > backward.MAX_CHUNK_TILES:
                        continue  # more vocab tiles than the filtered dE GEMM's lists hold
                    scratch_mb = (rows * backward.buffer_row_stride(cols) * e.element_size() + 4 * rows * d) / 1e6
                    label = (f"{'filtered' if filter_grad else 'exact'}, {rows} x {cols}, {scratch_mb:.1f} MB"
                             f"{' (default)' if shape == default else ''}")
                    variants.setdefault(label, with_shape(shape, filter_grad))
            for label, samples in interleaved_ms(variants, rounds=args.rounds).items():
                print(f"  {label:<48} {summary(samples, gemm_ms)}", flush=True)
        if args.de_variants:
            def with_de(cfg):
                def run():
                    with mock.patch.object(backward, "filtered_de_config", lambda t: cfg):
                        return lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, True, True, True, False)
                return run

            variants = {"exact (default)": lambda: lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0,
                                                                False, True, True, False)}
            for cfg in DE_CONFIGS:
                with mock.patch.object(backward, "filtered_de_config", lambda t, cfg=cfg: cfg):
                    rows, cols = backward.buffered_window(e, v, filtered=True)
                label = (f"filtered, dE {cfg.block_n}x{cfg.block_d} k{cfg.block_v} w{cfg.num_warps} "
                         f"s{cfg.num_stages}, {rows} x {cols}{' (default)' if cfg == filtered_de_config(e) else ''}")
                variants[label] = with_de(cfg)
            for label, samples in interleaved_ms(variants, rounds=args.rounds).items():
                print(f"  {label:<60} {summary(samples, gemm_ms)}", flush=True)
        if args.dc_variants:
            def with_dc(dc_filter, cfg=None):
                def run():
                    with mock.patch.object(backward, "filtered_dc_config", lambda t: cfg or filtered_dc_config(t)):
                        return lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, True, True, True, False,
                                            dc_filter=dc_filter)
                return run

            rows, cols = backward.buffered_window(e, v, filtered=True)
            variants = {"exact (default)": lambda: lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0,
                                                                False, True, True, False),
                        f"filtered, dC exact (cuBLAS), {rows} x {cols}": with_dc("exact")}
            for cfg in DC_CONFIGS:
                with mock.patch.object(backward, "filtered_dc_config", lambda t, cfg=cfg: cfg):
                    rows, cols = backward.buffered_window(e, v, filtered=True, filtered_dc=True)
                label = (f"filtered, dC corrected {cfg.block_v}x{cfg.block_d} k{cfg.block_n} w{cfg.num_warps} "
                         f"s{cfg.num_stages}, {rows} x {cols}{' (default)' if cfg == filtered_dc_config(e) else ''}")
                variants[label] = with_dc("corrected", cfg)
            for label, samples in interleaved_ms(variants, rounds=args.rounds).items():
                print(f"  {label:<64} {summary(samples, gemm_ms)}", flush=True)
            # errors against float64 math on the same bf16 inputs (reference.chunked_backward)
            gold = reference.chunked_backward(e.float(), c.float(), None, y, lse, g, zero, -100, 0.0, 0.0,
                                              True, True, False)
            for label, filter_grad, dc_filter in (("exact", False, None), ("filtered, dC exact", True, "exact"),
                                                  ("filtered, dC corrected", True, "corrected")):
                counts = torch.zeros(2, dtype=torch.int32, device="cuda")
                grads = lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, filter_grad, True, True, False,
                                     dc_filter=dc_filter, tile_counts=counts)
                kept, skipped = counts.tolist()
                errs = [float((a.double() - b.double()).norm() / b.double().norm())
                        for a, b in zip(grads[:2], gold[:2])]
                print(f"  {label}: s {skipped / max(1, kept + skipped):.3f}, against float64 "
                      f"dE {errs[0]:.2e} dC {errs[1]:.2e}", flush=True)
            del gold
            print_profile(with_dc("corrected"), "filtered, dC corrected")
        if args.windows:
            with mock.patch.object(backward, "WAVE_ALIGNED_WINDOWS", False):
                show("exact, evenly sized windows", backward_ms(False), windows())
            print_profile(lambda: lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, False, True, True, False),
                     "exact")
        for eps in (0.0, FILTER_EPS, 2.0**-2, 1e9) if args.filtered else ():
            counts = torch.zeros(2, dtype=torch.int32, device="cuda")
            lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, True, True, True, False,
                         filter_eps=eps, tile_counts=counts)
            kept, skipped = counts.tolist()
            show(f"filtered, eps {eps:g}", backward_ms(True, filter_eps=eps),
                 f"  s {skipped / max(1, kept + skipped):.3f}")
        if args.configs:
            for cfg in DE_CONFIGS:
                with mock.patch.object(backward, "filtered_de_config", lambda t, cfg=cfg: cfg):
                    label = (f"filtered, eps 0, dE {cfg.block_n}x{cfg.block_d} k{cfg.block_v} "
                             f"w{cfg.num_warps} s{cfg.num_stages}{' *' if cfg == filtered_de_config(e) else ''}")
                    show(label, backward_ms(True, filter_eps=0.0))
                    with mock.patch.object(backward, "FILTERED_DE_PERSISTENT", not backward.FILTERED_DE_PERSISTENT):
                        show(label + (" one program per tile" if backward.FILTERED_DE_PERSISTENT else " persistent"),
                             backward_ms(True, filter_eps=0.0))
        for eps in args.profile_eps:
            print_profile(lambda eps=eps: lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0,
                                                  True, True, True, False, filter_eps=eps),
                     f"filtered, eps {eps:g}")


if __name__ == "__main__":
    main()

"""Temporary: the filtered backward of commit 576f614 (4-bit packed lists) against the current kernel, in rounds."""
from unittest import mock
import torch
from triton.testing import do_bench
from cce_inductor.kernels import backward, lce_forward
from cce_inductor.kernels import old_backward
from cce_inductor.kernels.common import TileConfig
from .points import points, add_point_arguments
from .rounds import interleaved_ms, summary
import argparse

NARROW = TileConfig(block_n=128, block_v=64, block_d=128, num_warps=8, num_stages=4, tma=True)
WIDE = TileConfig(block_n=128, block_v=64, block_d=256, num_warps=8, num_stages=3, tma=True)

p = argparse.ArgumentParser(); add_point_arguments(p)
for n, d, v, regime, inp in points(p.parse_args()):
    e, c, y = inp.e, inp.c, inp.targets
    g = torch.full((n,), 1.0 / n, device="cuda"); zero = torch.zeros_like(g)
    _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    gemm_ms = do_bench(lambda: e @ c.T, return_mode="median")
    print(f"N={n} D={d} V={v} {regime}: T {gemm_ms:.2f} ms", flush=True)
    old_shape = old_backward.buffered_window(e, v, filtered=True)
    def new(cfg, lists, shape=None, filt=True):
        def run():
            with mock.patch.object(backward, "filtered_de_config", lambda t: cfg), mock.patch.object(backward, "FILTERED_DE_LISTS", lists):
                if shape is None:
                    return backward.lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, filt, True, True, False)
                with mock.patch.object(backward, "buffered_window", lambda *a, **k: shape):
                    return backward.lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, filt, True, True, False)
        return run
    old = lambda: old_backward.lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, True, True, True, False)
    default_cfg = backward.filtered_de_config(e)
    variants = {
        "exact": new(default_cfg, "bitmask", None, False),
        f"old filtered {old_shape}": old,
        f"new bitmask {default_cfg.block_d} {old_shape}": new(default_cfg, "bitmask", old_shape),
        f"new groups {default_cfg.block_d} {old_shape}": new(default_cfg, "groups", old_shape),
        "new groups 256 default shape": new(WIDE, "groups"),
    }
    ref = old()[0]
    for k in list(variants)[2:]:
        print(f"  {k}: max |dE - old| {(variants[k]()[0] - ref).abs().max():.3g}")
    for label, s in interleaved_ms(variants, rounds=3).items():
        print(f"  {label:<44} {summary(s, gemm_ms)}", flush=True)

"""How the error of a filtered dC grows with N, and whether a per-tile correction holds it flat.

    python -m benchmarks.dc_filter_study [--d 1024] [--v 32768] [--ns 2048 4096 ...] [--eps 0.125]
                                         [--device cpu]

An accuracy study in float32 (no kernels: torch only, CPU or GPU), on LM-like data
(``testing.make_inputs``). The plain loss's dz is formed in chunks of 1024 tokens; each (128-token,
256-entry) tile is kept or skipped by the kernels' filter rule (``kernels/backward.py``: skipped iff
every token's |dz| mass in it is < eps * (256 / V) * 2 g). Printed per N, as relative Frobenius
errors against the unfiltered gradient:
  * dE with the skipped tiles dropped (what the filtered path does; bounded per token);
  * dC with them dropped (``dc_filter="dropped"`` in the atomic kernel; not bounded relative to dC);
  * dC with them dropped and each skipped tile replaced by a rank-1 term: its column sums of dz
    times the mean of its 128 rows of E, ``colsum_t(dz)^T @ mean_t(E)``. The dropped terms of a
    rarely likely vocabulary row add up along the tokens' common direction (so that error grows with
    N, while dC's norm grows more slowly); the tile mean carries that direction, and what is left is
    the part of E that varies within a tile.
Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import Tensor

from cce_inductor.testing import make_inputs, regime_stats

TILE_N, TILE_V = 128, 256  # the buffered path's dz tile on the GPU
CHUNK = 1024  # tokens per pass (whole token tiles)


def filtered_gradients(e: Tensor, c: Tensor, targets: Tensor, eps: float) -> dict:
    """Exact, dropped and rank-1-corrected dE and dC of the mean loss (float32), and s, the fraction
    of tiles skipped. N a multiple of TILE_N and V of TILE_V."""
    n, d = e.shape
    v = c.shape[0]
    if n % TILE_N or v % TILE_V:
        raise ValueError(f"N must be a multiple of {TILE_N} and V of {TILE_V}, got N={n}, V={v}")
    e, c = e.float(), c.float()
    g = 1.0 / n  # grad of the mean loss per token
    vocab_tiles = v // TILE_V
    out = {key: torch.zeros(v, d, device=e.device) for key in ("dc", "dc_dropped", "dc_corrected")}
    de_err2 = de_norm2 = 0.0
    skipped = total = 0
    for n0 in range(0, n, CHUNK):
        rows = e[n0 : n0 + CHUNK]
        m = rows.shape[0]
        token_tiles = m // TILE_N
        dz = g * torch.softmax(rows @ c.T, dim=1)
        dz[torch.arange(m, device=e.device), targets[n0 : n0 + m]] -= g
        mass = dz.abs().view(m, vocab_tiles, TILE_V).sum(2)  # [m, vocab tiles]
        keep = ((mass >= eps * TILE_V / v * 2 * g) & (mass > 0)).view(token_tiles, TILE_N, vocab_tiles).any(1)
        skipped += int((~keep).sum())
        total += keep.numel()
        kept = dz * keep.repeat_interleave(TILE_N, 0).repeat_interleave(TILE_V, 1)
        dropped_colsums = (dz - kept).view(token_tiles, TILE_N, v).sum(1)  # [token tiles, V]
        tile_means = rows.view(token_tiles, TILE_N, d).mean(1)  # [token tiles, D]
        dc_kept = kept.T @ rows
        out["dc"] += dz.T @ rows
        out["dc_dropped"] += dc_kept
        out["dc_corrected"] += dc_kept + dropped_colsums.T @ tile_means
        de = dz @ c
        de_err2 += float((kept @ c - de).pow(2).sum())
        de_norm2 += float(de.pow(2).sum())
    ref = out["dc"].norm()
    return {
        "s": skipped / total,
        "de_dropped": math.sqrt(de_err2 / de_norm2),
        "dc_dropped": float((out["dc_dropped"] - out["dc"]).norm() / ref),
        "dc_corrected": float((out["dc_corrected"] - out["dc"]).norm() / ref),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--ns", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--eps", type=float, nargs="+", default=[2.0**-3])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for eps in args.eps:
        for n in args.ns:
            start = time.time()
            inp = make_inputs("lm", n, args.d, args.v, dtype=torch.float32, device=args.device, seed=0)
            stats = regime_stats(inp.e[:1024], inp.c)
            r = filtered_gradients(inp.e, inp.c, inp.targets, eps)
            print(f"N={n} D={args.d} V={args.v} lm (entropy {stats['mean_entropy_nats']:.2f} nats) eps={eps:g}: "
                  f"s {r['s']:.3f}  dE dropped {r['de_dropped']:.2e}  dC dropped {r['dc_dropped']:.2e}  "
                  f"dC dropped + rank-1 per tile {r['dc_corrected']:.2e}  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""How evenly the filtered GEMMs' persistent programs share their work, in each tile order (a CPU model).

    python -m benchmarks.schedule_study [--shape N,D,V] [--window 2048] [--chunk 6144] [--eps 0.125]
                                        [--programs 132] [--overhead 0 4]

CPU, float32 logits of one window of LM-like bf16 inputs (testing.make_inputs), the filter's rule on
the dz kernel's 128 x 256 tiles (kernels/backward.py: a tile is skipped when every token's |dz| mass
there is below 2 eps |tile| / V, the plain loss). Each chunk of the window is one launch of each
filtered GEMM over ``--programs`` persistent programs:

* dE: an output tile per (token tile, 256 columns of D), its time = 4 K steps per kept vocab tile of
  its row (plus ``--overhead`` steps a tile);
* dC: an output tile per (128 vocabulary rows, 256 columns of D), its time = 2 K steps per kept
  token tile of its vocab tile's column (plus the overhead).

Printed per GEMM, summed over the chunks: the longest program's time in each order, as a fraction of
the same launches with every tile kept (which the skipping would ideally bring down to the kept
fraction): index order (tile = pid, pid + programs, ...; the kernels' BALANCED_FILTERED_* = False),
snake order of the tiles sorted by work (the kernels' ``_balanced_position``), greedy longest-first
to the least-loaded program (LPT, dynamic; not built), and the even split (total / programs). For dE
also split-K (not built): each output tile's kept list cut in two halves, each half a tile of its own
(paying the overhead: its own epilogue), dealt in snake order ("halves snake") or LPT ("halves lpt").
Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
import heapq
import math

import torch

from cce_inductor.testing import make_inputs

BLOCK_N, BLOCK_V, BLOCK_D = 128, 256, 256


def keep_flags(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """The filter's keep flags, (token tiles, vocab tiles) bool, for the plain loss (w_i = 2 g_i)."""
    n, v = e.shape[0], c.shape[0]
    if n % BLOCK_N:
        raise ValueError(f"the window must be a multiple of {BLOCK_N} tokens, got {n}")
    z = e.float() @ c.float().T
    dz = torch.softmax(z, 1)
    del z
    dz[torch.arange(n), targets] -= 1.0
    tv = -(-v // BLOCK_V)
    mass = torch.nn.functional.pad(dz.abs_(), (0, tv * BLOCK_V - v)).view(n, tv, BLOCK_V).sum(-1)
    width = torch.full((tv,), float(BLOCK_V))
    width[-1] = v - (tv - 1) * BLOCK_V
    return ~(mass < 2 * eps * width / v).view(n // BLOCK_N, BLOCK_N, tv).all(1)


def longest_program(work: list[float], programs: int, order: str) -> float:
    """The longest program's total work when the tiles (``work``, in index order) are dealt by ``order``."""
    loads = [0.0] * programs
    if order == "index":
        for i, w in enumerate(work):
            loads[i % programs] += w
    elif order == "snake":
        ranked = sorted(work, reverse=True)
        for i, w in enumerate(ranked):
            wave, p = divmod(i, programs)
            width = min(programs, len(ranked) - wave * programs)
            loads[p if wave % 2 == 0 else width - 1 - p] += w
    elif order == "lpt":
        heap = [(0.0, p) for p in range(programs)]
        for w in sorted(work, reverse=True):
            load, p = heapq.heappop(heap)
            heapq.heappush(heap, (load + w, p))
        loads = [load for load, _ in heap]
    elif order == "even":
        return math.ceil(sum(work) / programs)
    else:
        raise ValueError(order)
    return max(loads)


ORDERS = ("index", "snake", "lpt", "even")
SPLIT_ORDERS = ("halves snake", "halves lpt")


def schedule_fractions(keep: torch.Tensor, dim: int, chunk: int, programs: int, overhead: float) -> dict:
    """{gemm: {order: longest program / that of the all-kept launches}}, summed over the chunks."""
    d_tiles = -(-dim // BLOCK_D)
    chunk_tiles = chunk // BLOCK_V
    totals = {gemm: dict.fromkeys(ORDERS + ("all kept",), 0.0) for gemm in ("dE", "dC")}
    totals["dE"].update(dict.fromkeys(SPLIT_ORDERS, 0.0))
    for k0 in range(0, keep.shape[1], chunk_tiles):
        part = keep[:, k0 : k0 + chunk_tiles]
        rows, cols = part.shape
        per_gemm = {
            "dE": ([4 * int(x) + overhead for x in part.sum(1) for _ in range(d_tiles)], 4 * cols + overhead),
            "dC": ([2 * int(x) + overhead for x in part.sum(0) for _ in range(2 * d_tiles)], 2 * rows + overhead),
        }
        for gemm, (work, full) in per_gemm.items():
            for order in ORDERS:
                totals[gemm][order] += longest_program(work, programs, order)
            totals[gemm]["all kept"] += longest_program([full] * len(work), programs, "index")
        halves = [4 * h + overhead for x in part.sum(1) for _ in range(d_tiles) for h in ((int(x) + 1) // 2, int(x) // 2)]
        for order in SPLIT_ORDERS:
            totals["dE"][order] += longest_program(halves, programs, order.split()[1])
    return {gemm: {order: t[order] / t["all kept"] for order in t if order != "all kept"} for gemm, t in totals.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8192,4096,128256", help="N,D,V of the inputs")
    parser.add_argument("--window", type=int, default=2048, help="tokens of the window (the first ones)")
    parser.add_argument("--chunk", type=int, default=6144, help="vocabulary entries per chunk")
    parser.add_argument("--eps", type=float, default=2.0**-3)
    parser.add_argument("--programs", type=int, default=132)
    parser.add_argument("--overhead", nargs="+", type=float, default=[0.0, 4.0], help="K steps per tile")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n, d, v = map(int, args.shape.split(","))
    x = make_inputs("lm", n, d, v, dtype=torch.bfloat16, seed=args.seed)
    keep = keep_flags(x.e[: args.window], x.c, x.targets[: args.window], args.eps)
    print(f"N={n} D={d} V={v} LM-like, eps {args.eps:g}: window {args.window} x chunks of {args.chunk}, "
          f"{float(keep.float().mean()):.3f} of {tuple(keep.shape)} tiles kept, {args.programs} programs", flush=True)
    for overhead in args.overhead:
        for gemm, fractions in schedule_fractions(keep, d, args.chunk, args.programs, overhead).items():
            print(f"  {gemm}, {overhead:g} K steps a tile: longest program / all kept: "
                  + ", ".join(f"{order} {f:.3f}" for order, f in fractions.items()), flush=True)


if __name__ == "__main__":
    main()

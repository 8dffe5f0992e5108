"""Which per-tile statistics saved in the forward would let the backward skip a tile's recompute.

    python -m benchmarks.skip_bound_study [--shapes N,D,V ...] [--eps 0.125] [--seed 0]

CPU, float32 logits of LM-like bf16 inputs (testing.make_inputs), the kernels' 128 x 256 tiles and
the plain loss (w_i = 2 g_i). The backward's filter skips a tile when every token's |dz| mass there
is below 2 eps |tile| / V (kernels/backward.py). The dz kernel knows that mass only after recomputing
the tile; to skip the recompute itself, the backward would have to bound it from statistics the
forward saved, with the forward's lse known only at the end of the forward. Printed, as fractions of
tiles skipped (a tile holding a token's target is never skipped by a bound):

* rule: the filter's own decision (what the dz kernel skips now, after the recompute);
* tile max: one number per tile, its largest logit M; skip where M - min_i lse_i < log(eps / V)
  (every entry's p below the rule's allotment per entry);
* tile log-mass: one number per tile, max_i logsumexp_j z_ij over its tokens; skip where that minus
  min_i lse_i < log(2 eps |tile| / V);
* token log-mass: one number per (token, tile) -- N x V / 256 of them (8 MB at 8192 x 128256 in
  one byte each) -- against the token's own lse: the rule itself for tiles without a target.

Prints only; numbers worth keeping go to docs/PERF_NOTES.md."""

from __future__ import annotations

import argparse
import math

import torch

from cce_inductor.testing import make_inputs

BLOCK_N, BLOCK_V = 128, 256


def skip_fractions(e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, eps: float) -> dict[str, float]:
    """The fractions of (BLOCK_N x BLOCK_V) tiles skipped by the rule and by each bound (module doc)."""
    n, v = e.shape[0], c.shape[0]
    if n % BLOCK_N:
        raise ValueError(f"N must be a multiple of {BLOCK_N}, got {n}")
    z = e.float() @ c.float().T
    lse = torch.logsumexp(z, 1)
    tn, tv = n // BLOCK_N, -(-v // BLOCK_V)
    tiles = torch.nn.functional.pad(z, (0, tv * BLOCK_V - v), value=-math.inf).view(tn, BLOCK_N, tv, BLOCK_V)
    del z
    width = torch.full((tv,), float(BLOCK_V))
    width[-1] = v - (tv - 1) * BLOCK_V
    token_log_mass = torch.logsumexp(tiles, -1)  # (tn, BLOCK_N, tv)
    rel_mass = torch.exp(token_log_mass - lse.view(tn, BLOCK_N, 1))
    has_target = torch.zeros(tn, BLOCK_N, tv, dtype=torch.bool)
    has_target.view(n, tv)[torch.arange(n), targets // BLOCK_V] = True
    p_target = torch.exp(e.float().mul(c.float()[targets]).sum(1) - lse).view(tn, BLOCK_N, 1)
    abs_dz = torch.where(has_target, rel_mass - 2 * p_target + 1, rel_mass)  # sum_j |p - onehot| per token
    allotment = 2 * eps * width / v
    rule = (abs_dz < allotment).all(1)
    target_tile = has_target.any(1)
    min_lse = lse.view(tn, BLOCK_N).min(1).values.unsqueeze(1)
    tile_max = tiles.amax(dim=(1, 3))
    by_max = (tile_max - min_lse < math.log(eps / v)) & ~target_tile
    by_tile_mass = (token_log_mass.amax(1) - min_lse < torch.log(allotment)) & ~target_tile
    by_token_mass = (rel_mass < allotment).all(1) & ~target_tile
    return {name: float(mask.float().mean()) for name, mask in
            (("rule", rule), ("tile max", by_max), ("tile log-mass", by_tile_mass), ("token log-mass", by_token_mass))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1024,4096,128256", "1024,2304,256000"], help="N,D,V each")
    parser.add_argument("--eps", type=float, default=2.0**-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for shape in args.shapes:
        n, d, v = map(int, shape.split(","))
        x = make_inputs("lm", n, d, v, dtype=torch.bfloat16, seed=args.seed)
        fractions = skip_fractions(x.e, x.c, x.targets, args.eps)
        print(f"N={n} D={d} V={v} LM-like, eps {args.eps:g}: tiles skipped, "
              + ", ".join(f"{name} {s:.3f}" for name, s in fractions.items()), flush=True)


if __name__ == "__main__":
    main()

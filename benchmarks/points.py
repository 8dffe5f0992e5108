"""The (shape, data regime) points that the variant scripts walk, from their command lines.

    parser = argparse.ArgumentParser(...); add_point_arguments(parser)
    for n, d, v, regime, inputs in points(parser.parse_args(argv)): ...

Defaults: the issue's two goal shapes, LM-like data first; inputs from ``testing.make_inputs`` on
the GPU (bf16, seed 0).
"""

from __future__ import annotations

import argparse
from typing import Iterator

from cce_inductor.testing import make_inputs

GOAL_SHAPES = ("8192,2304,256000", "8192,4096,128256")


def add_point_arguments(parser: argparse.ArgumentParser, regimes=("lm", "uniform")) -> None:
    parser.add_argument("--shapes", nargs="+", default=list(GOAL_SHAPES), help="N,D,V each")
    parser.add_argument("--regimes", nargs="+", default=list(regimes), choices=("lm", "uniform"))


def points(args: argparse.Namespace) -> Iterator[tuple[int, int, int, str, object]]:
    """(N, D, V, regime, inputs) for every shape x regime of the command line."""
    for shape in args.shapes:
        n, d, v = map(int, shape.split(","))
        for regime in args.regimes:
            yield n, d, v, regime, make_inputs(regime, n, d, v, device="cuda", seed=0)

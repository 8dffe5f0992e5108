"""Host time of the buffered backward: how long the CPU takes to enqueue its launches, against the GPU.

    python -m benchmarks.host_overhead [--shapes N,D,V ...] [--calls 30]

bf16, LM-like inputs. For each shape and for the dz kernel's TMA loads on and off: the CPU time to
enqueue one backward (no sync inside) and its wall time with the GPU finishing it (medians, each
call on an idle GPU), per call and per (window, chunk) iteration (one dz launch and two cuBLAS GEMMs
each). Where the enqueue time is close to the wall time, the GPU waits for the host. Then a cProfile of the
enqueue at the first shape (TMA on), by own time, naming the Python functions that cost the most.
Prints only; numbers worth keeping go to docs/PERF_NOTES.md with the device.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import statistics
import time
from unittest import mock

import torch

from cce_inductor.kernels import backward, lce_backward, lce_forward
from cce_inductor.kernels.common import buffered_config
from cce_inductor.testing import make_inputs

DEFAULT_SHAPES = ["256,64,32768", "8192,512,32768", "8192,2304,256000"]


def _timed(fn, calls: int) -> tuple[float, float]:
    """Medians over calls of (enqueue ms, wall ms with the GPU done) of one call, each call starting
    on an idle GPU: one call's launches (3 per iteration, 567 at Gemma's shape) stay below the
    driver's queue depth (about 1024), so the enqueue time is the host's own."""
    fn()
    enqueue, wall = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        enqueued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        enqueue.append(enqueued - start)
        wall.append(done - start)
    return 1e3 * statistics.median(enqueue), 1e3 * statistics.median(wall)


def measure(n: int, d: int, v: int, calls: int, profile: bool) -> None:
    inp = make_inputs("lm", n, d, v, device="cuda", seed=0)
    e, c, y = inp.e, inp.c, inp.targets
    _, lse = lce_forward(e, c, None, y, -100, 0.0, 0.0)
    g = torch.full((n,), 1.0 / n, device="cuda")
    zero = torch.zeros_like(g)
    rows, cols = backward.buffered_window(e, v)
    iterations = -(-n // rows) * -(-v // cols)

    def run():
        lce_backward(e, c, None, y, lse, g, zero, -100, 0.0, 0.0, False, True, True, False, buffered=True)

    for tma in (True, False):
        with mock.patch.object(backward, "buffered_config", lambda t: dataclasses.replace(buffered_config(t), tma=tma)):
            enqueue_ms, wall_ms = _timed(run, calls)
            print(f"N={n} D={d} V={v} ({iterations} iterations) TMA {'on ' if tma else 'off'}: enqueue "
                  f"{enqueue_ms:.3f} ms ({1e3 * enqueue_ms / iterations:.1f} us/iteration), wall {wall_ms:.3f} ms "
                  f"({1e3 * wall_ms / iterations:.1f} us/iteration)", flush=True)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            run()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(f"cProfile of {calls} calls x {iterations} iterations (TMA on), by own time:\n{text.getvalue()}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="N,D,V triples")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args(argv)
    for i, shape in enumerate(args.shapes):
        measure(*map(int, shape.split(",")), calls=args.calls, profile=i == 0)


if __name__ == "__main__":
    main()

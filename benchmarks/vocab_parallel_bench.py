"""One rank's work in vocabulary-parallel CCE, at the anchor shapes split over tp ranks.

    python -m benchmarks.vocab_parallel_bench --out vp.json          # GPU
    python -m benchmarks.vocab_parallel_bench --smoke --out s.json   # CPU, tiny shapes (tests)

For each shape and split tp (1 = the whole vocabulary), on one GPU: the rows [0, V/tp) of the
classifier, the same bfloat16 LM-like inputs (``cce_inductor.testing``); timed with
``triton.testing.do_bench(return_mode="median")``:

* ``T``: the cuBLAS logits GEMM of the shard, ``e @ c_shard.T``, alone;
* ``fwd``: the shard's statistics (``vocab_parallel.shard_statistics``: the single-device forward
  kernel over the shard, then the target logit) and their combination;
* ``fwdbwd``: that and the shard's backward (``vocab_parallel.shard_backward``: dE's share, dC, from
  the combined log-sum-exp);
* ``single``: ``linear_cross_entropy`` over the whole vocabulary, forward + backward, for scale.

The collectives are not timed (one process): their volume per rank is printed instead (the
forward's all-gather of 3 x N statistics, the backward's all-reduce of dE, N x D). Memory: the peak
above what was allocated before one forward + backward of the shard. Results go to JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, dataclass

import torch

from cce_inductor import linear_cross_entropy
from cce_inductor import vocab_parallel as vp
from cce_inductor.testing import make_inputs

from .timing import median_ms


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    d: int
    v: int


SHAPES = (Shape("gemma2-2b", 8192, 2304, 256000), Shape("llama3-8b", 8192, 4096, 128256))
SMOKE_SHAPES = (Shape("tiny", 64, 32, 501),)
SPLITS = (1, 2, 8)


def _timer(device: torch.device):
    return lambda fn: median_ms(fn, device.type)


def _shard_step(e, c, y, impl, backward: bool):
    """One rank's forward (and backward) with the vocabulary in one shard of this process: its
    statistics combined as a group of one would (the collective itself is not run)."""
    stats = vp.shard_statistics(e, c, y, None, vocab_start=0, ignore_index=-100, softcap=0.0,
                                label_smoothing=0.0, impl=impl)
    loss, lse = vp.combine(stats[None], y, vocab_size=c.shape[0], ignore_index=-100, label_smoothing=0.0)
    if not backward:
        return loss
    g = torch.full_like(lse, 1.0 / y.numel())
    return vp.shard_backward(e, c, y, None, lse, g, torch.zeros_like(lse), vocab_start=0, vocab_size=c.shape[0],
                             ignore_index=-100, softcap=0.0, label_smoothing=0.0, impl=impl, filter_grad=False,
                             needs_e=True, needs_c=True, needs_bias=False)


def _peak_bytes(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def run(shapes, splits, device: torch.device, dtype: torch.dtype) -> list[dict]:
    impl = "triton" if device.type == "cuda" else "torch"
    timed = _timer(device)
    rows = []
    for shape in shapes:
        inputs = make_inputs("lm", shape.n, shape.d, shape.v, dtype=dtype, device=device)
        e, c_full, y = inputs.e, inputs.c, inputs.targets
        ec, cc = e.detach().requires_grad_(), c_full.detach().requires_grad_()

        def single():
            loss = linear_cross_entropy(ec, cc, y, impl=impl)
            loss.backward()
            ec.grad = cc.grad = None

        single_ms = timed(single)
        for tp in splits:
            rows_here = -(-shape.v // tp)
            c = c_full[:rows_here].contiguous()
            t_ms = timed(lambda: e @ c.T)
            fwd_ms = timed(lambda: _shard_step(e, c, y, impl, backward=False))
            fwdbwd_ms = timed(lambda: _shard_step(e, c, y, impl, backward=True))
            row = dict(
                shape=shape.name, n=shape.n, d=shape.d, v=shape.v, tp=tp, v_shard=rows_here, dtype=str(dtype),
                t_ms=t_ms, fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms, fwd_t=fwd_ms / t_ms, fwdbwd_t=fwdbwd_ms / t_ms,
                single_fwdbwd_ms=single_ms,
                peak_bytes=_peak_bytes(lambda: _shard_step(e, c, y, impl, backward=True), device),
                logits_bytes=shape.n * rows_here * e.element_size(),
                gather_bytes_per_rank=3 * shape.n * 4 * tp,  # float32 statistics of every rank
                allreduce_bytes=shape.n * shape.d * e.element_size() if tp > 1 else 0,
            )
            rows.append(row)
            _print_row(row)
    return rows


def _print_row(r: dict) -> None:
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f} MiB"
    print(f"{r['shape']:>10} tp={r['tp']:<2} V/tp={r['v_shard']:<7} T {r['t_ms']:.2f} ms | fwd {r['fwd_ms']:.2f} ms "
          f"({r['fwd_t']:.2f} T) | fwd+bwd {r['fwdbwd_ms']:.2f} ms ({r['fwdbwd_t']:.2f} T) | whole-V op "
          f"{r['single_fwdbwd_ms']:.2f} ms | peak {mib(r['peak_bytes'])} (shard logits {mib(r['logits_bytes'])}) | "
          f"comm/rank: gather {mib(r['gather_bytes_per_rank'])}, dE all-reduce {mib(r['allreduce_bytes'])}",
          flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="vocab_parallel_bench.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--splits", type=int, nargs="+", default=list(SPLITS))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    dtype = getattr(torch, args.dtype)
    rows = run(SMOKE_SHAPES if args.smoke else SHAPES, args.splits, device, dtype)
    data = {
        "meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "command": " ".join(sys.argv)},
        "config": {"smoke": args.smoke, "splits": args.splits, "dtype": args.dtype,
                   "shapes": [asdict(s) for s in (SMOKE_SHAPES if args.smoke else SHAPES)]},
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    return data


if __name__ == "__main__":
    main()

"""What a logit softcap (Gemma 2's final_logit_softcapping) costs the kernels, with TMA loads on and off.

    python -m benchmarks.softcap_cost [--shape N,D,V] [--softcap 30]

bf16, LM-like inputs. Median times (``do_bench``) of the forward and the exact backward without and
with the softcap, each with the tiles loaded through TMA descriptors and through pointers (and with
TMA, the forward's tile loop not flattened), in units of T = the cuBLAS logits GEMM measured first. Prints only; numbers worth keeping go to
docs/PERF_NOTES.md with the device.
"""

from __future__ import annotations

import argparse
import dataclasses
from unittest import mock

import torch
from triton.testing import do_bench

from cce_inductor.kernels import backward, forward, lce_backward, lce_forward
from cce_inductor.kernels.common import buffered_config, forward_config
from cce_inductor.testing import make_inputs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8192,2304,256000", help="N,D,V")
    parser.add_argument("--softcap", type=float, default=30.0)
    args = parser.parse_args(argv)
    n, d, v = map(int, args.shape.split(","))
    inp = make_inputs("lm", n, d, v, device="cuda", seed=0)
    e, c, y = inp.e, inp.c, inp.targets
    g = torch.full((n,), 1.0 / n, device="cuda")
    zero = torch.zeros_like(g)
    gemm_ms = do_bench(lambda: e @ c.T)
    print(f"N={n} D={d} V={v}: T (e @ c.T) {gemm_ms:.2f} ms", flush=True)
    for tma in (True, False):
        forward_cfg = lambda t, tma=tma: dataclasses.replace(forward_config(t), tma=tma)  # noqa: E731
        buffered_cfg = lambda t, tma=tma: dataclasses.replace(buffered_config(t), tma=tma)  # noqa: E731
        with mock.patch.object(forward, "forward_config", forward_cfg), \
                mock.patch.object(backward, "buffered_config", buffered_cfg):
            for softcap in (0.0, args.softcap):
                _, lse = lce_forward(e, c, None, y, -100, softcap, 0.0)
                fwd = do_bench(lambda: lce_forward(e, c, None, y, -100, softcap, 0.0))
                bwd = do_bench(lambda: lce_backward(e, c, None, y, lse, g, zero, -100, softcap, 0.0,
                                                    False, True, True, False, buffered=True))
                print(f"  TMA {'on ' if tma else 'off'} softcap {softcap:4.1f}: forward {fwd:.2f} ms "
                      f"({fwd / gemm_ms:.2f} T), backward {bwd:.2f} ms ({bwd / gemm_ms:.2f} T)", flush=True)
                if tma:  # the forward's tile loop not flattened (forward.FLATTEN_FORWARD)
                    with mock.patch.object(forward, "FLATTEN_FORWARD", False):
                        fwd = do_bench(lambda: lce_forward(e, c, None, y, -100, softcap, 0.0))
                    print(f"  TMA on  softcap {softcap:4.1f}, forward not flattened: forward {fwd:.2f} ms "
                          f"({fwd / gemm_ms:.2f} T)", flush=True)


if __name__ == "__main__":
    main()

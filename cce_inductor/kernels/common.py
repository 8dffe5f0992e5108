"""What the forward and backward launchers share: tile configs, input preparation, small jit helpers.

Tile configs are fixed per (device kind, dtype) -- no autotuning at compile time (Inductor compiles
per shape; autotuning would add seconds of latency to every new shape). Under the Triton
interpreter (CPU tensors, TRITON_INTERPRET=1) the tiles are tiny, so that small test shapes still
span several tiles in every dimension and the masked edges are exercised.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile
    block_d: int  # reduction step over D (both the logit GEMM and the gradient GEMMs)
    num_warps: int
    num_stages: int
    group_n: int = 8  # backward: token tiles that sweep the vocabulary together (L2 reuse)


# Hopper-sized tiles for 16-bit inputs: the forward is one GEMM with a cheap epilogue (128 x 256
# accumulator, 8 warps, 3 stages of (128 + 256) x 64 x 2 B = 144 KB of shared memory; 4 stages and
# 128 x 128 / 256 x 128 tiles measured within noise, 1.47-1.67 T at 8192 x 2304 x 256000); the backward
# holds the logit tile, its 16-bit gradient and two gradient-GEMM tiles at once, so it uses 128 x 128.
_GPU_FORWARD_16 = TileConfig(block_n=128, block_v=256, block_d=64, num_warps=8, num_stages=3)
_GPU_BACKWARD_16 = TileConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
# float32 inputs run the dots in IEEE float32 (no tf32): FMA-bound, smaller tiles, less shared memory.
_GPU_FORWARD_32 = TileConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=2)
_GPU_BACKWARD_32 = TileConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=2)
# Interpreter: tiny tiles (tl.dot accepts any size there), one "SM".
_INTERPRETER = TileConfig(block_n=16, block_v=16, block_d=16, num_warps=1, num_stages=1, group_n=2)


def forward_config(e: Tensor) -> TileConfig:
    if e.device.type != "cuda":
        return _INTERPRETER
    return _GPU_FORWARD_32 if e.dtype == torch.float32 else _GPU_FORWARD_16


def buffered_config(e: Tensor) -> TileConfig:
    """The buffered backward's recompute kernel: the forward's GEMM with a dz epilogue that stores
    the tile (no gradient GEMMs in the kernel), so the forward's larger tile fits."""
    return forward_config(e)


def backward_config(e: Tensor) -> TileConfig:
    if e.device.type != "cuda":
        return _INTERPRETER
    return _GPU_BACKWARD_32 if e.dtype == torch.float32 else _GPU_BACKWARD_16


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: exact IEEE products (~1e-6 relative), not tf32 (~3e-4)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_upcast(t: Tensor) -> bool:
    """The Triton interpreter multiplies bfloat16 blocks as their raw uint16 bits: there the
    operands are widened to float32 first (exact, and the same float32-accumulated products)."""
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def prepare_inputs(e: Tensor, c: Tensor, bias: Tensor | None, targets: Tensor):
    """Validate shapes and dtypes; return e, c with unit stride along D (rows may be strided),
    e and c in one dtype, bias contiguous (any float dtype), targets contiguous int64."""
    if e.dim() != 2 or c.dim() != 2 or e.shape[1] != c.shape[1]:
        raise ValueError(f"expected e (N, D) and c (V, D), got {tuple(e.shape)} and {tuple(c.shape)}")
    if c.shape[0] == 0:
        raise ValueError("the vocabulary is empty (c has 0 rows)")
    if targets.shape != (e.shape[0],):
        raise ValueError(f"targets must have shape ({e.shape[0]},), got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (c.shape[0],):
        raise ValueError(f"bias must have shape ({c.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("e", e), ("c", c), ("bias", bias)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    devices = {t.device for t in (e, c, bias, targets) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if e.dtype != c.dtype:  # tl.dot needs one operand dtype
        common = torch.promote_types(e.dtype, c.dtype)
        e, c = e.to(common), c.to(common)
    if e.shape[1] > 1 and e.stride(1) != 1:
        e = e.contiguous()
    if c.shape[1] > 1 and c.stride(1) != 1:
        c = c.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return e, c, bias, targets.contiguous().long()


def as_f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation (acc may be None)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def softcap_tanh(x, softcap):
    """tanh(x / softcap) from one exp2; absolute error ~1e-7 (what the logits need)."""
    a = tl.exp2(-2.8853900817779268 * tl.abs(x / softcap))  # exp(-2|x| / cap)
    t = (1.0 - a) / (1.0 + a)
    return tl.where(x < 0, -t, t)

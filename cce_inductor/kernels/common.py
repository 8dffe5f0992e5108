"""What the forward and backward launchers share: tile configs, input preparation, small jit helpers.

Tile configs are fixed per (device kind, dtype) -- no autotuning at compile time (Inductor compiles
per shape; autotuning would add seconds of latency to every new shape). Under the Triton
interpreter (CPU tensors, TRITON_INTERPRET=1) the tiles are tiny, so that small test shapes still
span several tiles in every dimension and the masked edges are exercised.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # host-side TMA descriptors (triton >= 3.4); older triton loads tiles through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed triton
    TensorDescriptor = None

# tl.range(..., flatten=True): the loop over tiles folded into the loop over D by the pipeliner, so the
# next tile's loads are in flight during this tile's epilogue (triton >= 3.3).
HAS_FLATTEN = "flatten" in inspect.signature(tl.range.__init__).parameters

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile
    block_d: int  # reduction step over D (both the logit GEMM and the gradient GEMMs)
    num_warps: int
    num_stages: int
    group_n: int = 8  # token tiles that sweep the vocabulary together (L2 reuse), in every kernel
    tma: bool = False  # load E and C tiles through TMA descriptors where the GPU and the inputs allow


# Hopper-sized tiles for 16-bit inputs: the forward is one GEMM with a cheap epilogue (128 x 256
# accumulator, 8 warps, 3 stages of (128 + 256) x 64 x 2 B = 144 KB of shared memory, plus 64 KB for
# the buffered backward's TMA store of its dz tile); TMA loads with the tile loop flattened measured
# fastest of the variants tried (pointer loads, 4 stages, 128 x 128 tiles: docs/PERF_NOTES.md).
# The atomic backward holds the logit tile, its 16-bit gradient and two gradient-GEMM tiles at
# once, so it uses 128 x 128 (and pointer loads: its vocabulary may be walked through an index).
# The forward's programs run in groups of group_n token tiles x every vocabulary split (forward.py).
# Groups of 16 measured fastest against 8, 32 and all 64 token tiles of the goal shapes (under which
# a wave reads all of E, past the L2 at D = 4096): docs/PERF_NOTES.md.
_GPU_FORWARD_16 = TileConfig(block_n=128, block_v=256, block_d=64, num_warps=8, num_stages=3, group_n=16, tma=True)
_GPU_BACKWARD_16 = TileConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
# float32 inputs run the dots in IEEE float32 (no tf32): FMA-bound, smaller tiles, less shared memory;
# their forward runs in the default groups of 8 token tiles (not timed: the grouping is for L2 reuse,
# which an FMA-bound kernel needs less).
_GPU_FORWARD_32 = TileConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=2)
_GPU_BACKWARD_32 = TileConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=2)
# Interpreter: tiny tiles (tl.dot accepts any size there), one "SM"; TMA descriptors as on Hopper
# (the interpreter emulates them), so that CI runs the path the GPU runs.
_INTERPRETER = TileConfig(block_n=16, block_v=16, block_d=16, num_warps=1, num_stages=1, group_n=2, tma=True)


def forward_config(e: Tensor) -> TileConfig:
    if e.device.type != "cuda":
        return _INTERPRETER
    return _GPU_FORWARD_32 if e.dtype == torch.float32 else _GPU_FORWARD_16


def buffered_config(e: Tensor) -> TileConfig:
    """The buffered backward's recompute kernel: the forward's GEMM with a dz epilogue that stores
    the tile (no gradient GEMMs in the kernel), so the forward's larger tile fits. Its persistent
    programs sweep a chunk's vocab tiles in groups of 8 token tiles, as measured before the forward's
    grouping changed (a window of 2048 tokens is 16 token tiles)."""
    cfg = forward_config(e)
    return cfg if e.device.type != "cuda" else dataclasses.replace(cfg, group_n=8)


# The filtered buffered backward's dE GEMM (dz @ C over the kept vocabulary tiles): block_n tokens (the
# dz kernel's tile) x block_d columns of D per output tile, block_v vocabulary entries per K step.
# 128 x 256 output tiles, 8 warps, 3 stages measured faster than 128 x 128 with 4 stages at both goal
# shapes on an H200 (docs/PERF_NOTES.md).
_GPU_FILTERED_DE_16 = TileConfig(block_n=128, block_v=64, block_d=256, num_warps=8, num_stages=3, tma=True)


def filtered_de_config(e: Tensor) -> TileConfig:
    if e.device.type != "cuda":
        return _INTERPRETER
    return _GPU_FILTERED_DE_16


# The filtered buffered backward's dC GEMM (dz^T @ E over the kept token tiles, plus the skipped tiles'
# rank-1 stand-ins): block_v vocabulary rows (half the dz kernel's vocab tile) x block_d columns of D
# per output tile, block_n tokens per K step; the dE GEMM's shape, transposed. As fast as 256 x 128
# and faster than 128 x 128 at the goal points on an H200 (docs/PERF_NOTES.md).
_GPU_FILTERED_DC_16 = TileConfig(block_n=64, block_v=128, block_d=256, num_warps=8, num_stages=3, tma=True)


def filtered_dc_config(e: Tensor) -> TileConfig:
    if e.device.type != "cuda":
        return _INTERPRETER
    return _GPU_FILTERED_DC_16


def backward_config(e: Tensor) -> TileConfig:
    if e.device.type != "cuda":
        return _INTERPRETER
    return _GPU_BACKWARD_32 if e.dtype == torch.float32 else _GPU_BACKWARD_16


def tma_descriptor(t: Tensor, block_shape: list[int], cfg: TileConfig, accumulator: bool = False):
    """A host-side TMA descriptor of the 2-D tensor ``t`` (tiles of ``block_shape``, zero-filled
    outside ``t``), or None where the tiles go through pointers instead: the config does not ask for
    TMA, triton has no host descriptors, the GPU is older than Hopper, the dtype is float32 (its
    configs use pointer loads and IEEE dots; ``accumulator``: a float32 tensor that an epilogue
    reads and writes, which may), or the alignment TMA needs (16-byte base and row stride, unit last
    stride, at least 16 bytes of a tile's row) does not hold -- e.g. rows of an odd length D."""
    if not cfg.tma or TensorDescriptor is None or t.dim() != 2 or 0 in t.shape:
        return None
    if t.dtype == torch.float32 and not accumulator:
        return None
    if t.device.type == "cuda" and _capability(_device_index(t.device)) < 9:
        return None
    size = t.element_size()
    if t.stride(1) != 1 or (t.stride(0) * size) % 16 or t.data_ptr() % 16 or block_shape[-1] * size < 16:
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block_shape))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: exact IEEE products (~1e-6 relative), not tf32 (~3e-4)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_upcast(t: Tensor) -> bool:
    """The Triton interpreter multiplies bfloat16 blocks as their raw uint16 bits: there the
    operands are widened to float32 first (exact, and the same float32-accumulated products)."""
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sm_count(_device_index(device))


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
def logit_tile(
    E, C, E_desc, C_desc, n0, v0, offs_n, ids_v, mask_n, mask_v, D, stride_en, stride_cv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """The float32 logit tile E[n] @ C[v]^T, [BLOCK_N, BLOCK_V], accumulated over D in BLOCK_D steps;
    the forward and both backward kernels compute it here. TMA: tiles at rows n0 of E and v0 of C
    through the descriptors (zero outside the tensors); else through pointers at rows offs_n of E
    and ids_v of C (int64; ids_v may be any vocabulary ids), masked by mask_n / mask_v (and D)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if TMA:
        for d0 in range(0, D, BLOCK_D):
            acc = dot(E_desc.load([n0, d0]), C_desc.load([v0, d0]).T, acc, DOT_PRECISION, UPCAST)
    else:
        offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        e_ptrs = E + offs_n[:, None] * stride_en + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        c_ptrs = C + ids_v[None, :] * stride_cv + offs_d[:, None]  # [BLOCK_D, BLOCK_V]
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D:
                e_blk = tl.load(e_ptrs, mask=mask_n[:, None], other=0.0)
                c_blk = tl.load(c_ptrs, mask=mask_v[None, :], other=0.0)
            else:
                mask_d = (d0 + offs_d) < D
                e_blk = tl.load(e_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                c_blk = tl.load(c_ptrs, mask=mask_v[None, :] & mask_d[:, None], other=0.0)
            acc = dot(e_blk, c_blk, acc, DOT_PRECISION, UPCAST)
            e_ptrs += BLOCK_D
            c_ptrs += BLOCK_D
    return acc


@triton.jit
def capped_logits(z, Bias, ids_v, mask_v, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(z + bias[v], then cap * tanh(z / cap)) and the tanh (for the backward's derivative; 0 when
    there is no softcap)."""
    if HAS_BIAS:
        z += tl.load(Bias + ids_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    t = 0.0
    if HAS_SOFTCAP:
        t = softcap_tanh(z, softcap)
        z = softcap * t
    return z, t


@triton.jit
def softcap_tanh(x, softcap):
    """tanh(x / softcap) from one exp2; absolute error ~1e-7 (what the logits need)."""
    a = tl.exp2(-2.8853900817779268 * tl.abs(x / softcap))  # exp(-2|x| / cap)
    t = (1.0 - a) / (1.0 + a)
    return tl.where(x < 0, -t, t)

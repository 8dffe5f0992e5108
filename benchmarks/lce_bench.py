"""Side-by-side benchmark of the linear cross-entropy: this project, torch, and its peers.

    python -m benchmarks.lce_bench --out bench.json               # GPU, the full run
    python -m benchmarks.plot bench.json --out bench.png          # time and memory against N
    python -m benchmarks.lce_bench --smoke --out smoke.json       # CPU, tiny shapes (tests)

In one process, on the same inputs, for every (shape, data regime, method): forward, backward and
forward+backward median times, as milliseconds and as ratios to T (the cuBLAS logits GEMM ``e @ c.T``
alone, measured in the same run); the peak memory above the inputs; the error of dE and dC against
a reference computed from the same bf16 inputs upcast to float32 (the package's reference path,
which accumulates in float64), next to the plain torch bf16 computation's error; the statistics of
the data regime; the fraction s of backward tiles our filter skips. Then a sweep over N at one
shape, each method up to the largest N that fits (or until its calls get too slow for the time
budget). Results go to JSON (with device, versions, date and the command line), rewritten after
every point so that a run cut short leaves its data; a markdown table is printed last.

Timing: after every method's checks at a point (first call, memory, errors), the methods are timed
in interleaved rounds (``rounds``, 3; one in the sweep): each method once per round, the order
reversed every other round, and each figure is the median over the rounds (the rounds' own figures
are kept in the JSON). Under these GEMMs an H200 runs at its power cap, with the SM clock moving
(1.5-2.0 GHz), and one do_bench of a 60 ms call is the median of a few calls: the same call timed
twice in one process came out 8% apart. In a round (GPU), forward and forward+backward with
``triton.testing.do_bench(return_mode="median")`` after a warm-up call; calls slower than
``--slow-call-ms`` get a plain CUDA-event loop of ``min_reps`` calls instead (do_bench would spend
seven calls estimating). The backward alone is timed
with CUDA events around ``loss.backward()`` after an untimed forward, one fresh forward per call
(compiled graphs and several peers forbid ``retain_graph``), with the L2 cache flushed before each
call as do_bench does. Memory: ``max_memory_allocated`` above ``memory_allocated`` before the call,
read after the forward and after the backward of one call. The CPU smoke mode times with
``time.perf_counter`` and records no memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import glob
import hashlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from cce_inductor import filter_choice
from cce_inductor.testing import REGIMES, make_inputs, regime_stats

from . import table
from .methods import METHODS, SMOKE_EXCLUDED, Env, Method, Prepared, Unavailable, peer_versions

# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Shape:
    name: str
    n: int  # tokens
    d: int  # hidden size
    v: int  # vocabulary

    def with_n(self, n: int) -> "Shape":
        return dataclasses.replace(self, n=n)


SHAPES = (
    Shape("gemma2-2b", 8192, 2304, 256000),
    Shape("llama3-8b", 8192, 4096, 128256),
    Shape("mistral-7b", 16384, 4096, 32768),
)
SMOKE_SHAPES = (
    Shape("tiny-a", 64, 32, 501),
    Shape("tiny-b", 96, 48, 1000),
)
SWEEP_NS = (4096, 8192, 16384, 32768, 65536, 131072)
SMOKE_SWEEP_NS = (32, 64, 128)
PASSES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class BenchConfig:
    shapes: tuple[Shape, ...] = SHAPES
    regimes: tuple[str, ...] = REGIMES
    methods: tuple[str, ...] = tuple(METHODS)
    sweep: bool = True
    sweep_shape: Shape = SHAPES[0]  # D and V of the sweep; N comes from sweep_ns
    sweep_ns: tuple[int, ...] = SWEEP_NS
    sweep_regimes: tuple[str, ...] = ("lm",)
    sweep_passes: tuple[str, ...] = ("fwdbwd",)
    device: str = "cuda"
    dtype: str = "bfloat16"
    seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5  # timed calls at least, whatever rep_ms says
    max_reps: int = 20  # of the backward event loop
    slow_call_ms: float = 250.0  # above this, CUDA-event loop of min_reps calls instead of do_bench
    sweep_min_reps: int = 3  # timed calls at least in the sweep
    rounds: int = 3  # timing rounds per point: every method once per round (see _Runner.run_point)
    sweep_rounds: int = 1
    sweep_max_call_s: float = 2.0  # the sweep stops a method whose predicted fwd+bwd call exceeds this
    time_budget_s: float = 360.0  # no sweep point starts after this many seconds (the shapes always run)
    grad_error_max_n: int = 16384  # gradient error (needs the reference gradients) only up to this N
    stats_tokens: int = 1024  # regime statistics on the first tokens only (they are i.i.d.)
    smoke: bool = False
    quick: bool = False


@dataclass(frozen=True)
class RegimeRecord:
    """The inputs of one (shape, regime) point and the numbers every method is judged against."""

    shape: str
    n: int
    d: int
    v: int
    regime: str
    stats: dict  # regime_stats on the first stats_tokens tokens
    stats_tokens: int
    input_bytes: int  # e + c + targets
    grad_bytes: int  # dE + dC in the input dtype: the floor of forward+backward memory
    t_ms: float | None  # the cuBLAS logits GEMM, median
    ref_loss: float | None  # the reference loss (same inputs upcast to float32)
    torch_bf16_err_e: float | None  # plain torch in the input dtype vs the reference
    torch_bf16_err_c: float | None
    note: str = ""


@dataclass(frozen=True)
class Measurement:
    shape: str
    n: int
    d: int
    v: int
    regime: str
    method: str
    label: str
    status: str  # ok | skipped | oom | error
    reason: str = ""
    note: str = ""
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_ratio: float | None = None  # to T of the same point
    bwd_ratio: float | None = None
    fwdbwd_ratio: float | None = None
    fwd_mem_bytes: int | None = None  # peak above the inputs during the forward
    fwdbwd_mem_bytes: int | None = None  # peak above the inputs during forward + backward (grads included)
    loss: float | None = None
    loss_rel_err: float | None = None
    err_e: float | None = None  # relative Frobenius error of dE vs the reference
    err_c: float | None = None
    skipped_fraction: float | None = None
    first_call_s: float | None = None  # wall time of the first (compiling, autotuning) call
    timers: dict = field(default_factory=dict)  # pass -> do_bench | cuda_events | perf_counter
    rounds_ms: dict = field(default_factory=dict)  # pass -> [median ms of each round]; *_ms is their median


@dataclass(frozen=True)
class BenchResult:
    meta: dict
    config: BenchConfig
    regimes: tuple[RegimeRecord, ...]
    measurements: tuple[Measurement, ...]


GRAD_ERROR_METRIC = ("||g - g_ref||_F / ||g_ref||_F, g_ref from the same inputs upcast to float32 "
                     "(cce_inductor's reference path, float64 accumulation)")

# ----------------------------------------------------------------------------- helpers


def _log(msg: str):
    print(msg, flush=True)


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _sync(device: torch.device):
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _free(device: torch.device, collect: bool = False):
    """Return cached blocks to the device; ``collect`` also breaks reference cycles (an exception's
    traceback holds the frames and their tensors), which costs a fraction of a second."""
    if _is_cuda(device):
        if collect:
            gc.collect()
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    text = str(exc)
    return isinstance(exc, oom_type) or "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def _short(exc: BaseException, limit: int = 300) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:limit]


def _rel_err(x: Tensor, ref: Tensor, rows: int = 1 << 14) -> float:
    """||x - ref|| / ||ref||, in float32 slices so no full-size float32 copy of x is made."""
    num = den = 0.0
    x2, r2 = x.reshape(x.shape[0], -1), ref.reshape(ref.shape[0], -1)
    for i in range(0, x2.shape[0], rows):
        r = r2[i : i + rows].float()
        num += float((x2[i : i + rows].float() - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


def _ratio(ms: float | None, t_ms: float | None) -> float | None:
    return ms / t_ms if ms is not None and t_ms else None


class _Timer:
    """Median milliseconds of a callable: do_bench / CUDA events on the GPU, perf_counter on the CPU."""

    _l2_cache: dict = {}

    def __init__(self, cfg: BenchConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        if _is_cuda(device) and device not in self._l2_cache:  # one buffer, zeroed to flush the L2 cache
            self._l2_cache[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        self._l2 = self._l2_cache.get(device)

    def _reps(self, est_ms: float) -> int:
        return max(self.cfg.min_reps, min(self.cfg.max_reps, int(self.cfg.rep_ms / max(est_ms, 1e-3))))

    def call(self, fn: Callable[[], object], est_ms: float, grad_to_none: list[Tensor]) -> tuple[float, str]:
        """Median time of fn() (warm: the caller has run it). est_ms sizes the repetitions."""
        if not _is_cuda(self.device):
            return self._cpu_loop(lambda: None, fn, grad_to_none, self._reps(est_ms)), "perf_counter"
        if est_ms > self.cfg.slow_call_ms:
            return self._event_loop(lambda: None, fn, grad_to_none, self.cfg.min_reps), "cuda_events"
        from triton.testing import do_bench

        rep = max(self.cfg.rep_ms, self.cfg.min_reps * est_ms)
        warmup = max(self.cfg.warmup_ms, est_ms)
        ms = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
        return float(ms), "do_bench"

    def backward(self, make_loss: Callable[[], Tensor], est_ms: float, grad_to_none: list[Tensor]) -> tuple[float, str]:
        """Median time of loss.backward(), a fresh untimed forward before each call."""
        holder = {}

        def before():
            holder["loss"] = make_loss()

        def timed():
            holder.pop("loss").backward()

        reps = self._reps(est_ms)
        if _is_cuda(self.device):
            return self._event_loop(before, timed, grad_to_none, reps), "cuda_events"
        return self._cpu_loop(before, timed, grad_to_none, reps), "perf_counter"

    def _event_loop(self, before, timed, grad_to_none, reps: int) -> float:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        for i in range(reps + 1):  # the first call is a warm-up
            for t in grad_to_none:
                t.grad = None
            before()
            self._l2.zero_()
            starts[i].record()
            timed()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts[1:], ends[1:]))

    def _cpu_loop(self, before, timed, grad_to_none, reps: int) -> float:
        samples = []
        for i in range(reps + 1):
            for t in grad_to_none:
                t.grad = None
            before()
            t0 = time.perf_counter()
            timed()
            if i:
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)


# ----------------------------------------------------------------------------- one point


@dataclass
class _Point:
    """The live inputs and reference gradients of one (shape, regime) point."""

    shape: Shape
    regime: str
    e: Tensor
    c: Tensor
    targets: Tensor
    ref_loss: float | None = None
    ref_de: Tensor | None = None
    ref_dc: Tensor | None = None


def _reference_gradients(point: _Point):
    """The gold: loss and gradients of the same (bf16) inputs upcast to float32, through the
    package's chunked reference path (which accumulates float32 inputs in float64; never an N x V
    tensor), with TF32 off. The gradients are float32."""
    from cce_inductor import linear_cross_entropy

    prev_precision = torch.get_float32_matmul_precision()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        e32 = point.e.detach().float().requires_grad_(True)
        c32 = point.c.detach().float().requires_grad_(True)
        loss = linear_cross_entropy(e32, c32, point.targets, impl="torch")
        loss.backward()
        point.ref_loss, point.ref_de, point.ref_dc = float(loss.detach()), e32.grad, c32.grad
    finally:
        torch.set_float32_matmul_precision(prev_precision)
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32


def _torch_dtype_error(point: _Point) -> tuple[float | None, float | None, str]:
    """The plain torch computation in the input dtype (F.cross_entropy on float32 copies of the
    bf16 logits), judged against the reference: the yardstick of every gradient error."""
    from .methods import _torch_loss

    e, c = point.e, point.c
    try:
        _torch_loss(e, c, point.targets).backward()
        err = (_rel_err(e.grad, point.ref_de), _rel_err(c.grad, point.ref_dc), "")
    except Exception as exc:  # noqa: BLE001 - recorded, e.g. out of memory at a large N
        err = (None, None, f"torch reference error not computed: {_short(exc)}")
    e.grad = c.grad = None
    _free(e.device, collect=err[0] is None)
    return err


def _check(method: Method, prepared: Prepared, point: _Point, device: torch.device) -> dict:
    """Everything of one method at one point but its times: the first (compiling) call, memory,
    loss and gradient errors, the time estimates, s. Fills ``row`` as it goes, so that a failure
    keeps what was measured before it."""
    row: dict = {"status": "ok", "note": prepared.note, "timers": {}, "rounds_ms": {}}
    try:
        _check_into(row, method, prepared, point, device)
    except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
        row.update(status="oom" if _is_oom(exc) else "error", reason=_short(exc))
    point.e.grad = point.c.grad = None
    return row


def _check_into(row: dict, method: Method, prepared: Prepared, point: _Point, device: torch.device):
    e, c, y = point.e, point.c, point.targets

    def loss():
        return prepared.loss(e, c, y)

    with prepared.context():
        # First call: compiles / autotunes where the method does.
        t0 = time.perf_counter()
        out = loss()
        if method.has_backward:
            out.backward()
        _sync(device)
        row["first_call_s"] = time.perf_counter() - t0
        del out
        e.grad = c.grad = None
        _free(device)

        # One call for memory, gradients and the time estimates.
        if _is_cuda(device):
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = loss()
        _sync(device)
        t1 = time.perf_counter()
        if _is_cuda(device):
            row["fwd_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base
        row["est_fwd_ms"] = row["est_fwdbwd_ms"] = (t1 - t0) * 1e3
        if method.has_backward:
            row["loss"] = float(out.detach())
            out.backward()
            _sync(device)
            row["est_fwdbwd_ms"] = (time.perf_counter() - t0) * 1e3
            if _is_cuda(device):
                row["fwdbwd_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base
            if point.ref_loss is not None:
                row["loss_rel_err"] = abs(row["loss"] - point.ref_loss) / abs(point.ref_loss)
                row["err_e"] = _rel_err(e.grad, point.ref_de)
                row["err_c"] = _rel_err(c.grad, point.ref_dc)
        del out
        e.grad = c.grad = None
        _free(device)

        if prepared.skipped_fraction is not None:
            try:
                row["skipped_fraction"] = float(prepared.skipped_fraction(e.detach(), c.detach(), y))
            except Exception as exc:  # noqa: BLE001 - the kernels' helper is optional
                row["note"] += f"; skipped_fraction failed: {_short(exc)}"


def _time_round(row: dict, method: Method, prepared: Prepared, point: _Point, passes, timer: _Timer,
                device: torch.device):
    """One round of timing of one method (after ``_check``): each pass's median ms is appended to
    row["rounds_ms"][pass]. A failure marks the row and drops its times."""
    e, c, y = point.e, point.c, point.targets
    grads = [e, c]

    def loss():
        return prepared.loss(e, c, y)

    try:
        with prepared.context():
            timed = {}
            if "fwd" in passes or not method.has_backward:
                timed["fwd"] = timer.call(loss, row["est_fwd_ms"], grads)
            if method.has_backward and "fwdbwd" in passes:
                timed["fwdbwd"] = timer.call(lambda: loss().backward(), row["est_fwdbwd_ms"], grads)
            if method.has_backward and "bwd" in passes:
                timed["bwd"] = timer.backward(loss, row["est_fwdbwd_ms"], grads)
        for name, (ms, how) in timed.items():
            row["rounds_ms"].setdefault(name, []).append(ms)
            row["timers"][name] = how
    except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
        row.update(status="oom" if _is_oom(exc) else "error", reason=f"while timing: {_short(exc)}", rounds_ms={})
    e.grad = c.grad = None


def _note_filter_choice(row: dict, prepared: Prepared, point: _Point) -> None:
    """For a filtered method: in how many of its backward calls the filter ran (cce_inductor.
    filter_choice: exact where the latest measured s < MIN_SKIPPED, but every PROBE_EVERY-th)."""
    if prepared.filter_records is None:
        return
    with filter_choice.records(prepared.filter_records):
        state = filter_choice.state(point.c)
    if state is not None:
        s = "none yet" if state["skipped"] is None else f"{state['skipped']:.4f}"
        row["note"] += (f"; filter ran in {state['filtered']} of {state['calls']} backward calls "
                        f"(filter_choice, latest s {s})")


def _finish(row: dict) -> None:
    """Each pass's time: the median over its rounds."""
    for name, samples in row.get("rounds_ms", {}).items():
        row[f"{name}_ms"] = statistics.median(samples)


def _measurement(shape: Shape, regime: str, method: Method, t_ms: float | None, **fields) -> Measurement:
    fields.pop("est_fwdbwd_ms", None)
    fields.pop("est_fwd_ms", None)
    known = {f.name for f in dataclasses.fields(Measurement)}
    m = Measurement(shape=shape.name, n=shape.n, d=shape.d, v=shape.v, regime=regime, method=method.name,
                    label=method.label, **{k: v for k, v in fields.items() if k in known})
    return dataclasses.replace(
        m,
        fwd_ratio=_ratio(m.fwd_ms, t_ms),
        bwd_ratio=_ratio(m.bwd_ms, t_ms),
        fwdbwd_ratio=_ratio(m.fwdbwd_ms, t_ms),
    )


# ----------------------------------------------------------------------------- the run


class _Runner:
    def __init__(self, cfg: BenchConfig, registry: dict[str, Method], command: str,
                 checkpoint: Callable[[BenchResult], None] | None = None):
        self.cfg, self.command, self.checkpoint = cfg, command, checkpoint
        self.device = torch.device(cfg.device)
        self.env = Env(self.device, cfg.smoke)
        names = ["gemm"] + [m for m in cfg.methods if m != "gemm"]  # T first, always
        self.methods = [registry[m] for m in names]
        self.timer = _Timer(cfg, self.device)
        self.sweep_timer = _Timer(dataclasses.replace(cfg, min_reps=min(cfg.min_reps, cfg.sweep_min_reps)), self.device)
        self.regimes: list[RegimeRecord] = []
        self.rows: list[Measurement] = []
        self.availability: dict[str, dict] = {}
        self.t_start = time.perf_counter()

    def log(self, msg: str):
        _log(f"[{time.perf_counter() - self.t_start:7.1f}s] {msg}")

    def _setups(self) -> dict[str, Prepared | str]:
        """Set every method up for a new shape (compiled ones start from a clean Dynamo cache)."""
        if any(m.compiled for m in self.methods):
            torch._dynamo.reset()
        out = {}
        for m in self.methods:
            try:
                out[m.name] = m.setup(self.env)
                self.availability.setdefault(m.name, {"label": m.label, "available": True, "reason": "",
                                                      "note": out[m.name].note})
            except Unavailable as exc:
                out[m.name] = str(exc)
                self.availability.setdefault(m.name, {"label": m.label, "available": False, "reason": str(exc),
                                                      "note": ""})
        return out

    def _make_point(self, shape: Shape, regime: str, with_reference: bool) -> tuple[_Point, dict]:
        t0 = time.perf_counter()
        inputs = make_inputs(regime, shape.n, shape.d, shape.v, dtype=DTYPES[self.cfg.dtype], device=self.device,
                             seed=self.cfg.seed)
        point = _Point(shape, regime, inputs.e.detach().requires_grad_(True),
                       inputs.c.detach().requires_grad_(True), inputs.targets)
        del inputs
        k = min(self.cfg.stats_tokens, shape.n)
        stats = regime_stats(point.e.detach()[:k], point.c.detach())
        info = {"stats": stats, "stats_tokens": k, "ref_loss": None, "torch_bf16_err_e": None,
                "torch_bf16_err_c": None, "note": ""}
        if with_reference:
            _reference_gradients(point)
            _free(self.device)
            info["ref_loss"] = point.ref_loss
            err_e, err_c, note = _torch_dtype_error(point)
            info.update(torch_bf16_err_e=err_e, torch_bf16_err_c=err_c, note=note)
        else:
            info["note"] = f"no gradient error: N > grad_error_max_n={self.cfg.grad_error_max_n}"
        self.log(f"{shape.name} N={shape.n} D={shape.d} V={shape.v} {regime}: inputs in "
                 f"{time.perf_counter() - t0:.1f}s; entropy {stats['mean_entropy_nats']:.2f} nats, "
                 f"p>=2^-12 fraction {stats['frac_p_ge_2^-12']:.2e}; torch {self.cfg.dtype} grad err "
                 f"dE {_fmt(info['torch_bf16_err_e'])} dC {_fmt(info['torch_bf16_err_c'])}")
        return point, info

    def run_point(self, shape: Shape, regime: str, setups: dict, passes, stopped: dict[str, str] | None = None,
                  history: dict[str, tuple[int, float, int | None]] | None = None):
        """All methods at one (shape, regime). In the sweep, ``stopped`` holds methods no longer run
        and ``history`` each method's last (N, fwd+bwd ms, fwd+bwd bytes) for predictions."""
        cfg, device = self.cfg, self.device
        stopped = {} if stopped is None else stopped
        timer = self.sweep_timer if history is not None else self.timer
        try:
            point, info = self._make_point(shape, regime, with_reference=shape.n <= cfg.grad_error_max_n)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the inputs at a large N
            reason = f"inputs or reference failed: {_short(exc)}"
            _free(device, collect=True)
            self._skip_point(shape, regime, reason)
            if history is not None:
                for m in self.methods:
                    stopped.setdefault(m.name, f"inputs failed at N={shape.n}")
            return
        free_bytes = torch.cuda.mem_get_info(device)[0] if _is_cuda(device) else None
        for prepared in setups.values():  # no filter choice carried over from another point
            if not isinstance(prepared, str) and prepared.filter_records is not None:
                prepared.filter_records.clear()
        checked: dict[str, dict] = {}  # method -> its row's fields; absent: skipped (reasons below)
        reasons: dict[str, str] = {}
        for method in self.methods:
            prepared = setups[method.name]
            reason = prepared if isinstance(prepared, str) else stopped.get(method.name)
            if reason is None and history is not None and method.name in history:
                reason = self._predicted_stop(method.name, shape.n, history[method.name], free_bytes)
                if reason:
                    stopped[method.name] = reason
            if reason:
                reasons[method.name] = reason
                continue
            checked[method.name] = _check(method, prepared, point, device)
            _free(device, collect=checked[method.name]["status"] != "ok")
        # Timing in rounds: every method once per round, in the methods' order in even rounds and
        # the reverse in odd ones, so that a drift of the GPU's clock (it runs at its power cap under
        # these GEMMs) or what ran just before does not fall on one method only.
        rounds = cfg.sweep_rounds if history is not None else cfg.rounds
        for r in range(max(1, rounds)):
            for method in (self.methods if r % 2 == 0 else self.methods[::-1]):
                row = checked.get(method.name)
                if row is None or row["status"] != "ok":
                    continue
                _time_round(row, method, setups[method.name], point,
                            passes if method.has_backward else ("fwd",), timer, device)
                _free(device, collect=row["status"] != "ok")
        for name, fields in checked.items():
            _finish(fields)
            _note_filter_choice(fields, setups[name], point)
        t_ms = checked["gemm"].get("fwd_ms") if "gemm" in checked else None
        for method in self.methods:
            if method.name not in checked:
                row = _measurement(shape, regime, method, t_ms, status="skipped", reason=reasons[method.name])
            else:
                fields = checked[method.name]
                if fields["status"] != "ok" and history is not None:
                    stopped[method.name] = f"{fields['status']} at N={shape.n}"
                if history is not None and fields["status"] == "ok":
                    ms = fields.get("fwdbwd_ms") or fields.get("est_fwdbwd_ms") or fields.get("fwd_ms")
                    mem = fields.get("fwdbwd_mem_bytes") or fields.get("fwd_mem_bytes")
                    history[method.name] = (shape.n, ms, mem)
                row = _measurement(shape, regime, method, t_ms, **fields)
            self.rows.append(row)
            self.log(f"  {method.name:22s} {_row_summary(row)}")
        grad_bytes = point.e.numel() * point.e.element_size() + point.c.numel() * point.c.element_size()
        input_bytes = grad_bytes + point.targets.numel() * point.targets.element_size()
        self.regimes.append(RegimeRecord(shape=shape.name, n=shape.n, d=shape.d, v=shape.v, regime=regime,
                                         input_bytes=input_bytes, grad_bytes=grad_bytes, t_ms=t_ms, **info))
        del point
        _free(device, collect=True)

    def _predicted_stop(self, name: str, n: int, last: tuple[int, float, int | None], free_bytes) -> str | None:
        last_n, last_ms, last_mem = last
        scale = n / last_n
        if last_ms and last_ms * scale > self.cfg.sweep_max_call_s * 1e3:
            return (f"predicted fwd+bwd {last_ms * scale / 1e3:.1f} s > sweep_max_call_s={self.cfg.sweep_max_call_s} "
                    f"(measured {last_ms / 1e3:.2f} s at N={last_n})")
        if free_bytes is not None and last_mem and last_mem * scale > free_bytes:
            return (f"predicted OOM: ~{_fmt_bytes(last_mem * scale)} needed (scaled from N={last_n}), "
                    f"{_fmt_bytes(free_bytes)} free")
        return None

    def result(self, complete: bool) -> BenchResult:
        meta = dict(self._meta(), complete=complete)
        return BenchResult(meta=meta, config=self.cfg, regimes=tuple(self.regimes), measurements=tuple(self.rows))

    def _checkpoint(self):
        if self.checkpoint is not None:
            self.checkpoint(self.result(complete=False))

    def _skip_point(self, shape: Shape, regime: str, reason: str):
        self.log(f"{shape.name} N={shape.n} {regime}: skipped, {reason}")
        self.rows += [_measurement(shape, regime, m, None, status="skipped", reason=reason) for m in self.methods]

    def run(self) -> BenchResult:
        cfg = self.cfg
        for shape in cfg.shapes:
            setups = self._setups()
            for regime in cfg.regimes:
                self.run_point(shape, regime, setups, PASSES)
                self._checkpoint()
        if cfg.sweep:
            base = cfg.sweep_shape
            for regime in cfg.sweep_regimes:
                stopped: dict[str, str] = {}
                history: dict[str, tuple[int, float, int | None]] = {}
                for n in sorted(cfg.sweep_ns):
                    done = [r for r in self.rows if (r.n, r.d, r.v, r.regime) == (n, base.d, base.v, regime)]
                    if done:  # measured with the shapes: reuse it, and learn from it
                        self.log(f"sweep {regime} N={n}: measured above")
                        for r in done:
                            if r.status == "ok":
                                history[r.method] = (n, r.fwdbwd_ms or r.fwd_ms, r.fwdbwd_mem_bytes or r.fwd_mem_bytes)
                            elif r.status in ("oom", "error"):
                                stopped.setdefault(r.method, f"{r.status} at N={n}")
                        continue
                    elapsed = time.perf_counter() - self.t_start
                    if elapsed > cfg.time_budget_s:
                        self._skip_point(base.with_n(n), regime, f"time budget: {elapsed:.0f} s elapsed > "
                                                                  f"time_budget_s={cfg.time_budget_s:.0f}")
                        continue
                    self.run_point(base.with_n(n), regime, self._setups(), cfg.sweep_passes, stopped, history)
                    self._checkpoint()
        return self.result(complete=True)

    def _meta(self) -> dict:
        device = self.device
        if _is_cuda(device):
            props = torch.cuda.get_device_properties(device)
            device_name, device_memory = props.name, props.total_memory
        else:
            device_name, device_memory = f"CPU ({platform.processor() or platform.machine()})", None
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        import cce_inductor

        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": self.command,
            "device": device_name,
            "device_memory_bytes": device_memory,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton_version,
            "cce_inductor": cce_inductor.__version__,
            "git_commit": _git_commit(),
            "source_digest": source_digest(),
            "peers": peer_versions(),
            "methods": self.availability,
            "grad_error_metric": GRAD_ERROR_METRIC,
            "memory_metric": "peak allocated bytes above the allocation before the call (inputs, reference)",
            "timing": "median over interleaved rounds (rounds per point, sweep_rounds in the sweep; every "
                      "method once per round, alternating order) of each round's median ms; do_bench for "
                      "fwd and fwd+bwd (CUDA-event loop above slow_call_ms), CUDA events around backward() "
                      "after an untimed forward for bwd",
            "wall_s": round(time.perf_counter() - self.t_start, 1),
        }


def source_digest() -> str:
    """sha256 (first 12 hex digits) of the package's sources, path and contents of every
    cce_inductor/**/*.py in sorted order: names the code measured even where the copy that ran has
    no or a stale git checkout (``python -m benchmarks.lce_bench --source-digest`` prints it here)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "cce_inductor", "**", "*.py"), recursive=True)):
        digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


_fmt_bytes = table.fmt_bytes


def _row_summary(m: Measurement) -> str:
    if m.status != "ok":
        return f"{m.status}: {m.reason}"
    parts = []
    for name, ms, ratio in (("fwd", m.fwd_ms, m.fwd_ratio), ("bwd", m.bwd_ms, m.bwd_ratio),
                            ("fwd+bwd", m.fwdbwd_ms, m.fwdbwd_ratio)):
        if ms is not None:
            parts.append(f"{name} {ms:.2f} ms" + (f" ({ratio:.2f} T)" if ratio is not None else ""))
    for name, b in (("mem fwd", m.fwd_mem_bytes), ("mem fwd+bwd", m.fwdbwd_mem_bytes)):
        if b is not None:
            parts.append(f"{name} {_fmt_bytes(b)}")
    if m.err_e is not None:
        parts.append(f"err dE {m.err_e:.2e} dC {m.err_c:.2e}")
    if m.skipped_fraction is not None:
        parts.append(f"s {m.skipped_fraction:.3f}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- JSON, CLI


def _jsonable(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def to_json(result: BenchResult) -> dict:
    return _jsonable(dataclasses.asdict(result))


def run(cfg: BenchConfig, registry: dict[str, Method] | None = None, command: str | None = None,
        checkpoint: Callable[[BenchResult], None] | None = None) -> BenchResult:
    """Measure everything ``cfg`` asks for. ``registry`` maps method names to methods (tests add
    their own), ``command`` is recorded as the command line, ``checkpoint`` receives the partial
    result after every point (so a run cut short still leaves its data)."""
    return _Runner(cfg, registry or METHODS, command or shlex.join(sys.argv), checkpoint).run()


def write_json(result: BenchResult, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(to_json(result), f, indent=1)
    os.replace(tmp, path)


def _parse_shape(text: str, known: tuple[Shape, ...]) -> Shape:
    for s in known:
        if s.name == text:
            return s
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not m:
        names = ", ".join(s.name for s in known)
        raise argparse.ArgumentTypeError(f"unknown shape {text!r}: use one of {names} or NxDxV")
    n, d, v = map(int, m.groups())
    return Shape(text, n, d, v)


def config_from_args(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lce_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench.json", help="JSON output path")
    p.add_argument("--shapes", nargs="+", help="shape names (" + ", ".join(s.name for s in SHAPES + SMOKE_SHAPES)
                   + ") or NxDxV")
    p.add_argument("--regimes", nargs="+", choices=REGIMES)
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), help="the logits GEMM (T) always runs")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="the sweep over N")
    p.add_argument("--sweep-ns", nargs="+", type=int)
    p.add_argument("--sweep-regimes", nargs="+", choices=REGIMES)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, our torch path, peers skipped")
    p.add_argument("--source-digest", action="store_true", help="print the package sources' digest and exit")
    p.add_argument("--device", help="default: cuda (cpu with --smoke)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=BenchConfig.time_budget_s,
                   help="no sweep point starts after this many seconds; the shapes always run")
    p.add_argument("--slow-call-ms", type=float, default=BenchConfig.slow_call_ms,
                   help="calls slower than this are timed with a CUDA-event loop instead of do_bench")
    args = p.parse_args(argv)

    if args.source_digest:
        print(source_digest())
        raise SystemExit(0)
    known = SHAPES + SMOKE_SHAPES
    base_shapes = SMOKE_SHAPES if args.smoke else SHAPES
    shapes = tuple(_parse_shape(s, known) for s in args.shapes) if args.shapes else base_shapes
    methods = tuple(args.methods) if args.methods else tuple(
        m for m in METHODS if not (args.smoke and m in SMOKE_EXCLUDED))
    kwargs = dict(
        shapes=shapes,
        regimes=tuple(args.regimes) if args.regimes else REGIMES,
        methods=methods,
        sweep=args.sweep,
        sweep_shape=base_shapes[0],
        sweep_ns=tuple(args.sweep_ns) if args.sweep_ns else (SMOKE_SWEEP_NS if args.smoke else SWEEP_NS),
        sweep_regimes=tuple(args.sweep_regimes) if args.sweep_regimes else ("lm",),
        device=args.device or ("cpu" if args.smoke else "cuda"),
        dtype=args.dtype,
        seed=args.seed,
        smoke=args.smoke,
        quick=args.quick,
        time_budget_s=args.time_budget_s,
        slow_call_ms=args.slow_call_ms,
    )
    if args.smoke:
        kwargs.update(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1, sweep_min_reps=1)
    elif args.quick:
        kwargs.update(warmup_ms=10.0, rep_ms=30.0, min_reps=3, max_reps=5, sweep_min_reps=2)
    cfg = BenchConfig(**kwargs)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device: use --smoke (or --device cpu) on a machine without a GPU")
    return cfg, args


def main(argv=None) -> BenchResult:
    cfg, args = config_from_args(argv)
    _log(f"cce_inductor benchmark: device {cfg.device}, shapes {[s.name for s in cfg.shapes]}, "
         f"regimes {list(cfg.regimes)}, methods {list(cfg.methods)}, "
         f"sweep {list(cfg.sweep_ns) if cfg.sweep else 'off'}")
    argv = sys.argv[1:] if argv is None else list(argv)
    result = run(cfg, command=shlex.join(["python", "-m", "benchmarks.lce_bench", *argv]),
                 checkpoint=lambda partial: write_json(partial, args.out))
    write_json(result, args.out)
    _log(f"wrote {args.out} ({result.meta['wall_s']} s)\n")
    print(table.markdown(to_json(result)), flush=True)
    return result


if __name__ == "__main__":
    main()

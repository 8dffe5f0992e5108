"""The methods the benchmark compares, side by side on the same inputs.

Each method is set up once per shape (compiled ones after ``torch._dynamo.reset()``) and yields a
``loss(e, c, targets)`` callable: the mean cross-entropy of ``e @ c.T`` over the tokens, differentiable
w.r.t. ``e`` and ``c``. The exception is the logits GEMM alone, which returns the logits and only has
a forward: its time is T, the unit of every ratio.

A method that cannot run here (a peer not installed, a torch without the feature, a CUDA-only kernel
on the CPU) raises ``Unavailable`` from its setup, with the reason that goes into the results.
Peers are imported only when importable; none of their code lives in this repository.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Callable, ContextManager
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor

from cce_inductor import filter_choice

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Unavailable(Exception):
    """The method cannot run in this environment; the message is the recorded reason."""


@dataclass(frozen=True)
class Env:
    device: torch.device
    smoke: bool  # CPU smoke mode: our op on its torch path, CUDA-only peers skipped


@dataclass(frozen=True)
class Prepared:
    loss: LossFn
    # Entered around every call of ``loss`` and its backward (e.g. an Inductor config patch).
    context: Callable[[], ContextManager] = contextlib.nullcontext
    note: str = ""
    # (e, c, targets) -> fraction of backward tiles skipped by gradient filtering, where exposed.
    skipped_fraction: Callable[[Tensor, Tensor, Tensor], float] | None = None
    # The filtered backward's records (cce_inductor.filter_choice) while this method runs: emptied at
    # each point, read for the row's note.
    filter_records: dict | None = None


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    setup: Callable[[Env], Prepared] = field(repr=False)
    has_backward: bool = True
    compiled: bool = False


# ----------------------------------------------------------------------------- torch


def _logits_gemm(e: Tensor, c: Tensor, targets: Tensor) -> Tensor:
    with torch.no_grad():
        return e @ c.T


def _torch_loss(e: Tensor, c: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy((e @ c.T).float(), targets)


# The compiled variants get functions of their own: Dynamo caches compiled code per code object,
# and its guards do not cover Inductor's config, so sharing one function would let the auto-chunker
# variant reuse the plain variant's graph.
def _torch_loss_compiled(e: Tensor, c: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy((e @ c.T).float(), targets)


def _torch_loss_auto_chunked(e: Tensor, c: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy((e @ c.T).float(), targets)


def _setup_gemm(env: Env) -> Prepared:
    return Prepared(_logits_gemm)


def _setup_torch(env: Env) -> Prepared:
    return Prepared(_torch_loss)


def _setup_torch_compile(env: Env) -> Prepared:
    return Prepared(torch.compile(_torch_loss_compiled, dynamic=False))


def auto_chunker_config_key() -> str | None:
    """The Inductor config key that turns the auto-chunker on, or None where this torch lacks it."""
    import torch._inductor.config as config

    for name in ("auto_chunker", "AutoChunker"):
        section = getattr(config, name, None)
        if section is not None and hasattr(section, "enable"):
            return f"{name}.enable"
    return None


def _setup_torch_auto_chunker(env: Env) -> Prepared:
    key = auto_chunker_config_key()
    if key is None:
        raise Unavailable(f"torch {torch.__version__} has no Inductor auto_chunker (needs torch >= 2.11)")
    import torch._inductor.config as config

    patch = lambda: config.patch({key: True})  # noqa: E731
    with patch():  # fail at setup, not mid-measurement, if the key cannot be patched
        pass
    return Prepared(torch.compile(_torch_loss_auto_chunked, dynamic=False), context=patch, note=f"{key}=True")


def _setup_torch_native(env: Env) -> Prepared:
    if not hasattr(F, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy (needs torch >= 2.13)")
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_cls is None:
        raise Unavailable(f"torch {torch.__version__} has no nn.LinearCrossEntropyOptions (only the unchunked path)")
    options = options_cls()

    def loss(e, c, targets):
        return F.linear_cross_entropy(e, c, targets, options=options)

    return Prepared(loss, note="options=LinearCrossEntropyOptions() (chunked, auto policy)")


# ----------------------------------------------------------------------------- this project


def _kernel_skipped_fraction():
    """``cce_inductor.kernels.skipped_fraction`` where the kernels expose it, else None."""
    try:
        from cce_inductor import kernels
    except ImportError:
        return None
    return getattr(kernels, "skipped_fraction", None)


def _setup_ours(exact: bool, dc_filter: str | None = None, filter_dc: bool = False):
    """The op; ``dc_filter``: the kernels' DC_FILTER for the call (a module constant, not an op option:
    e.g. "corrected", the filtered dC with its stand-ins), where the Triton path runs; ``filter_dc``:
    the op's option (dC filtered too, the skipped tiles' recompute skipped where the forward flags them)."""
    def setup(env: Env) -> Prepared:
        import cce_inductor

        if env.smoke:
            if dc_filter is not None:
                raise Unavailable("dc_filter applies on the Triton path: needs CUDA")
            impl, note = "torch", "impl='torch' (smoke mode; the torch path is always exact)"
        elif env.device.type == "cuda":
            impl, note = "triton", f"impl='triton', exact={exact}" + (", filter_dc=True" if filter_dc else "")
        else:
            raise Unavailable("impl='triton' needs CUDA")
        patch = contextlib.nullcontext
        if dc_filter is not None:
            from cce_inductor.kernels import backward

            note += f", kernels.backward.DC_FILTER={dc_filter!r}"
            patch = lambda: mock.patch.object(backward, "DC_FILTER", dc_filter)  # noqa: E731
        # the filtered backward's choice of running its filter (cce_inductor.filter_choice), recorded
        # apart from the other methods' on the same weight
        store = collections.OrderedDict() if not exact and impl == "triton" else None

        @contextlib.contextmanager
        def context():
            with patch(), (filter_choice.records(store) if store is not None else contextlib.nullcontext()):
                yield

        def loss(e, c, targets):
            return cce_inductor.linear_cross_entropy(e, c, targets, impl=impl, exact=exact, filter_dc=filter_dc)

        skipped = None if (exact or impl != "triton") else _kernel_skipped_fraction()
        return Prepared(loss, context=context, note=note, skipped_fraction=skipped, filter_records=store)

    return setup


def _setup_ours_workspace(max_workspace_bytes: int | str):
    def setup(env: Env) -> Prepared:
        import cce_inductor

        if env.smoke or env.device.type != "cuda":
            raise Unavailable("max_workspace_bytes applies on the Triton path: needs CUDA")

        def loss(e, c, targets):
            return cce_inductor.linear_cross_entropy(e, c, targets, impl="triton",
                                                     max_workspace_bytes=max_workspace_bytes)

        return Prepared(loss, note=f"impl='triton', max_workspace_bytes={max_workspace_bytes} "
                                   "(exact; gradients formed in its forward)")

    return setup


# ----------------------------------------------------------------------------- peers


def _peer_gate(env: Env, what: str):
    if env.smoke:
        raise Unavailable(f"{what}: skipped in smoke mode")
    if env.device.type != "cuda":
        raise Unavailable(f"{what}: needs CUDA")


def _setup_cut_cross_entropy(filter_eps: str | None):
    """The reference CCE with its gradient filter at ``filter_eps``: "high" is its default (2^-12 in
    bf16: entries of the softmax below it are dropped from both gradients), None its exact mode."""

    def setup(env: Env) -> Prepared:
        _peer_gate(env, "cut-cross-entropy")
        try:
            from cut_cross_entropy import linear_cross_entropy as cce_lce
        except ImportError as exc:
            raise Unavailable(f"cut-cross-entropy not installed ({exc})") from None

        def loss(e, c, targets):
            return cce_lce(e, c, targets, impl="cce", filter_eps=filter_eps)

        default = " (its default)" if filter_eps == "high" else ": no filter"
        return Prepared(loss, note=f"impl='cce', filter_eps={filter_eps!r}{default}")

    return setup


def _setup_liger(env: Env) -> Prepared:
    _peer_gate(env, "liger-kernel")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"liger-kernel not installed ({exc})") from None

    def loss(e, c, targets):
        return liger_fused_linear_cross_entropy(e, c, targets)

    return Prepared(loss, note="gradients formed in its forward; defaults")


# ----------------------------------------------------------------------------- registry

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gemm", "cuBLAS logits GEMM (T)", _setup_gemm, has_backward=False),
        Method("torch", "torch eager", _setup_torch),
        Method("torch_compile", "torch.compile", _setup_torch_compile, compiled=True),
        Method("torch_compile_chunked", "torch.compile + auto_chunker", _setup_torch_auto_chunker, compiled=True),
        Method("torch_native", "torch F.linear_cross_entropy", _setup_torch_native),
        Method("cce_inductor", "cce_inductor (filtered)", _setup_ours(exact=False)),
        Method("cce_inductor_corrected_dc", "cce_inductor (filtered, dC corrected)",
               _setup_ours(exact=False, dc_filter="corrected")),
        Method("cce_inductor_filter_dc", "cce_inductor (filtered, filter_dc)",
               _setup_ours(exact=False, filter_dc=True)),
        Method("cce_inductor_exact", "cce_inductor (exact)", _setup_ours(exact=True)),
        # backend="cce"'s default: the workspace sized per call (a quarter of the logits' bytes)
        Method("cce_inductor_auto", "cce_inductor (auto workspace, the backend's default)", _setup_ours_workspace("auto")),
        Method("cce_inductor_workspace", "cce_inductor (workspace 1 GiB)", _setup_ours_workspace(2**30)),
        # the workspace path held to 48 MiB (the exact backward's scratch until its chunks widened into
        # 56 MiB, kernels.backward_buffered.BUFFER_BYTES): three GEMMs at CCE memory, over chunks of tokens as
        # small as that budget makes them
        Method("cce_inductor_workspace_48m", "cce_inductor (workspace 48 MiB)", _setup_ours_workspace(48 * 2**20)),
        Method("cut_cross_entropy", "cut-cross-entropy (cce)", _setup_cut_cross_entropy("high")),
        # its exact mode, for goal line 5 mode by mode: where its default filter drops most of the
        # gradient (uniform data at V = 256000: every entry of the softmax is below 2^-12) the two differ
        Method("cut_cross_entropy_exact", "cut-cross-entropy (cce, no filter)", _setup_cut_cross_entropy(None)),
        Method("liger", "liger-kernel FLCE", _setup_liger),
    )
}
# Slow on a CPU (compilation; many small bf16 matmuls): left out of the smoke default, runnable
# there with --methods.
SMOKE_EXCLUDED = ("torch_compile", "torch_compile_chunked", "torch_native", "cce_inductor_auto", "cce_inductor_workspace",
                  "cce_inductor_workspace_48m", "cce_inductor_corrected_dc", "cce_inductor_filter_dc")


def peer_versions() -> dict[str, str | None]:
    out = {}
    for dist in ("cut-cross-entropy", "liger-kernel"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out

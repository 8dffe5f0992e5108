"""Options of the rewrite, shared by the backend, enable() and explain()."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

IMPLS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Options:
    """What the rewrite does at each site.

    Attributes:
        detach_logits: logits the compiled region returns (the projection's output, or a cast /
            reshape / softcap of it on the way to the loss) are returned as ``logits.detach()``:
            the same values, but ``requires_grad=False`` and no ``grad_fn``, so the backward gets
            no N x V gradient for them and saves nothing for them. Gradients can then no longer
            flow through the returned logits (a loss computed from them outside the compiled
            region does not reach the model). Uses inside the compiled region are unchanged.
            Off by default: returned logits keep their exact semantics.
        defer_logits: logits the compiled region returns next to a rewritten loss are not
            computed in it: the caller gets a tensor that forms them when first read, with
            eager's values and gradients (see ``cce_inductor.deferred``). Under ``enable()`` this
            goes through a wrapper of Inductor's ``compile_fx`` (``passes/inductor_hook.py``).
        exact: the op's ``exact=``; True (the default) means no gradient filtering in the Triton
            backward, False opts in to the bounded filter (see ``linear_cross_entropy``).
        filter_dc: the op's ``filter_dc=`` (with exact=False only): dC filtered too, and the
            filtered tiles' recompute skipped where the forward can flag them.
        impl: the op's ``impl=``: "auto" (Triton on CUDA, torch otherwise), "triton" or "torch".
        max_workspace_bytes: the op's ``max_workspace_bytes=``. ``"auto"`` (the default): a bounded
            buffer of logits for a chunk of tokens, gradients formed in the forward (three GEMMs
            instead of four), its size chosen per call from the shapes and the device (a quarter of
            the logits' bytes, at most 1/32 of the device's memory; see ``linear_cross_entropy``),
            with exact=True on the Triton path for a reduced loss. ``0`` (or None): the minimum
            memory, O(N + V): the exact recompute. A positive int: at most that many bytes. At a
            per-token statistics site (``linear_token_stats``) it sets how many tokens' logits the
            forward keeps for the backward ("auto": half of them, at most 1/32 of the device's
            memory).
    """

    detach_logits: bool = False
    defer_logits: bool = True
    exact: bool = True
    filter_dc: bool = False
    impl: str = "auto"
    max_workspace_bytes: int | str | None = "auto"

    def __post_init__(self):
        for name in ("detach_logits", "defer_logits", "exact", "filter_dc"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"cce option {name} must be a bool, got {getattr(self, name)!r}")
        if self.filter_dc and self.exact:
            raise ValueError("cce option filter_dc=True needs exact=False")
        budget = self.max_workspace_bytes
        if budget is not None and budget != "auto" and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f'cce option max_workspace_bytes must be "auto", an int >= 0 or None, got {budget!r}')
        if self.impl not in IMPLS:
            raise ValueError(f"cce option impl must be one of {IMPLS}, got {self.impl!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Options":
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown cce option(s) {unknown}; known: {list(cls.names())}")
        return cls(**kwargs)

    def as_dict(self) -> dict:
        return asdict(self)

"""Vocabulary-parallel linear cross-entropy: the classifier's rows split over a process group.

Each rank holds rows [v0, v1) of the classifier C (V x D) (and of the bias) and the same
embeddings e (N x D) and targets. With z = e @ C.T (+ b, softcapped), the loss of token i is

    loss_i = L_i - (1 - ls) * z_{i, y_i} - (ls / V) * sum_j z_ij,     L_i = logsumexp_j z_ij

(ls: label smoothing). Per rank, the single-device op's forward (``ops.lce_forward``) over the
shard gives the shard's log-sum-exp and, where y_i falls in the shard, z_{i, y_i}; the smoothing
term's sum over the shard is ``e . sum_j C_j + sum_j b_j`` (exact without a softcap; with one it is
not linear in C, and the combination is refused). These three per-token statistics are gathered
across the group (one all-gather of 3 x N values per rank, no N x V traffic) and combined the same
way on every rank: L is the log-sum-exp over ranks, the other two are sums.

Backward, per rank: dz over the shard = g * (softmax_global - (1 - ls) * onehot - ls / V) (+ the
returned lse's upstream gradient times the softmax), formed by ``ops.lce_backward`` from the global
L: it computes gradients of sum(grad_loss * loss_shard + grad_lse * lse) with the softmax taken
against the lse passed in, so ``grad_loss = (1 - ls) g`` and ``grad_lse = g + g_lse - (1 - ls) g
[target in shard]`` give exactly that dz; the uniform smoothing term is a rank-one correction. dC
(and dbias) stay local; dE of one shard is partial, summed over the group (an all-reduce of N x D,
or left to DTensor as a ``Partial`` gradient, which it reduce-scatters under sequence parallelism).

Layers, as in ``ops.py``: per-shard pieces (``shard_statistics``, ``combine``, ``shard_backward``,
pure functions of one shard, which the tests run on vocabulary ranges in one process), the custom
ops ``cce_inductor::vp_lce_forward`` / ``vp_lce_backward`` (the pieces plus the collectives, on a
process group named by its ``group_name``), and the public ``vocab_parallel_cross_entropy``.
The collectives run inside the ops' bodies, so torch.compile sees one opaque call per op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .ops import REDUCTIONS, lse_dtype

# vocab_start of a DTensor classifier: the group rank's torch.chunk of V (``chunk_start``)
FROM_RANK = -1

# A local target no shard holds: targets outside the shard (or ignored) become this before the
# single-device op sees them. Never ``ignore_index`` itself, which may be a valid id of another shard.
_NOT_HERE = -1


# ----------------------------------------------------------------------------- per-shard pieces


def local_targets(targets: Tensor, vocab_start: int, shard_size: int, ignore_index: int) -> Tensor:
    """Targets as ids of the shard [vocab_start, vocab_start + shard_size), ``_NOT_HERE`` elsewhere."""
    here = (targets != ignore_index) & (targets >= vocab_start) & (targets < vocab_start + shard_size)
    return torch.where(here, targets - vocab_start, torch.full_like(targets, _NOT_HERE))


def _class_sum(c: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | float]:
    """sum_j C_j (D,) and sum_j b_j over the shard, float32 (summed without a copy of C)."""
    col = c.sum(0, dtype=torch.float32)
    return col, (bias.sum(dtype=torch.float32) if bias is not None else 0.0)


def _row_chunks(e: Tensor):
    rows = max(1, (1 << 22) // max(1, e.shape[1]))  # float32 copies of at most 16 MiB
    return ((i, min(i + rows, e.shape[0])) for i in range(0, e.shape[0], rows))


def _rows_times(e: Tensor, vec: Tensor) -> Tensor:
    """e @ vec (N,) in float32, e converted a chunk of rows at a time."""
    return torch.cat([e[i:j].float() @ vec for i, j in _row_chunks(e)]) if e.shape[0] else vec.new_zeros(0)


def _weighted_row_sum(e: Tensor, w: Tensor) -> Tensor:
    """sum_i w_i e_i (D,) in float32, e converted a chunk of rows at a time."""
    out = w.new_zeros(e.shape[1])
    for i, j in _row_chunks(e):
        out += w[i:j] @ e[i:j].float()
    return out


def shard_statistics(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None, *, vocab_start: int,
                     ignore_index: int, softcap: float, label_smoothing: float, impl: str) -> Tensor:
    """Per-token statistics of one shard, shape (3, N), in ``lse_dtype(e.dtype, impl)``: the
    shard's log-sum-exp, the target logit where the target is in the shard (else 0), and the sum of
    the shard's logits (0 without label smoothing). e (N, D), c (V_shard, D), targets (N,) global ids."""
    dtype = lse_dtype(e.dtype, impl)
    n = e.shape[0]
    if c.shape[0] == 0:  # an empty shard (V smaller than the group): contributes exp(-inf) = 0
        out = e.new_zeros(3, n, dtype=dtype)
        out[0] = float("-inf")
        return out
    mine = local_targets(targets, vocab_start, c.shape[0], ignore_index)
    loss, lse, _ = ops.lce_forward(e, c, mine, bias, _NOT_HERE, softcap, 0.0, impl, False, False)
    lse = lse.to(dtype)
    target_logit = torch.where(mine != _NOT_HERE, lse - loss.to(dtype), torch.zeros((), dtype=dtype, device=e.device))
    if label_smoothing:
        col, bsum = _class_sum(c, bias)
        logit_sum = (_rows_times(e, col) + bsum).to(dtype)
    else:
        logit_sum = torch.zeros_like(lse)
    return torch.stack([lse, target_logit, logit_sum])


def combine(stats: Tensor, targets: Tensor, *, vocab_size: int, ignore_index: int,
            label_smoothing: float) -> tuple[Tensor, Tensor]:
    """From every shard's statistics (ranks, 3, N): the per-token loss (float32, 0 where ignored)
    and the global log-sum-exp (the statistics' dtype)."""
    lse = torch.logsumexp(stats[:, 0], dim=0)
    target_logit = stats[:, 1].sum(0)
    loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing:
        loss = loss - (label_smoothing / vocab_size) * stats[:, 2].sum(0)
    loss = torch.where(targets != ignore_index, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return loss.float(), lse


def shard_backward(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None, lse: Tensor, grad_loss: Tensor,
                   grad_lse: Tensor, *, vocab_start: int, vocab_size: int, ignore_index: int, softcap: float,
                   label_smoothing: float, impl: str, filter_grad: bool, needs_e: bool, needs_c: bool,
                   needs_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_loss * loss + grad_lse * lse) (loss and lse the global ones) through
    one shard: dE partial (this shard's share), dC and dbias of the shard; an empty tensor for each
    not needed. ``lse`` is the global log-sum-exp (``combine``)."""
    needs_bias = needs_bias and bias is not None
    if c.shape[0] == 0:
        return (e.new_zeros(e.shape) if needs_e else e.new_empty(0), c.new_empty(c.shape) if needs_c else e.new_empty(0),
                bias.new_empty(bias.shape) if needs_bias else e.new_empty(0))
    dtype = lse.dtype
    ls = label_smoothing
    g = torch.where(targets != ignore_index, grad_loss.to(dtype), torch.zeros((), dtype=dtype, device=e.device))
    mine = local_targets(targets, vocab_start, c.shape[0], ignore_index)
    g_onehot = (1.0 - ls) * g
    # the op's softmax coefficient is its grad_loss where the target is in the shard (else 0) plus
    # its grad_lse: make it g + grad_lse for every token
    g_rest = grad_lse.to(dtype) + g - torch.where(mine != _NOT_HERE, g_onehot, torch.zeros((), dtype=dtype, device=e.device))
    keep = e.new_empty(0, dtype=torch.int8)
    de, dc, dbias = ops.lce_backward(e, c, mine, bias, lse, g_onehot.contiguous(), g_rest.contiguous(), keep,
                                     _NOT_HERE, softcap, 0.0, impl, filter_grad, needs_e, needs_c, needs_bias)
    if ls:  # the uniform term -g * ls / V at every logit of the shard (no softcap: linear in C)
        scale = ls / vocab_size
        g32 = g.float()
        col, _ = _class_sum(c, bias)
        # in place, in the gradients' dtypes: no N x D or V x D float32 copies
        if needs_e:
            de.addr_(g32.to(de.dtype), col.to(de.dtype), alpha=-scale)
        if needs_c:
            dc.sub_((scale * _weighted_row_sum(e, g32)).to(dc.dtype))
        if needs_bias:
            dbias.sub_((scale * g32.sum()).to(dbias.dtype))
    return de, dc, dbias


# ----------------------------------------------------------------------------- custom ops


def _group(group_name: str):
    """The process group of that name; None for "" (one process: no communication)."""
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _shard_start(vocab_start: int, vocab_size: int, shard_rows: int, group) -> int:
    """vocab_start, or for ``FROM_RANK`` the group rank's ``torch.chunk`` start (checked against
    the shard's rows: a classifier split otherwise is an error, never a wrong loss)."""
    if vocab_start != FROM_RANK:
        return vocab_start
    import torch.distributed as dist

    ranks, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
    start = chunk_start(vocab_size, ranks, rank)
    if min(vocab_size, chunk_start(vocab_size, ranks, rank + 1)) - start != shard_rows:
        raise ValueError(
            f"rank {rank} of {ranks} holds {shard_rows} rows of the classifier, not its torch.chunk of "
            f"V={vocab_size} as DTensor's Shard(0) splits it"
        )
    return start


@torch.library.custom_op("cce_inductor::vp_lce_forward", mutates_args=())
def vp_lce_forward(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
    impl: str,
    vocab_start: int,
    vocab_size: int,
    group_name: str,
    filter_grad: bool,
    reduce_grad_e: bool,
) -> tuple[Tensor, Tensor]:
    """e (N, D), c (V_shard, D): rows [vocab_start, vocab_start + V_shard) of a V = vocab_size
    classifier, targets (N,) global ids, bias (V_shard,) or None; group_name: the process group
    that holds the other shards ("" for none). Returns the per-token loss (N,) float32 (0 where
    ignored) and the global log-sum-exp (N,) in ``lse_dtype``, the same on every rank. A target
    outside [0, V) that is not ignore_index is an error, as in ``ops.lce_forward``.
    ``filter_grad`` and ``reduce_grad_e`` are the backward's (``vp_lce_backward``)."""
    ops._check_targets(targets, vocab_size, ignore_index)
    group = _group(group_name)
    vocab_start = _shard_start(vocab_start, vocab_size, c.shape[0], group)
    stats = shard_statistics(e, c, targets, bias, vocab_start=vocab_start, ignore_index=ignore_index,
                             softcap=softcap, label_smoothing=label_smoothing, impl=impl)
    if group is not None:
        import torch.distributed as dist

        gathered = stats.new_empty(dist.get_world_size(group) * 3, stats.shape[1])
        # all_gather_single: the newer name (all_gather_into_tensor warns from torch 2.13)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, stats.contiguous(), group=group)
        stats = gathered.view(-1, 3, stats.shape[1])
    else:
        stats = stats[None]
    loss, lse = combine(stats, targets, vocab_size=vocab_size, ignore_index=ignore_index,
                        label_smoothing=label_smoothing)
    return loss.contiguous(), lse.contiguous()


@vp_lce_forward.register_fake
def _(e, c, targets, bias, ignore_index, softcap, label_smoothing, impl, vocab_start, vocab_size, group_name,
      filter_grad, reduce_grad_e):
    n = e.shape[0]
    return e.new_empty(n, dtype=torch.float32), e.new_empty(n, dtype=lse_dtype(e.dtype, impl))


@torch.library.custom_op("cce_inductor::vp_lce_backward", mutates_args=())
def vp_lce_backward(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    lse: Tensor,
    grad_loss: Tensor,
    grad_lse: Tensor,
    ignore_index: int,
    softcap: float,
    label_smoothing: float,
    impl: str,
    filter_grad: bool,
    vocab_start: int,
    vocab_size: int,
    group_name: str,
    reduce_grad_e: bool,
    needs_e: bool,
    needs_c: bool,
    needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dE, dC, dbias) of sum(grad_loss * loss + grad_lse * lse); an empty tensor for each not
    needed. dE is this shard's share, summed over the group when ``reduce_grad_e``."""
    group = _group(group_name)
    vocab_start = _shard_start(vocab_start, vocab_size, c.shape[0], group)
    de, dc, dbias = shard_backward(
        e, c, targets, bias, lse, grad_loss, grad_lse, vocab_start=vocab_start, vocab_size=vocab_size,
        ignore_index=ignore_index, softcap=softcap, label_smoothing=label_smoothing, impl=impl,
        filter_grad=filter_grad, needs_e=needs_e, needs_c=needs_c, needs_bias=needs_bias,
    )
    if reduce_grad_e and needs_e and group is not None:
        import torch.distributed as dist

        de = de.contiguous()
        dist.all_reduce(de, group=group)
    return tuple(ops._dense(g, e) for g in (de, dc, dbias))


@vp_lce_backward.register_fake
def _(e, c, targets, bias, lse, grad_loss, grad_lse, ignore_index, softcap, label_smoothing, impl, filter_grad,
      vocab_start, vocab_size, group_name, reduce_grad_e, needs_e, needs_c, needs_bias):
    return (
        ops._dense_like(e) if needs_e else e.new_empty(0),
        ops._dense_like(c) if needs_c else e.new_empty(0),
        ops._dense_like(bias) if (needs_bias and bias is not None) else e.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    (e, c, targets, bias, ignore_index, softcap, label_smoothing, impl, vocab_start, vocab_size,
     group_name, filter_grad, reduce_grad_e) = inputs
    _, lse = output
    ctx.save_for_backward(e, c, targets, bias, lse)
    ctx.options = (ignore_index, softcap, label_smoothing, impl)
    ctx.shard = (vocab_start, vocab_size, group_name)
    ctx.filter_grad, ctx.reduce_grad_e = filter_grad, reduce_grad_e


def _backward(ctx, grad_loss, grad_lse):
    e, c, targets, bias, lse = ctx.saved_tensors
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.to(lse.dtype).contiguous()
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype).contiguous()
    needs_e, needs_c, _, needs_bias = ctx.needs_input_grad[:4]
    de, dc, dbias = vp_lce_backward(e, c, targets, bias, lse, grad_loss, grad_lse, *ctx.options, ctx.filter_grad,
                                    *ctx.shard, ctx.reduce_grad_e, needs_e, needs_c, needs_bias)
    return (de if needs_e else None, dc if needs_c else None, None, dbias if needs_bias else None,
            None, None, None, None, None, None, None, None, None)


vp_lce_forward.register_autograd(_backward, setup_context=_setup_context)
vp_lce_backward.register_autograd(ops._no_double_backward, setup_context=ops._setup_nothing)
for _device_type in ("cpu", "cuda"):
    ops._register_autocast(vp_lce_forward, _device_type)
    ops._register_autocast(vp_lce_backward, _device_type, cast=False)


# ----------------------------------------------------------------------------- public function


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    except ImportError:  # torch.distributed not built
        return None
    return DTensor, Partial, Replicate, Shard


def is_dtensor(t) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(t, types[0])


def vocab_sharding(c) -> int:
    """For a DTensor classifier (V, D): the mesh dim its rows are split over. Accepted: ``Shard(0)``
    on exactly one mesh dim, ``Replicate()`` on the others; any other placement is a ValueError
    naming it. This rank's rows are the group rank's ``torch.chunk`` of V, as DTensor splits them
    (``chunk_start``), found when the op runs: DTensor's mesh coordinate is not a number while
    torch.compile traces."""
    DTensor, Partial, Replicate, Shard = _dtensor_types()
    placements = tuple(c.placements)
    # type, not isinstance: a _StridedShard (a Shard subclass) does not give each rank one range of rows
    sharded = [i for i, p in enumerate(placements) if type(p) is Shard and p.dim in (0, -c.dim())]
    others = [p for i, p in enumerate(placements) if i not in sharded and not isinstance(p, Replicate)]
    if len(sharded) != 1 or others:
        raise ValueError(
            "a DTensor classifier must be split over its rows (the vocabulary) on one mesh dim -- "
            f"Shard(0) there, Replicate() elsewhere; got placements {placements}"
        )
    return sharded[0]


def chunk_start(vocab_size: int, ranks: int, rank: int) -> int:
    """The first row of ``rank``'s part of V rows split by ``torch.chunk`` (DTensor's Shard)."""
    chunk = -(-vocab_size // ranks)
    return min(rank * chunk, vocab_size)


def _from_dtensors(e, c, targets, bias):
    """Local tensors and (group, vocab_start, vocab_size, reduce_grad_e) from a DTensor classifier.
    e may be a plain tensor (the same on every rank) or a DTensor replicated on the mesh; a DTensor
    e hands its gradient back as ``Partial`` over the vocabulary's mesh dim (DTensor reduces it
    where it is needed: a reduce-scatter under sequence parallelism), a plain one gets it summed."""
    DTensor, Partial, Replicate, Shard = _dtensor_types()
    dim = vocab_sharding(c)
    vocab_start, vocab_size = FROM_RANK, int(c.shape[0])
    mesh = c.device_mesh
    reduce_grad_e = True
    if isinstance(e, DTensor):
        if e.device_mesh != mesh or not all(isinstance(p, Replicate) for p in e.placements):
            raise ValueError(
                f"e must be a plain tensor or a DTensor replicated on the classifier's mesh; got placements "
                f"{tuple(e.placements)}" + ("" if e.device_mesh == mesh else " on another mesh")
            )
        grads = tuple(Partial() if i == dim else Replicate() for i in range(mesh.ndim))
        e = e.to_local(grad_placements=grads)
        reduce_grad_e = False
    if isinstance(targets, DTensor):
        if not all(isinstance(p, Replicate) for p in targets.placements):
            raise ValueError(f"DTensor targets must be replicated; got placements {tuple(targets.placements)}")
        targets = targets.to_local()
    if bias is not None:
        if not isinstance(bias, DTensor) or tuple(bias.placements) != tuple(c.placements) or bias.device_mesh != mesh:
            raise ValueError("with a DTensor classifier the bias must be a DTensor split like it (Shard(0))")
        bias = bias.to_local()
    return e, c.to_local(), targets, bias, mesh.get_group(dim), vocab_start, vocab_size, reduce_grad_e


def vocab_parallel_cross_entropy(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: int = 0,
    label_smoothing: float = 0.0,
    return_lse: bool = False,
    impl: str = "auto",
    exact: bool = True,
):
    """``linear_cross_entropy`` with the classifier's rows (the vocabulary) split over a process group.

    Every rank of ``group`` passes the same e, targets and options and its own rows
    [vocab_start, vocab_start + c.shape[0]) of a V = ``vocab_size`` classifier (and the same rows of
    the bias); every rank gets the same loss, equal to ``linear_cross_entropy`` of the whole
    classifier. No rank forms more than the single-device op's bounded buffers of its shard's
    logits; the forward gathers 3 x N statistics per rank, the backward sums dE (N x D) over the
    group (an all-reduce); dC and dbias stay with their shard.

    The classifier may instead be a DTensor split on dim 0 (``Shard(0)`` on one mesh dim,
    ``Replicate()`` on any others): group, vocab_start and vocab_size are read from it, and must not
    be passed. e may then be a plain tensor or a DTensor replicated on the same mesh (its gradient
    comes back as ``Partial`` over the vocabulary's mesh dim, for DTensor to reduce); the bias, if
    any, a DTensor split like the classifier; the results are plain tensors.

    Args:
        e, targets, bias, ignore_index, reduction, shift, return_lse, impl: as in
            ``linear_cross_entropy`` (targets are global class ids, checked against [0, V)).
        exact: as in ``linear_cross_entropy``, but the filter's bound holds per shard: with
            ``exact=False`` each rank's backward drops less than 1/8 of a token's gradient scale,
            so up to (ranks / 8) of it in all. The rewrite of tensor-parallel heads keeps exact.
        c: this rank's rows of the classifier (V_shard, D), or the whole one as a DTensor.
        group: the process group over which the vocabulary is split (a ``ProcessGroup``); None only
            for one process (then the shard must be the whole vocabulary).
        vocab_start: the global id of this rank's first row.
        vocab_size: V, the whole vocabulary's size.
        softcap: as in ``linear_cross_entropy``; not together with label smoothing (the smoothing
            term, a sum over all logits, is combined across shards through its linearity in C,
            which the softcap breaks): that raises a ValueError.
        label_smoothing: as in ``linear_cross_entropy`` (over all V classes).

    Returns:
        The loss, or ``(loss, lse)`` with ``return_lse=True`` (lse: the log-sum-exp over all V).
    """
    c_in = c
    if is_dtensor(c):
        if group is not None or vocab_start is not None or vocab_size is not None:
            raise ValueError("with a DTensor classifier, group, vocab_start and vocab_size come from it: do not pass them")
        e, c, targets, bias, group, vocab_start, vocab_size, reduce_grad_e = _from_dtensors(e, c, targets, bias)
    else:
        if any(is_dtensor(t) for t in (e, targets, bias)):
            raise ValueError("e, targets or bias is a DTensor but the classifier is not: pass the classifier as a DTensor")
        reduce_grad_e = True
    ops._check_inputs(e, c, targets, bias, ignore_index, softcap, reduction, shift, label_smoothing, impl)
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if not isinstance(v, int) or isinstance(v, bool) or (v < 0 and not (v == FROM_RANK and is_dtensor(c_in))):
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if vocab_start != FROM_RANK and vocab_start + c.shape[0] > vocab_size:
        raise ValueError(f"the shard's rows [{vocab_start}, {vocab_start + c.shape[0]}) are not within V={vocab_size}")
    group_name = _group_name(group, c.shape[0], vocab_size)
    smoothing = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    if softcap is not None and smoothing:
        raise ValueError(
            "vocab_parallel_cross_entropy: softcap together with label_smoothing is not supported (the "
            "smoothing term over the whole vocabulary cannot be combined across shards exactly under a softcap)"
        )
    for name, v in (("exact", exact), ("return_lse", return_lse)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    impl = ops.resolve_impl(impl, e.device)
    aligned = targets.long()
    if shift:
        pad = aligned.new_full((*targets.shape[:-1], shift), ignore_index)
        aligned = torch.cat([aligned[..., shift:], pad], dim=-1)
    flat_targets = aligned.reshape(-1)
    loss, lse = vp_lce_forward(
        e.reshape(-1, e.shape[-1]), c, flat_targets, bias, ignore_index, float(softcap or 0.0), smoothing, impl,
        vocab_start, vocab_size, group_name, not exact, reduce_grad_e,
    )
    if reduction == "mean":
        out = loss.sum() / (flat_targets != ignore_index).sum()
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = ops._unshift(loss, targets.shape, shift)
    if return_lse:
        return out, ops._unshift(lse.float(), targets.shape, shift)
    return out


def _group_name(group, shard_rows: int, vocab_size: int) -> str:
    if group is None:
        if shard_rows != vocab_size:
            raise ValueError("group=None (one process) needs the whole classifier (vocab_start=0, c.shape[0] == vocab_size)")
        return ""
    import torch.distributed as dist

    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group.group_name

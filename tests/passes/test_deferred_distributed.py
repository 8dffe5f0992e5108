"""Deferred logits under DDP and FSDP2: two processes on a CPU mesh (gloo).

Each rank compiles an unmodified HF Llama wrapped in DDP, or sharded with ``fully_shard`` per
decoder layer and at the root (with and without ``reshard_after_forward``), with
``backend="cce"`` (on the torch path, and for FSDP2 also on the Triton path under the interpreter,
where the default runs the workspace op), keeps the output through the backward as a training loop does, and checks:
the logits are deferred and unread after the backward (under FSDP2, which frees the head's
unsharded weight after the forward or the backward, with a copy of that weight); the loss and the (gathered) gradients equal
a single-process eager run on the same batch; the logits, read afterwards, equal eager's.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")

WORLD = 2
# fsdp2_workspace: the Triton path (the interpreter on these CPUs), where the default runs the
# workspace op, whose gradients are formed in the forward and handed to FSDP2 in the backward.
CASES = ("ddp", "fsdp2_reshard", "fsdp2_keep", "fsdp2_workspace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


def _worker(rank: int, port: int) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from test_deferred_logits import _ids, _llama

    from cce_inductor.deferred import DeferredLogits

    import torch._inductor.config as inductor_config

    # Inductor's ATen fallbacks instead of generated C++ kernels: what is checked here is the
    # rewrite and the deferral, and C++ compiles would take most of the test's time.
    if hasattr(inductor_config, "fallback_by_default"):
        inductor_config.fallback_by_default = True
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        from cce_inductor.kernels import workspace

        fused_calls = []
        fused = workspace.lce_fused_reduced
        workspace.lce_fused_reduced = lambda *a, **k: fused_calls.append(1) or fused(*a, **k)
        ids = _ids()
        ref = _llama()
        expected = ref(input_ids=ids, labels=ids)
        expected.loss.backward()
        for case in CASES:
            torch._dynamo.reset()
            model = _llama()
            if case == "ddp":
                wrapped = DistributedDataParallel(model)
            else:
                for layer in model.model.layers:
                    fully_shard(layer, reshard_after_forward=case != "fsdp2_keep")
                wrapped = fully_shard(model, reshard_after_forward=case != "fsdp2_keep")
            options = {"impl": "triton"} if case == "fsdp2_workspace" else None
            fused_calls.clear()
            compiled = torch.compile(wrapped, backend="cce", options=options)
            out = compiled(input_ids=ids, labels=ids)
            out.loss.backward()
            # FSDP2 frees the head's unsharded weight after the forward or the backward: the
            # deferred logits keep a copy of it (V x D, smaller than N x V here) instead.
            assert isinstance(out.logits, DeferredLogits) and not out.logits.formed, case
            assert bool(fused_calls) == (case == "fsdp2_workspace"), case
            _close(out.loss.detach(), expected.loss.detach(), f"{case} loss")
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                _close(grad, q.grad, f"{case} grad {name}")
            _close(out.logits.detach(), expected.logits.detach(), f"{case} logits")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_and_fsdp2_defer_logits_and_match_eager():
    torch.multiprocessing.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)

"""cce_inductor.filter_choice: a filtered backward runs its filter only where it has lately skipped
enough tiles to pay (``MIN_SKIPPED``), re-measuring every ``PROBE_EVERY``-th call, and never by a
device sync."""

import os
from unittest import mock

import pytest
import torch

from cce_inductor import filter_choice, linear_cross_entropy

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the Triton path on the CPU: the interpreter")


def _measured(c, computed, skipped):
    """One filtered call that measures: the kernels would have written these counts."""
    choice = filter_choice.choose(c)
    assert choice.filtered and choice.counts is not None and choice.counts.tolist() == [0, 0]
    choice.counts.copy_(torch.tensor([computed, skipped], dtype=torch.int32))
    choice.record()


def test_few_skipped_runs_exact_and_probes_every_so_often():
    """Until a count arrives the filter runs; after one with s < MIN_SKIPPED, PROBE_EVERY - 1 exact
    calls, then a filtered one that measures again; after one with s >= MIN_SKIPPED, filtered."""
    c = torch.zeros(10, 4)
    _measured(c, 999, 1)  # s = 0.001
    with mock.patch.object(filter_choice, "PROBE_EVERY", 4):
        assert [filter_choice.choose(c).filtered for _ in range(3)] == [False] * 3
        _measured(c, 50, 50)  # the probe: s = 0.5
        assert all(filter_choice.choose(c).filtered for _ in range(5))
    assert filter_choice.state(c) == {"skipped": 0.5, "calls": 10, "filtered": 7}


def test_the_threshold_and_what_counts_nothing():
    """s exactly MIN_SKIPPED keeps the filter; counts of zero tiles (a path that counts nothing)
    leave the estimate as it was; MIN_SKIPPED = 0 always filters."""
    c = torch.zeros(10, 4)
    _measured(c, 0, 0)
    assert filter_choice.state(c)["skipped"] is None
    _measured(c, 9, 1)  # s = 0.1 = MIN_SKIPPED
    assert filter_choice.choose(c).filtered
    _measured(c, 10, 0)
    assert not filter_choice.choose(c).filtered
    with mock.patch.object(filter_choice, "MIN_SKIPPED", 0.0):
        assert filter_choice.choose(c).filtered


def test_a_measurement_on_its_way_is_not_doubled():
    """While the last measurement has not been read, a filtered call does not count again."""
    c = torch.zeros(10, 4)
    first = filter_choice.choose(c)
    first.record()
    with mock.patch.object(filter_choice, "_poll", lambda record: None):  # still on its way
        again = filter_choice.choose(c)
    assert again.filtered and again.counts is None


def test_records_are_per_weight_and_bounded():
    """Two weights (another address, shape or dtype) keep their own records; past MAX_RECORDS the
    least recently used is dropped."""
    a, b = torch.zeros(10, 4), torch.zeros(10, 4)
    _measured(a, 10, 0)
    assert not filter_choice.choose(a).filtered
    assert filter_choice.choose(b).filtered  # no record of b's data yet
    assert filter_choice.choose(a.view(5, 8)).filtered
    with mock.patch.object(filter_choice, "MAX_RECORDS", 2):
        filter_choice.choose(a)
        filter_choice.choose(torch.zeros(3, 3))
        filter_choice.choose(torch.zeros(2, 2))
        assert filter_choice.state(a) is None
    assert filter_choice.state(torch.zeros(1, 1)) is None


def test_torch_determinism_always_filters():
    """Under torch.use_deterministic_algorithms(True) the choice, which follows the device's timing,
    is not made: every call filters and nothing is counted."""
    c = torch.zeros(10, 4)
    _measured(c, 10, 0)
    torch.use_deterministic_algorithms(True)
    try:
        choice = filter_choice.choose(c)
    finally:
        torch.use_deterministic_algorithms(False)
    assert choice.filtered and choice.counts is None
    assert not filter_choice.choose(c).filtered


@interpreter
def test_the_op_runs_exact_where_the_filter_skipped_nothing():
    """linear_cross_entropy(exact=False) on the Triton path (the interpreter): on data the filter
    cannot skip (a flat softmax), the first backward runs filtered and counts s = 0, the next runs
    exact -- bit for bit exact mode's gradients; on peaked data (s = 0.2) every backward filters, and
    the gradients differ from exact mode's."""
    gen = torch.Generator().manual_seed(1)
    peaked_e = (torch.randn(40, 48, generator=gen) * 60 / 48**0.5).half()
    c0 = (torch.randn(150, 48, generator=gen) / 48**0.5).half()
    flat_e = peaked_e * 0.01

    def grads(e0, c, **options):
        e = e0.clone().requires_grad_()
        c.grad = None
        linear_cross_entropy(e, c, (e0.float() @ c0.float().T).argmax(1), impl="triton", **options).backward()
        return e.grad, c.grad

    for e0, s, filtered_calls in ((flat_e, 0.0, 1), (peaked_e, None, 2)):
        c = c0.clone().requires_grad_()
        exact = grads(e0, c)
        runs = [grads(e0, c, exact=False) for _ in range(2)]
        state = filter_choice.state(c)
        print(state)
        assert state["calls"] == 2 and state["filtered"] == filtered_calls
        if s is not None:
            assert state["skipped"] == s
            assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, exact))
        else:
            assert state["skipped"] == 0.2
            assert not torch.equal(runs[1][0], exact[0])
            assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))


@pytest.mark.gpu
def test_on_the_gpu_the_counts_arrive_without_a_sync():
    """On a GPU the counts come back through a pinned buffer and an event: right after a filtered
    backward of a flat softmax (s = 0) the next call may still filter (its count not read yet), and
    once the device has finished the next runs exact, bit for bit exact mode's gradients; LM-like
    data at the GPU's tiles skip much more than MIN_SKIPPED and keep the filter on."""
    from cce_inductor.testing import make_inputs

    for regime, filtered_after in (("uniform", False), ("lm", True)):
        x = make_inputs(regime, 2048, 512, 65536, device="cuda", seed=3)
        e0 = x.e * 1.5 if regime == "lm" else x.e  # peaked enough at D = 512 (see test_kernels_gpu)
        c = x.c.clone().requires_grad_()

        def grads(**options):
            e = e0.clone().requires_grad_()
            c.grad = None
            linear_cross_entropy(e, c, x.targets, **options).backward()
            return e.grad, c.grad

        exact = grads()
        grads(exact=False)
        grads(exact=False)  # may or may not have seen the first count
        torch.cuda.synchronize()
        after = grads(exact=False)
        state = filter_choice.state(c)
        print(regime, state)
        assert state["calls"] == 3 and (state["skipped"] >= filter_choice.MIN_SKIPPED) == filtered_after
        assert all(torch.equal(a, b) for a, b in zip(after, exact)) != filtered_after

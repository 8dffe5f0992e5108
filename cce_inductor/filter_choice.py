"""Whether a filtered backward (``exact=False``) runs its filter, from how much it skipped lately.

The filtered backward replaces cuBLAS's dE GEMM (and with ``filter_dc`` its dC GEMM) by Triton GEMMs
over the tiles the filter keeps. With every tile kept those are somewhat slower than cuBLAS's, so the
filter pays only where it skips enough tiles; where it skips few, the exact backward is faster and
at least as accurate (it drops nothing). docs/RESULTS.md has the measurements.

So each filtered backward counts the tiles it skips (``tile_counts``), copies the two counts to the
host without waiting (a pinned buffer and an event), and a later call reads them once the event has
passed (``Event.query``: never a device sync). While the latest skipped fraction is below
``MIN_SKIPPED`` the backward runs exact, except every ``PROBE_EVERY``-th call, which runs filtered to
measure again (the data can grow peaked as training goes on). Until a first count has arrived the
filter runs. Either choice meets the filter's contract (each token loses less than FILTER_EPS of its
gradient scale; exact loses nothing), but the two give different gradients, so:
  * with ``torch.use_deterministic_algorithms(True)`` the filter always runs (the choice follows
    the device's timing);
  * while a CUDA graph is being captured the filter always runs and nothing is counted (a captured
    choice would be replayed as it was).
The state is one record per classifier weight (its device, address, shape and dtype), so that two
models never share one; at most ``MAX_RECORDS`` are kept, the least recently used dropped first.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

# The filtered backward runs where the latest measured fraction of skipped tiles is at least this:
# one threshold for exact=False and filter_dc, between the two modes' break-even fractions against
# exact mode (docs/PERF_NOTES.md).
MIN_SKIPPED = 0.1
# While exact is chosen, every this-many-th call runs filtered, to measure s again.
PROBE_EVERY = 32
MAX_RECORDS = 64


@dataclass
class _Record:
    skipped: float | None = None  # the latest measured fraction of skipped tiles
    pending: tuple | None = None  # (host counts, event or None) of a measurement not read yet
    exact_calls: int = 0  # calls run exact since the last filtered one
    calls: int = 0  # for inspection: backward calls seen, and how many ran filtered
    filtered: int = 0


@dataclass
class Choice:
    """One backward call's choice: ``filtered``, and where it measures, ``counts`` (int32 (2,),
    zeroed: the kernels' ``tile_counts``), which ``record`` hands to the host after the call."""
    filtered: bool
    counts: Tensor | None = None
    _record: _Record | None = field(default=None, repr=False)

    def record(self) -> None:
        """Start the counts' copy to the host (after the backward's kernels are enqueued)."""
        if self.counts is None or self._record is None:
            return
        if self.counts.device.type == "cuda":
            host = torch.empty(2, dtype=torch.int32, pin_memory=True)
            host.copy_(self.counts, non_blocking=True)  # on the counts' device's current stream
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.counts.device))
            self._record.pending = (host, event)
        else:  # the CPU (the interpreter): the counts are there once the kernels have run
            self._record.pending = (self.counts, None)


_records: collections.OrderedDict = collections.OrderedDict()


def _key(c: Tensor) -> tuple:
    return (c.device, c.data_ptr(), tuple(c.shape), c.dtype)


def _poll(record: _Record) -> None:
    """Read a finished measurement (no wait: an unfinished one is left for a later call)."""
    if record.pending is None:
        return
    host, event = record.pending
    if event is not None and not event.query():
        return
    record.pending = None
    computed, skipped = (int(x) for x in host.tolist())
    if computed + skipped > 0:  # a path that counts nothing leaves the estimate as it was
        record.skipped = skipped / (computed + skipped)


def choose(c: Tensor) -> Choice:
    """The choice for a filtered backward of the classifier weight ``c`` (see the module docstring)."""
    if torch.are_deterministic_algorithms_enabled():
        return Choice(True)
    if c.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return Choice(True)
    key = _key(c)
    record = _records.get(key)
    if record is None:
        record = _records[key] = _Record()
        while len(_records) > MAX_RECORDS:
            _records.popitem(last=False)
    else:
        _records.move_to_end(key)
    _poll(record)
    record.calls += 1
    low = record.skipped is not None and record.skipped < MIN_SKIPPED
    if low and record.exact_calls + 1 < PROBE_EVERY:
        record.exact_calls += 1
        return Choice(False)
    record.exact_calls = 0
    record.filtered += 1
    if record.pending is not None:  # the last measurement is still on its way: do not pile them up
        return Choice(True)
    return Choice(True, torch.zeros(2, dtype=torch.int32, device=c.device), record)


def state(c: Tensor) -> dict | None:
    """For inspection (benchmarks, tests): the record of weight ``c`` -- the latest skipped fraction,
    the backward calls seen and how many ran filtered -- or None if it has none."""
    record = _records.get(_key(c))
    if record is None:
        return None
    _poll(record)
    return {"skipped": record.skipped, "calls": record.calls, "filtered": record.filtered}


def reset() -> None:
    """Forget every record (tests)."""
    _records.clear()


@contextlib.contextmanager
def records(store: collections.OrderedDict):
    """Keep the records in ``store`` instead of the process's for the duration (a benchmark keeps
    one store per method, so that methods timed in turn on one weight do not share a record)."""
    global _records
    saved, _records = _records, store
    try:
        yield store
    finally:
        _records = saved

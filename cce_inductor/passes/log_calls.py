"""Hugging Face's once-only log calls, traced through instead of breaking the graph.

transformers adds ``warning_once`` and ``info_once`` to every ``logging.Logger``. Dynamo cannot
trace a logger method and breaks the graph at one: ``GPT2LMHeadModel`` (``loss_type=None``) calls
``logger.warning_once`` in its ``loss_function`` property, between the head and the loss, so the
logits reach the loss as an input of the next graph, where the rewrite cannot see the projection.

Dynamo skips the functions listed in ``torch._dynamo.config.ignore_logging_functions``
(``ignore_logger_methods`` before that name existed; torch 2.6 has it): a skipped call does not run
in compiled code (its message is not printed there) and the graph stays whole. Only these two
functions are added -- each logs a message at most once per process anyway -- never one of
``logging``'s own methods, and nothing is ever removed or replaced, so two compiled models cannot
disagree about the setting. torch gives a backend chosen by name no hook that runs before Dynamo
traces, so the setting cannot be scoped to one compile: it holds for the process, plain
torch.compile included, from the moment the backend, ``enable()`` or ``explain()`` first runs (or
``cce_inductor`` is imported) with transformers imported.
"""

from __future__ import annotations

import functools
import sys

import torch

ONCE_ONLY = ("warning_once", "info_once")


def ignore_setting() -> tuple[str, set] | None:
    """(name, the set) of Dynamo's setting of logging functions to skip; None where it is missing."""
    config = torch._dynamo.config
    for name in ("ignore_logging_functions", "ignore_logger_methods"):
        value = getattr(config, name, None)
        if isinstance(value, set):
            return name, value
    return None


def _probe(*args, **kwargs) -> None:
    """A function added to the setting for a moment, to see that torch copes with it."""


@functools.lru_cache(maxsize=1)
def setting_usable() -> bool:
    """Whether torch takes functions in the setting: torch 2.11 records each compile's Dynamo
    settings as JSON and, where ``ignore_logging_functions`` holds a function, logs an error (with
    its traceback) at every compile instead. Tried once, with a function of ours put back out."""
    setting = ignore_setting()
    if setting is None:
        return False
    record = getattr(torch._dynamo.utils, "_get_dynamo_config_for_logging", None)
    if record is None:
        return True
    setting[1].add(_probe)
    try:
        record()
    except Exception:  # noqa: BLE001 - any failure means: do not add functions there
        return False
    finally:
        setting[1].discard(_probe)
    return True


def trace_through_once_logging() -> bool:
    """Add transformers' ``warning_once`` / ``info_once`` to Dynamo's logging functions to skip,
    where transformers is imported and torch has a usable setting; whether they are there."""
    module = sys.modules.get("transformers.utils.logging")
    if module is None or not setting_usable():
        return False
    ignored = ignore_setting()[1]
    for name in ONCE_ONLY:
        fn = getattr(module, name, None)
        if callable(fn) and fn not in ignored:
            ignored.add(fn)
    return True

"""The torch.compile graph rewrite (placeholder until the pass lands)."""


def enable(**options):
    raise NotImplementedError


def disable():
    raise NotImplementedError


def explain(fn, *args, **kwargs):
    raise NotImplementedError

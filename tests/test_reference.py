"""The readable reference of the gradient filter (reference.filtered_backward), which the kernels'
filtered paths are tested against: pure torch, float64."""

import math

import pytest
import torch

from cce_inductor import reference


def _case(n=40, d=24, v=160, shared=0.0, seed=0):
    """Peaked logits (std ~30) with a bias and an ignored token; ``shared``: the part of every row of
    E along one common direction (hidden states of a language model share one)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64) * 30.0
    e = (1 - shared) * e + shared * torch.randn(1, d, generator=g, dtype=torch.float64) * 30.0
    c = torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    y = (e @ c.T + b).argmax(1)
    y[3] = -100
    _, lse = reference.chunked_forward(e, c, b, y, -100, 0.0, 0.0)
    gl, gs = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64) * 0.1
    return e, c, b, y, lse, gl, gs


def _grads(case, eps, dc_filter, tile_n=16, tile_v=16):
    e, c, b, y, lse, gl, gs = case
    return reference.filtered_backward(e, c, b, y, lse, gl, gs, -100, 0.0, 0.0, eps, tile_n, tile_v, dc_filter)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_filter_off_is_the_chunked_backward():
    """eps = 0 keeps every tile with any mass (the others hold dz = 0): the gradients of
    chunked_backward, computed in float64 for float64 inputs."""
    case = _case()
    e, c, b, y, lse, gl, gs = case
    want = reference.chunked_backward(e, c, b, y, lse, gl, gs, -100, 0.0, 0.0, True, True, True)
    for dc_filter in ("exact", "dropped", "corrected"):
        got = _grads(case, 0.0, dc_filter)
        for a, w in zip(got[:3], want):
            assert _rel(a, w) < 1e-12


def test_skipped_tiles_are_dropped_from_de_within_the_bound():
    """Per token, |dE_i error| <= eps w_i max_j |C_j| (w_i = |g_i + grad_lse_i| + |g_i|); dbias exact."""
    case = _case()
    eps = 0.125
    exact, filtered = _grads(case, 0.0, "exact"), _grads(case, eps, "exact")
    _, c, _, y, _, gl, gs = case
    assert 0 < int((~filtered[3]).sum()) < filtered[3].numel()
    g = torch.where(y != -100, gl, torch.zeros(()))
    w = (g + gs).abs() + g.abs()
    err = (filtered[0] - exact[0]).norm(dim=1)
    assert err.max() > 0 and (err <= eps * w * c.norm(dim=1).max() * (1 + 1e-9)).all()
    assert torch.equal(filtered[1], exact[1]) and torch.equal(filtered[2], exact[2])


def test_corrected_dc_is_exact_where_rows_are_constant_within_a_tile():
    """The stand-in colsum(dz)^T mean(E rows) is the skipped tile's dC term itself when its rows of E
    are all one row; dropped, the same terms are lost."""
    e, c, b, y, lse, gl, gs = _case()
    e = e[::16].repeat_interleave(16, 0)[: e.shape[0]]  # 16-token tiles of one row each
    y = (e @ c.T + b).argmax(1)
    _, lse = reference.chunked_forward(e, c, b, y, -100, 0.0, 0.0)
    case = (e, c, b, y, lse, gl, gs)
    exact, corrected, dropped = (_grads(case, eps, f) for eps, f in ((0.0, "exact"), (0.125, "corrected"),
                                                                      (0.125, "dropped")))
    assert int((~corrected[3]).sum()) > 0
    assert _rel(corrected[1], exact[1]) < 1e-12 < _rel(dropped[1], exact[1])


def test_corrected_dc_beats_dropped_where_rows_share_a_direction():
    """Rows of E with a common direction (80% of each row): the stand-in carries it, and the
    corrected dC is several times nearer the exact one than the dropped dC is."""
    case = _case(shared=0.8)
    exact, corrected, dropped = (_grads(case, eps, f) for eps, f in ((0.0, "exact"), (0.125, "corrected"),
                                                                      (0.125, "dropped")))
    assert int((~corrected[3]).sum()) > 0
    assert _rel(corrected[1], exact[1]) < 0.25 * _rel(dropped[1], exact[1])


def test_refuses_an_unknown_dc_filter():
    with pytest.raises(ValueError, match="dc_filter"):
        _grads(_case(n=4, v=8), 0.1, "approximate")

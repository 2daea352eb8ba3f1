import math

import pytest

from rosa_scale.schedule import lr_factor


def _curve(**kw):
    return [lr_factor(s, **kw) for s in range(kw["total_steps"])]


def test_warmup_then_cosine_to_zero():
    f = _curve(total_steps=100, warmup_steps=4, schedule="cosine")
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 95 / 96)))


def test_linear_and_constant():
    assert _curve(total_steps=10, warmup_steps=0, schedule="linear")[5] == pytest.approx(0.5)
    assert set(_curve(total_steps=10, warmup_steps=0, schedule="constant")) == {1.0}


def test_rewarm_after_each_resample_only():
    f = _curve(total_steps=30, warmup_steps=0, schedule="constant", resample_every=10, rewarm_steps=3)
    assert f[:10] == [1.0] * 10  # no re-warmup before the first resample
    assert f[10:14] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[20:24] == pytest.approx([0.25, 0.5, 0.75, 1.0])

"""The vectorisable tanh functions against NumPy's and libm's, with their edge cases."""

import math

import numpy as np
import pytest
from numba import njit

from fastrnn.kernels.numba.fast_tanh import _CLAMP, _ONE_FLOAT32, _SMALL, tanh_float32, tanh_float64

MAX_ULPS = 4


@njit(fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
def _apply_with(tanh, v):
    """``tanh`` over an array, in a loop LLVM vectorises as the kernels' loops do."""
    out = np.empty_like(v)
    for i in range(v.size):
        out[i] = tanh(v[i])
    return out


def _apply(v):
    return _apply_with(tanh_float64, v)


def _apply_float32(v):
    return _apply_with(tanh_float32, v)


def _ulps(out, ref):
    """|out - ref| in units of the last place of the smaller magnitude (the stricter unit)."""
    return np.abs(out - ref) / np.spacing(np.minimum(np.abs(out), np.abs(ref)))


def _grid():
    """Dense over [-30, 30], denser across the branch switch and log-spaced down to subnormals."""
    rng = np.random.default_rng(0)
    near = np.concatenate([_SMALL + np.linspace(-1e-3, 1e-3, 2001), [np.nextafter(_SMALL, 0), _SMALL]])
    tiny = np.concatenate([10.0 ** rng.uniform(-320, 0, 20000), [5e-324, 2.2250738585072014e-308, 1e-300]])
    half = np.concatenate([near, tiny, rng.uniform(0.0, 3.0, 50000), [19.06, 19.07, _CLAMP, 1e308]])
    return np.concatenate([np.linspace(-30.0, 30.0, 200001), half, -half])


@pytest.mark.parametrize("reference", [np.tanh, np.vectorize(math.tanh)], ids=["np.tanh", "math.tanh"])
def test_matches_reference_within_ulps(reference):
    x = _grid()
    out, ref = _apply(x), reference(x)
    ulps = _ulps(out, ref)
    worst = np.argmax(ulps)
    assert ulps[worst] <= MAX_ULPS, f"{ulps[worst]:.1f} ulps at x={x[worst]!r}"
    assert np.abs(out - ref).max() <= 5e-16


def test_odd_and_exact_at_the_ends():
    x = _grid()
    out = _apply(x)
    np.testing.assert_array_equal(_apply(-x), -out)
    assert np.all(np.abs(out) <= 1.0)
    large = np.abs(x) >= 19.07  # where float64 tanh rounds to 1
    np.testing.assert_array_equal(out[large], np.sign(x[large]))


def test_special_values():
    x = np.array([0.0, -0.0, 5e-324, -5e-324, np.inf, -np.inf, np.nan])
    out = _apply(x)
    np.testing.assert_array_equal(out[:4], x[:4])
    np.testing.assert_array_equal(np.signbit(out[:4]), np.signbit(x[:4]))  # tanh(-0.0) is -0.0
    np.testing.assert_array_equal(out[4:6], [1.0, -1.0])
    assert np.isnan(out[6])
    assert np.isnan(_apply(np.full(64, np.nan))).all()  # also down the vectorised path


def test_float32_is_within_its_fit_error_and_saturates_exactly():
    v = np.concatenate([np.linspace(-12, 12, 480_001), [_ONE_FLOAT32, 30.0, np.inf, 1e-30, 0.0]]).astype(np.float32)
    v = np.concatenate([v, -v])
    out, ref = _apply_float32(v), np.tanh(v.astype(np.float64))
    assert np.abs(out - ref).max() <= 4e-7  # the rational's fit error, ~3 float32 ulps at 1
    assert np.all(np.abs(out[np.abs(v) >= _ONE_FLOAT32]) == 1.0)
    assert np.array_equal(out, -_apply_float32(-v))
    assert np.isnan(_apply_float32(np.array([np.nan], np.float32))[0])

"""tanh for Numba kernels that LLVM can vectorise, unlike math.tanh (a scalar libm call).

Numba's on-disk cache of the kernels that inline these is keyed on the kernels' own file, so after
editing this one, delete kernels/numba/__pycache__ (or touch the cell modules) to recompile them.
"""

import math

import numpy as np
from numba import njit

# float32 tanh as x * P(x^2) / Q(x^2) on [-c, c], fitted for this project (max abs error 3.3e-7,
# relative 2.8e-7 in float32 arithmetic).
_CLAMP_FLOAT32 = np.float32(7.90531110763549805)
_P_FLOAT32 = tuple(
    np.float32(c)
    for c in (
        0.9999999221447464,
        0.1298079984097228,
        0.002987740520506569,
        9.900016666518573e-06,
        -1.4788625550028422e-08,
        2.379562957996432e-11,
    )
)
_Q_FLOAT32 = tuple(np.float32(c) for c in (1.0, 0.46314102049974815, 0.024035111828076185, 0.0002374897469839997))
# tanh(z) rounds to 1.0 in float32 from here on (1 - tanh z < 2^-25).
_ONE_FLOAT32 = np.float32(9.01)
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

# Below this |z| a rational in z^2 avoids the cancellation in 1 - 2/(e^2|z| + 1); at it tanh ~ 0.5,
# so that subtraction loses nothing above it.
_SMALL = 0.55
# From |z| ~ 19.06 on, 1 - 2/(e^2|z| + 1) rounds to 1.0, so clamping here still returns exactly
# 1.0 and keeps the exponent k below 63 for the int64 shift.
_CLAMP = 20.0
_INV_LN2 = 1.4426950408889634
# One-part ln 2 suffices (reassoc would fold a hi/lo split anyway): an error eps in r moves tanh
# by about 2 eps e^-2|z|, and eps grows only like k, so it stays far below an ulp.
_LN2 = 0.6931471805599453


@njit(inline="always", fastmath=_FASTMATH, nogil=True, cache=True)
def tanh_float32(z):
    if z != z:  # NaN in, NaN out (the clamp below would hide it)
        return z
    x = min(max(z, -_CLAMP_FLOAT32), _CLAMP_FLOAT32)
    t = x * x
    p0, p1, p2, p3, p4, p5 = _P_FLOAT32
    q0, q1, q2, q3 = _Q_FLOAT32
    p = ((((p5 * t + p4) * t + p3) * t + p2) * t + p1) * t + p0
    q = ((q3 * t + q2) * t + q1) * t + q0
    y = np.divide(x * p, q)  # not /: see the division note in tanh_float64 (q >= 1 here)
    # Past the fitted range the rational stays 4 ulps below 1; float32 tanh is exactly 1 there.
    return math.copysign(np.float32(1.0), z) if abs(z) >= _ONE_FLOAT32 else y


@njit(inline="always", fastmath=_FASTMATH, nogil=True, cache=True)
def tanh_float64(z):
    if z != z:  # NaN in, NaN out; int(NaN) below would be undefined (poison in LLVM)
        return z
    x = min(abs(z), _CLAMP)
    # Both cases give tanh|z| = a + b * n / d, so the vectorised loop, which computes both, pays
    # for one division.
    if x < _SMALL:
        # Pade [3/3] of (tanh z - z) / z^3 in t = z^2 (relative error 1.4e-17 here); its
        # coefficients are integers, so they are exact in float64.
        t = x * x
        a, b = x, x * t
        n = -(((t + 13860.0) * t + 1216215.0) * t + 18918900.0)
        d = ((14490.0 * t + 1392930.0) * t + 26351325.0) * t + 56756700.0
    else:
        # e^2x = 2^k e^r with |r| <= ln2 / 2, and e^r = (even + odd) / (even - odd), the Pade
        # [6/6] of exp (relative error 2e-19 here, integer coefficients), so that
        # tanh x = 1 - 2 / (e^2x + 1) = 1 - 2 (even - odd) / (2^k (even + odd) + even - odd).
        y = 2.0 * x
        k = int(y * _INV_LN2 + 0.5)  # round to nearest: y > 0
        r = y - k * _LN2
        s = r * r
        even = ((s + 840.0) * s + 75600.0) * s + 665280.0
        odd = r * ((42.0 * s + 10080.0) * s + 332640.0)
        a, b = 1.0, -2.0
        n = even - odd
        d = float(1 << k) * (even + odd) + n  # 2^k is exact: k <= 58
    # np.divide, unlike /, has no zero-division check (which would stop vectorisation); d > 0.
    return math.copysign(a + b * np.divide(n, d), z)

"""How plans show numbers: asymptotic growth of a cost formula, compact counts, relative change.

Shared by the text table (``plan.py``) and the HTML page (``html.py``).

Example:
    >>> human(12345678), change(200, 100), growth(4 * N**2 + 3 * N)
    ('12.3M', '-50.0%', 'N^2')
"""

from __future__ import annotations

import math

import sympy

from m2convert.layers.cost import B, N


def growth(expr) -> str:
    """Asymptotic order of a cost formula in N: 'N^2', 'N^1.5', 'N log N' or 'N'.

    Read from the log-log slope at very large N, where the leading term dominates.

    Example:
        >>> growth(4 * N**2 + 3 * N)
        'N^2'
    """
    if expr is None:
        return "-"
    f = sympy.sympify(expr).subs(B, 1)
    lo, hi = (float(f.subs(N, sympy.Integer(10) ** e).evalf()) for e in (40, 50))
    if lo <= 0 or hi <= 0:
        return "-"
    slope = (math.log(hi) - math.log(lo)) / (math.log(1e50) - math.log(1e40))
    return "N^2" if slope > 1.9 else "N^1.5" if slope > 1.4 else "N log N" if slope > 1.002 else "N"


def human(x: float) -> str:
    """A count with a unit suffix, three significant digits.

    Example:
        >>> human(12345678), human(950)
        ('12.3M', '950')
    """
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def change(before: float, after: float) -> str:
    """Relative change in percent, signed; '' when ``before`` is 0.

    Example:
        >>> change(1000, 518), change(0, 5)
        ('-48.2%', '')
    """
    return f"{(after - before) / before * 100:+.1f}%" if before else ""

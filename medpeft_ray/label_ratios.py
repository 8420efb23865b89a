"""When two label ratios are the same ratio: the one rule for data subsets, the store and warm starts.

Ratios are fractions in (0, 1] that travel through YAML, JSON and database floats (``0.1 + 0.2``
is not ``0.3``), so they are compared within a tolerance far below any ratio worth searching.
"""

from __future__ import annotations

#: two label ratios closer than this are the same ratio (SQL filters and pandas masks use it as is)
LABEL_RATIO_TOLERANCE = 1e-9


def same_label_ratio(a: float, b: float) -> bool:
    """Whether ``a`` and ``b`` are the same label ratio."""
    return abs(a - b) < LABEL_RATIO_TOLERANCE

"""Block arithmetic shared by every module that counts blocks."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``a / b`` rounded up, for ints ``a >= 0`` and ``b > 0``: the blocks ``a`` tokens fill."""
    return -(-a // b)

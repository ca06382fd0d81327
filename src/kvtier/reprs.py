"""``shown``: a value's repr in a refusal's message, where the repr itself may fail."""

from __future__ import annotations


def shown(value: object) -> str:
    """``repr(value)``; for a value whose repr raises ValueError (an int past Python's
    4,300-digit limit on int-to-str conversion, or a container holding one), what it is
    and how large. Pure.

    NOTE: a refusal's message showed the bad value with ``{value!r}``: for such an int the
    message itself raised ValueError ("Exceeds the limit (4300 digits) for integer string
    conversion"), naming no field: CacheConfig(max_events=10**5000) said only that."""
    try:
        return repr(value)
    except ValueError:
        if isinstance(value, int):
            return f"an int of {value.bit_length()} bits"
        return f"a {type(value).__name__} holding an int too long to print"


def shown_int(value: int) -> str:
    """``value`` with thousands separators where it can be printed, else ``shown``'s
    description. Pure."""
    return f"{value:,}" if value.bit_length() <= 4096 else shown(value)

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


# C0 and C1 control characters but tab and newline, each as its ``\xNN`` escape.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))
             if chr(code) not in "\t\n"}


def printable(text: str, encoding: str | None, terminal: bool,
              errors: str | None = None) -> str:
    """``text`` as a stream of ``encoding`` (None: UTF-8) and error handler ``errors``
    (None: strict) can write it, the characters it cannot hold (an emoji under ASCII, a
    lone surrogate from a file name that is no UTF-8) as backslash escapes; with
    ``terminal``, control characters too, but tab and newline, and lone surrogates
    whatever ``errors`` (``surrogateescape`` writes them as the raw bytes). Pure.

    NOTE: standard output writes strictly: a trace path, a workload name or a model's
    answer it could not encode ended any command in an internal error (status 70); and a
    model's answer (or a prompt, a file name) holding ESC or CSI sequences moved the
    cursor, recoloured or retitled the user's terminal."""
    if terminal:
        text = text.translate(_CONTROLS)
    if text.isascii():
        return text
    encoding = encoding or "utf-8"
    try:
        text.encode(encoding, "strict" if terminal else errors or "strict")
    except UnicodeEncodeError:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # an encoding or handler Python does not know: the stream fails
        return text
    return text

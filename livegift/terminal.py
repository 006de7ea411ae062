"""Text from the server, made safe to print on a terminal (``livegift watch`` and ``gift``).

A display name or a shout-out is whatever a user typed. Printed raw, an ESC or CSI
sequence in it could move the cursor, clear the screen, retitle the window, or (on some
terminals) write to the clipboard or answer back as typed input; a newline could forge a
line that looks like another event. :func:`safe` replaces every such character with a
visible escape (``\\x1b``, ``\\n``, ``\\u202e``) and keeps all printable text, emoji and
accents included. Pure: no I/O.
"""

from __future__ import annotations

import unicodedata

# Besides C0, DEL and C1 (category Cc): characters that reorder or hide what follows them
# (bidirectional overrides and isolates, "Trojan Source"), line and paragraph separators,
# and lone surrogates, which cannot even be encoded for printing.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, f"\\x{code:02x}")
    return f"\\u{code:04x}"


def unsafe(char: str) -> bool:
    """Would printing ``char`` raw do more than show a character?"""
    return char in _BIDI or unicodedata.category(char) in _UNSAFE_CATEGORIES


def safe(text: str) -> str:
    """``text`` with every character that is not plain printable text escaped."""
    if text.isprintable():
        return text  # the common case: nothing to look at twice
    return "".join(_escape(c) if unsafe(c) else c for c in text)

"""Strings from outside (result files of other hosts, guest output) made safe for a terminal.

A result file is data from elsewhere: a stack frame, phase name or error text
in it may hold ESC sequences that move the cursor, retitle the window, hide
lines or rewrite what was printed before. Everything printed from such a file
passes through :func:`printable` first.
"""

from __future__ import annotations

# C0 controls, DEL and C1 controls (0x80-0x9f: CSI, OSC... on terminals that honour
# 8-bit controls), and the bidirectional overrides that reorder what is shown.
_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0),
             0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPED = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
_MULTILINE = {c: e for c, e in _ESCAPED.items() if c not in (0x09, 0x0A)}


def printable(text: str, *, multiline: bool = False) -> str:
    """``text`` with every control character written as a visible escape (``\\x1b``).

    ``multiline`` keeps newlines and tabs (an error text shown as it was written).
    """
    return text.translate(_MULTILINE if multiline else _ESCAPED)


_JSON_ESCAPED = {c: f"\\u{c:04x}" for c in _CONTROLS if c >= 0x7F}


def json_printable(text: str) -> str:
    """JSON text with DEL, C1 and bidi controls written as ``\\uXXXX`` (still valid JSON).

    JSON writers escape C0 controls already, but pass these through raw.
    """
    return text.translate(_JSON_ESCAPED)

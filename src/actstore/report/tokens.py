"""Token strings as a reader should see them.

Tokenizers spell whitespace with marker characters (byte-level BPE: ``Ġ`` space, ``Ċ``
newline, ``ĉ`` tab; SentencePiece: ``▁`` space). The report shows them as visible
symbols so that " the" and "the" stay distinguishable in a table cell.
"""

from __future__ import annotations

_MARKERS = str.maketrans({"Ġ": "␣", "▁": "␣", "Ċ": "⏎", "ĉ": "⇥", "\n": "⏎", "\t": "⇥"})


def display_token(token: str) -> str:
    """``"Ġthe"`` -> ``"␣the"``; ``"Ċ"`` -> ``"⏎"``; empty stays empty."""
    return token.translate(_MARKERS)

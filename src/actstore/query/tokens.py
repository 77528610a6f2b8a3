"""Token strings as a reader should see them (the report's tables, the viewer's labels).

Tokenizers spell whitespace with marker characters (byte-level BPE: ``Ġ`` space, ``Ċ``
newline, ``ĉ`` tab; SentencePiece: ``▁`` space). Readers see them as visible symbols so
that " the" and "the" stay distinguishable in a table cell or a chart label.

>>> display_token("Ġthe"), display_token("Ċ")
('␣the', '⏎')
"""

from __future__ import annotations

from typing import Any

_MARKERS = str.maketrans({"Ġ": "␣", "▁": "␣", "Ċ": "⏎", "ĉ": "⇥", "\n": "⏎", "\t": "⇥"})


def display_token(token: str) -> str:
    """``"Ġthe"`` -> ``"␣the"``; ``"Ċ"`` -> ``"⏎"``; empty stays empty."""
    return token.translate(_MARKERS)


def display_position_tokens(run: Any) -> list[str]:
    """The token at each position of ``run`` as :func:`display_token` shows it ("" where
    the run's metadata does not name one); no array is read."""
    from actstore.query.analyses import position_tokens

    return [display_token(t) if t is not None else "" for t in position_tokens(run)]

"""The text a delimiter check reads: lookalikes folded onto the ASCII they imitate.

A model may read full-width `＜/data＞`, Cyrillic "dаta" (U+0430), `</\u200bdata>` or `&lt;/data&gt;` as
the end of a data block, though none is one byte for byte. Checks for delimiters therefore read the text
NFKC-normalised, with the common confusables of "<", "/" and the letters of "data" mapped to ASCII,
zero-width characters removed and HTML character references unescaped. Only checks read it: stored
text stays as the teacher wrote it, and neutralise() (template.py) changes only the text put into a prompt.
"""

from __future__ import annotations

import bisect
import html
import re
import unicodedata

# Confusables that NFKC leaves alone (full-width and mathematical forms it already folds).
CONFUSABLES = {
    "\u2039": "<", "\u3008": "<", "\u27e8": "<", "\u276e": "<", "\u02c2": "<", "\u1438": "<",  # ‹ 〈 ⟨ ❮ ˂ ᐸ
    "\u2215": "/", "\u2044": "/", "\u29f8": "/", "\u2571": "/",  # ∕ ⁄ ⧸ ╱
    "\u0430": "a", "\u0251": "a", "\u03b1": "a", "\u0410": "A", "\u0391": "A",  # а ɑ α А Α
    "\u0501": "d", "\u13a0": "D",  # ԁ Ꭰ
    "\u0442": "t", "\u03c4": "t", "\u0422": "T", "\u03a4": "T",  # т τ Т Τ
}
ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u180e\u034f")
# Non-ASCII characters and HTML character references (named ones need their ";", numeric ones may omit it).
_SPECIAL = re.compile(r"&(?:#[0-9]{1,7};?|#[xX][0-9a-fA-F]{1,6};?|[A-Za-z][A-Za-z0-9]{1,31};)|[^\x00-\x7f]")


def _fold_piece(piece: str) -> str:
    if piece[0] == "&":
        return html.unescape(piece)
    if piece in ZERO_WIDTH:
        return ""
    if piece in CONFUSABLES:
        return CONFUSABLES[piece]
    return "".join(CONFUSABLES.get(c, c) for c in unicodedata.normalize("NFKC", piece) if c not in ZERO_WIDTH)


def folded(text: str) -> str:
    """The text as a delimiter check reads it (identical for ASCII without character references)."""
    if _SPECIAL.search(text) is None:
        return text
    return _SPECIAL.sub(lambda m: _fold_piece(m.group()), text)


def find_folded(pattern: re.Pattern[str], text: str) -> list[int]:
    """For each match of `pattern` on folded(text): the offset in `text` just after the original character
    (or character reference) that folded into the match's first character."""
    if _SPECIAL.search(text) is None:
        return [m.start() + 1 for m in pattern.finditer(text)]
    # Spans of the folded text, in order: (folded start, original start, original end, literal ASCII run?)
    spans: list[tuple[int, int, int, bool]] = []
    out: list[str] = []
    at = last = 0
    for m in _SPECIAL.finditer(text):
        if m.start() > last:
            spans.append((at, last, m.start(), True))
            out.append(text[last : m.start()])
            at += m.start() - last
        piece = _fold_piece(m.group())
        spans.append((at, m.start(), m.end(), False))
        out.append(piece)
        at += len(piece)
        last = m.end()
    if last < len(text):
        spans.append((at, last, len(text), True))
        out.append(text[last:])
    starts = [span[0] for span in spans]
    ends = []
    for match in pattern.finditer("".join(out)):
        # The last span starting at or before the match holds it (a piece that folded to "" holds nothing).
        fold_start, orig_start, orig_end, literal = spans[bisect.bisect_right(starts, match.start()) - 1]
        ends.append(orig_start + match.start() - fold_start + 1 if literal else orig_end)
    return ends

"""The one kind of Console agentkd prints through: user and teacher text are shown verbatim.

Rich reads `[...]` in a str as markup and `:name:` as an emoji code, so a message holding a path such
as `bad/[red]x[/red].jsonl` or a hint such as `[prices."gpt-4o"]` would lose text. This console parses
neither; colour comes only from `labelled`, whose message part is plain text.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text


def plain_console() -> Console:
    """stderr, no markup, emoji or highlighting; soft wrap keeps error lines whole for people and greps."""
    return Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)


def labelled(label: str, style: str, message: str) -> Text:
    """`label` in `style`, then `message` exactly as given."""
    return Text.assemble((label, style), " ", message)

"""The text of a grounded prompt's last message and its cuts: "Passages:\n[1] title: text\n...
\n\nQuestion: q" built and parsed back, and text cut at a word boundary near a limit.

What `grounded.grounded_messages` writes and `grounded_fit.PromptFitter` shortens; torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PASSAGES_HEADER = "Passages:\n"
QUESTION_HEADER = "\n\nQuestion: "
LINE_START = re.compile(r"^\[(\d+)\] ", re.M)
# A passage line's "[i] " and its title up to the first ": " (`grounded._passage_line`); a
# longer "title" is the text's own ": ", and the text then starts after "[i] ".
LINE_HEADER = re.compile(r"\[\d+\] (?:[^\n]{0,100}?: )?")


def _snap(max_chars: int) -> int:
    """How many characters a cut may give up to land on a space. Further back, the text has no
    word boundary to speak of (CJK, Thai, a URL, code): it is cut hard rather than losing up to
    all of it. English words are shorter, so their cuts always land on a space."""
    return max(16, max_chars // 5)


def cut_text(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters (its start kept), at a word boundary when one
    is near the limit."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]  # one more: a space right after the limit is a clean cut
    cut = head.rfind(" ")
    if 0 < cut and max_chars - cut <= _snap(max_chars):
        return head[:cut].rstrip()
    return text[:max_chars].rstrip()


def cut_text_start(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters from its start (its end kept), at a word
    boundary when one is near the limit."""
    if len(text) <= max_chars:
        return text
    if max_chars < 1:
        return ""
    tail = text[-(max_chars + 1) :]  # one more: a space right before the limit is a clean cut
    cut = tail.find(" ")
    if 0 <= cut < len(tail) - 1 and cut <= _snap(max_chars):
        return tail[cut + 1 :].lstrip()
    return text[-max_chars:].lstrip()


def cut_line(line: str, max_chars: int) -> str:
    """A passage line ("[i] title: text") cut to at most `max_chars` characters: its header
    whole and its text's end cut; in less room than the header, cut as any text.

    Cutting the text alone keeps a cut from snapping back to the header's last space when the
    text has none (CJK): the passage would lose all of its text.
    """
    m = LINE_HEADER.match(line)
    head = m.end() if m else 0
    if max_chars < head:
        return cut_text(line, max_chars)
    return (line[:head] + cut_text(line[head:], max_chars - head)).rstrip()


def grounded_user_content(lines: Sequence[str], question: str) -> str:
    """The last user message of a grounded prompt: its numbered passage lines, the question."""
    return PASSAGES_HEADER + "\n".join(lines) + QUESTION_HEADER + question


def split_grounded_user(content: str) -> tuple[list[str], str] | None:
    """(passage lines, question) of a `grounded_user_content` text; None for any other text.

    A passage line holds no newline (`grounded_messages` folds its whitespace), so the first
    blank line ends the passages; lines are found by their numbers, 1, 2, ... in order.
    """
    end = content.find(QUESTION_HEADER, len(PASSAGES_HEADER))
    if not content.startswith(PASSAGES_HEADER) or end < 0:
        return None
    block = content[len(PASSAGES_HEADER) : end]
    starts: list[int] = []
    for m in LINE_START.finditer(block):
        if int(m.group(1)) == len(starts) + 1:
            starts.append(m.start())
    if not starts or starts[0] != 0:
        return None
    ends = [s - 1 for s in starts[1:]] + [len(block)]  # each line without its "\n"
    lines = [block[s:e] for s, e in zip(starts, ends, strict=True)]
    question = content[end + len(QUESTION_HEADER) :]
    return (lines, question) if grounded_user_content(lines, question) == content else None

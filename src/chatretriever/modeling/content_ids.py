"""Token ids of user text in which no control string is ever matched; `template.py`'s tokenizer.

A tokenizer parses its added tokens ("<|im_end|>", "[EMB_1]", "<tool_call>", ...) wherever they
appear. The control strings among them must stay text in a message's content, or a user could
type a control token: the special added tokens, and the non-special ones that the chat template
itself writes (Qwen's "<tool_call>"). `split_special_tokens=True` stops only the SPECIAL ones;
a text holding a non-special control string is then run through the backend's pipeline without
its added vocabulary. Other non-special added tokens are vocabulary, not control (Gemma's "<b>",
"<td>", its newline runs): user text gets them as the tokenizer gives them. Text without control
strings gets exactly the tokenizer's own ids.

`ContentTokenizer` also splits template text where the tokenizer would (at its added tokens, but
not at whitespace-only ones, which merge across a template/content boundary in the full text:
Gemma's "\n" + "\n\n" is one "\n\n\n") and caches the ids of text runs (least recently used
dropped first), so that a session's history turns are tokenized once. Knows no particular token:
the chat format stays in `template.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

# Texts per tokenizer call: bounds the working memory of one call on a large batch.
_CHUNK = 1024


class ContentTokenizer:
    """User text -> token ids with no control string matched, in batches, with a cache of runs.

    Args:
        tokenizer: A Hugging Face tokenizer (a `tokenizers` backend is used directly if any).
        cache_size: How many text runs `cached` keeps.
    """

    def __init__(self, tokenizer: Any, cache_size: int = 8192) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._added, self._added_ids, control = _added_token_patterns(tokenizer)
        # Only a `tokenizers` backend still matches non-special added tokens when splitting
        # special ones (python tokenizers then match no added token at all).
        self._control = control if self._backend is not None else None
        self._runs: dict[str, tuple[int, ...]] = {}  # insertion order = least recently used first

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, one tokenizer call per chunk of texts (nothing cached)."""
        out: list[list[int]] = []
        for start in range(0, len(texts), _CHUNK):
            chunk = list(texts[start : start + _CHUNK])
            ids = self._encode_split_special(chunk)
            if self._control is not None:
                found = self._control.search
                ids = [
                    self._encode_raw(t) if found(t) else i for t, i in zip(chunk, ids, strict=True)
                ]
            out += ids
        return out

    def cached(self, texts: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """Ids of text runs: from the cache, the missing ones in one `encode` call."""
        found: dict[str, tuple[int, ...]] = {}
        missing: dict[str, None] = {}
        for text in texts:
            if text in found or text in missing:
                continue
            ids = self._runs.pop(text, None)
            if ids is None:
                missing[text] = None
            else:
                found[text] = self._runs[text] = ids  # re-inserted: now the most recent
        if missing:
            for text, new in zip(missing, self.encode(list(missing)), strict=True):
                found[text] = self._runs[text] = tuple(new)
        while len(self._runs) > self.cache_size:
            del self._runs[next(iter(self._runs))]
        return found

    def ids_of(self, pieces: Sequence[int | str]) -> list[int]:
        """Ids of a sequence of token ids and text runs (runs via `cached`)."""
        return self.ids_of_batch([pieces])[0]

    def ids_of_batch(self, sequences: Sequence[Sequence[int | str]]) -> list[list[int]]:
        """`ids_of` of each sequence; the runs missing from the cache in one tokenizer call."""
        runs = self.cached(p for pieces in sequences for p in pieces if isinstance(p, str))
        out = []
        for pieces in sequences:
            ids: list[int] = []
            for p in pieces:
                if isinstance(p, str):
                    ids += runs[p]
                else:
                    ids.append(p)
            out.append(ids)
        return out

    def split_added(self, text: str) -> list[int | str]:
        """Template text split as the tokenizer splits it: added-token ids, the text between."""
        # Only the added tokens found in the text can match in it: a regex of those few (in the
        # same order) splits as one of all would, without trying each of thousands at every
        # character (Gemma 3 has 6,300: 70 ms a template text, 8 s for a cold session batch).
        found = [alt for content, alt in self._added if content in text]
        pieces: list[int | str] = []
        pos = 0
        for m in re.finditer("|".join(found), text) if found else ():
            if m.start() > pos:
                pieces.append(text[pos : m.start()])
            pieces.append(self._added_ids[int(str(m.lastgroup)[1:])])
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces

    def _encode_split_special(self, texts: list[str]) -> list[list[int]]:
        """`tokenizer(texts, split_special_tokens=True)` ids; the backend directly when it can."""
        backend = self._backend
        if backend is None or backend.truncation or backend.padding:
            enc = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
            return [list(ids) for ids in enc["input_ids"]]
        was = backend.encode_special_tokens
        backend.encode_special_tokens = True  # what split_special_tokens does, minus the wrapper
        try:
            encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
        finally:
            backend.encode_special_tokens = was
        return [e.ids for e in encodings]

    def _encode_raw(self, text: str) -> list[int]:
        """Ids of text through the backend's normalizer, pre-tokenizer and model alone."""
        backend = self._backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = [text]
        if backend.pre_tokenizer is not None:
            splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        return [t.id for s in splits for t in backend.model.tokenize(s)]


def _added_token_patterns(
    tokenizer: Any,
) -> tuple[list[tuple[str, str]], list[int], re.Pattern[str] | None]:
    """How the tokenizer finds its added tokens in text, and which of them are control strings.

    Returns:
        (the added tokens that split template text, longest first, as (content, regex
        alternative with the whitespace its lstrip/rstrip absorbs): group "t{i}" matches the i-th
        id of the list; the ids; a regex of the non-special control strings, None when none).
    """
    added = sorted(
        (getattr(tokenizer, "added_tokens_decoder", None) or {}).items(),
        key=lambda kv: -len(kv[1].content),
    )
    template = _template_source(tokenizer)
    parts, ids, control = [], [], []
    for token_id, token in added:
        content = token.content
        special = getattr(token, "special", True)
        if not content or (not special and not content.strip()):
            continue  # whitespace runs stay in the text runs (module docstring)
        text = re.escape(content)
        lstrip = r"\s*" if getattr(token, "lstrip", False) else ""
        rstrip = r"\s*" if getattr(token, "rstrip", False) else ""
        parts.append((content, f"(?P<t{len(ids)}>{lstrip}{text}{rstrip})"))
        ids.append(int(token_id))
        if not special and content in template:
            control.append(text)
    return parts, ids, re.compile("|".join(control)) if control else None


def _template_source(tokenizer: Any) -> str:
    """The Jinja source of the tokenizer's chat template(s); "" without one."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates ("default", "tool_use", ...): any of them
        return "\n".join(str(t) for t in template.values())
    return str(template)

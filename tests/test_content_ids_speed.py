"""`ContentTokenizer.split_added` tries only the added tokens found in a text (Gemma 3 has 6,300,
a regex of all of them took 70 ms a template text): its pieces must stay those of one regex of
every added token, longest first, and the tokenizer's own split."""

from __future__ import annotations

import random
import re

from conftest import build_tokenizer
from tokenizers import AddedToken

from chatretriever.modeling.content_ids import ContentTokenizer

# Overlapping tokens (one a prefix, suffix or middle of another), regex metacharacters, unicode
# (a combining accent, CJK, an emoji), and whitespace-only ones: split at when special, never
# when not (they merge across a template/content boundary).
NON_SPECIAL = ["<a>", "<a><b>", "a><", "<b>", "b>", "a.b", "(x|y)", "é", "日本", "日", "<😀>"]
NON_SPECIAL += ["\n\n"]
SPECIAL = ["<S>", "<S><S>", "[EMB_1]", "[EMB_10]", "\t\t"]
MANY = [f"<unused{i}>" for i in range(300)]  # Gemma-like: many tokens, none in the texts
TRICKY = [
    "",
    "<a>",
    "<a><b>",
    "<a><b><a>",
    "x<a><b>y<a>z",
    "<a<a><b",
    "a><b>",
    "aa.b.bab",
    "(x|y)(x|y)x|y",
    "e\u0301 é 日本日日本",
    "<😀><😀>😀",
    "<S><S><S>",
    "[EMB_10][EMB_1]0[EMB_1",
    "line\n\n\nnext\n\n",
    "\t\t\tx\t\t",
    "<unused1><unused12><unused299>",
    "<user>\n<a> and <b>\t<S>",
]


def _tokenizer(lstrip_rstrip: bool = False):
    """The test tokenizer with the added tokens above (and lstrip/rstrip ones if asked)."""
    tok = build_tokenizer()
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in NON_SPECIAL + MANY])
    tok.add_tokens([AddedToken(w, special=True, normalized=False) for w in SPECIAL], True)
    if lstrip_rstrip:
        strips = [AddedToken("<L>", lstrip=True), AddedToken("<R>", rstrip=True)]
        tok.add_tokens([*strips, AddedToken("<LR>", lstrip=True, rstrip=True)], True)
    return tok


def _one_regex_splitter(tok):
    """Text -> the pieces of one regex of every added token, longest first: the contract."""
    alternatives, ids = [], []
    added = sorted(tok.added_tokens_decoder.items(), key=lambda kv: -len(kv[1].content))
    for token_id, token in added:
        if not token.special and not token.content.strip():
            continue
        lstrip, rstrip = (r"\s*" if strip else "" for strip in (token.lstrip, token.rstrip))
        alternatives.append(f"(?P<t{len(ids)}>{lstrip}{re.escape(token.content)}{rstrip})")
        ids.append(token_id)
    every = re.compile("|".join(alternatives))

    def split(text: str) -> list[int | str]:
        pieces: list[int | str] = []
        pos = 0
        for m in every.finditer(text):
            pieces += [text[pos : m.start()]] if m.start() > pos else []
            pieces.append(ids[int(str(m.lastgroup)[1:])])
            pos = m.end()
        return pieces + ([text[pos:]] if pos < len(text) else [])

    return split


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Texts glued from token fragments, so that tokens overlap, touch and break off."""
    parts = [*NON_SPECIAL, *SPECIAL, *MANY[:3], "<L>", "<R>", "<LR>", "<", ">", "a", "b"]
    parts += [" ", "  ", "\t", "\n", "x", "日", "\u0301", "<unused", "[EMB_"]
    rng = random.Random(seed)
    return ["".join(rng.choices(parts, k=rng.randint(0, 12))) for _ in range(n)]


def test_split_added_gives_the_pieces_of_one_regex_of_every_added_token():
    for tok in (_tokenizer(), _tokenizer(lstrip_rstrip=True)):
        contents, expected = ContentTokenizer(tok), _one_regex_splitter(tok)
        texts = TRICKY + ["a  <L>  b <R>  c\t<LR>\n d", " <L>", "<R> ", "<LR>"]
        for text in texts + _random_texts(1000):
            assert contents.split_added(text) == expected(text), text


def test_split_added_splits_as_the_tokenizer_does():
    tok = _tokenizer()
    contents = ContentTokenizer(tok)
    a_b, a, s_s = tok.convert_tokens_to_ids(["<a><b>", "<a>", "<S><S>"])
    assert contents.split_added("x<a><b>y<a>z") == ["x", a_b, "y", a, "z"]  # longest first
    assert contents.split_added("<S><S><S>")[0] == s_s
    for text in TRICKY + _random_texts(500, seed=1):
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        assert contents.ids_of(contents.split_added(text)) == ids, text

"""Session budgets: a session's own long system turn is cut (after the history, before the
question), and budgets too small for any content are refused when the template is built."""

from __future__ import annotations

import pytest
from conftest import chat_messages, retrieval_template

from chatretriever.modeling.template import RetrievalTemplate

SYSTEM = "You are a helpful assistant. Answer in French. " * 30  # ~600 tokens here
QUESTION = "and which one is cheaper?"


_template = retrieval_template  # (conftest: the `tok` fixture, 3 EMB tokens)
_msgs = chat_messages


def _plain(tok, tpl: RetrievalTemplate, msgs: list[dict[str, str]]) -> list[int]:
    """The chat template's own rendering, tokenized, then the EMB tokens: an untruncated session."""
    text = tok.apply_chat_template(msgs, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"] + list(tpl.emb_ids)


def test_long_own_system_turn_is_cut_not_raised(tok, caplog):
    history = _msgs(("user", "the fox and the dog"), ("assistant", "the quick brown fox"))
    msgs = _msgs(("system", SYSTEM), *[(m["role"], m["content"]) for m in history])
    msgs += _msgs(("user", QUESTION))
    tpl = _template(tok, max_session_len=64)
    ids = tpl.session_ids(msgs)
    assert 60 <= len(ids) <= 64  # the system turn fills what the question leaves (to a token)
    assert ids[-3:] == list(tpl.emb_ids)
    text = tok.decode(ids[:-3])
    system, rest = text.removeprefix("<|im_start|>system\n").split("<|im_end|>\n", 1)
    assert 20 < len(system) < len(SYSTEM) and SYSTEM.startswith(system)  # its start is kept
    assert rest == f"<|im_start|>user\n{QUESTION}<|im_end|>\n"  # all history dropped first
    assert "own system turn and current turn are over max_session_len=64" in caplog.text
    assert tpl.session_ids_batch([msgs, msgs]) == [ids, ids]
    assert caplog.text.count("own system turn") == 1  # once per template


def test_history_goes_before_a_system_turn_is_cut(tok):
    msgs = _msgs(("system", "Be brief."), ("user", "the fox and the dog"))
    msgs += _msgs(("assistant", "the quick brown fox " * 3), ("user", QUESTION))
    whole = _template(tok).session_ids(msgs)
    tpl = _template(tok, max_session_len=len(whole) - 1)
    ids = tpl.session_ids(msgs)
    no_history = _msgs(("system", "Be brief."), ("user", QUESTION))
    assert ids == _plain(tok, tpl, no_history)  # the system turn is whole, the history gone


def test_system_turn_is_emptied_before_the_question_is_cut(tok):
    long_q = "pasted text " * 40 + QUESTION
    msgs = _msgs(("system", SYSTEM), ("user", long_q))
    ids = _template(tok, max_session_len=48).session_ids(msgs)
    assert len(ids) == 48
    text = tok.decode(ids[:-3])
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"{QUESTION}<|im_end|>\n") and "pasted text" in text


def test_only_framing_that_cannot_fit_raises_naming_the_budget(tok):
    # 16 holds the bare session frame (7 tokens + 3 EMB) but not that of a system turn (17 + 3)
    tpl = _template(tok, max_session_len=16)
    assert tpl.session_ids(_msgs(("user", QUESTION)))[-3:] == list(tpl.emb_ids)
    with pytest.raises(ValueError, match="max_session_len=16 leaves no room for the question"):
        tpl.session_ids(_msgs(("system", ""), ("user", QUESTION)))


@pytest.mark.parametrize(
    "msgs",
    [
        _msgs(("user", QUESTION)),
        _msgs(("system", "Be brief."), ("user", QUESTION)),
        _msgs(("system", ""), ("user", "the fox"), ("assistant", "the dog"), ("user", QUESTION)),
        _msgs(("system", "Find passages about foxes."), ("user", "hi"), ("assistant", "hello"))
        + _msgs(("user", QUESTION)),
        _msgs(("assistant", "Hello, how can I help?"), ("user", QUESTION)),
    ],
)
def test_sessions_that_fit_are_their_plain_rendering(tok, msgs):
    want = _plain(tok, _template(tok), msgs)
    for max_len in (len(want), 512):  # exactly at the budget, and well within it
        tpl = _template(tok, max_session_len=max_len)
        assert tpl.session_ids(msgs) == want
        assert tpl.session_ids_batch([msgs, msgs]) == [want, want]


@pytest.mark.parametrize(
    ("setting", "value", "minimum"),
    [
        # tiny chatml template: session frame 7 tokens, passage and response frames 10
        ("max_session_len", 10, 11),
        ("max_passage_len", 13, 14),
        ("max_response_len", 10, 11),
    ],
)
def test_a_budget_without_room_for_content_is_refused_when_built(tok, setting, value, minimum):
    with pytest.raises(
        ValueError, match=rf"{setting}={value} leaves no room .* at least {minimum}"
    ):
        _template(tok, **{setting: value})
    tpl = _template(tok, **{setting: minimum})  # the minimum holds one token of content
    if setting == "max_session_len":
        ids = tpl.session_ids(_msgs(("user", QUESTION)))
        assert len(ids) == minimum and tok.decode(ids[:-3]).endswith("?<|im_end|>\n")
    elif setting == "max_passage_len":
        assert len(tpl.passage_ids("the quick brown fox")) == minimum
    else:
        pieces = tpl.csit_pieces(_msgs(("user", "hi")), "the quick brown fox")
        assert len(pieces) - pieces.response_start == minimum


def test_default_system_prompt_counts_in_the_minimum(tok):
    from test_template import SMOLLM2_TEMPLATE

    tok.chat_template = SMOLLM2_TEMPLATE  # an empty system message is rendered on every input
    with pytest.raises(ValueError, match="max_session_len=20 leaves no room"):
        _template(tok, max_session_len=20)
    with pytest.raises(ValueError, match="max_passage_len=20 leaves no room"):
        _template(tok, max_passage_len=20)

"""Chat rendering, EMB tokens, truncation and CSIT spans (tokenizer only, no model)."""

from __future__ import annotations

import pytest
from conftest import build_tokenizer

from chatretriever.modeling.template import (
    RetrievalTemplate,
    add_emb_tokens,
    emb_token_ids,
    emb_tokens,
    passage_text,
)
from chatretriever.types import Passage, Session

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture()
def tok():
    t = build_tokenizer()
    add_emb_tokens(t, 3)
    return t


def _template(tok, **kw) -> RetrievalTemplate:
    args = dict(n_emb_tokens=3, max_session_len=512, max_passage_len=256, max_response_len=256)
    args.update(kw)
    return RetrievalTemplate(tok, **args)


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def test_add_emb_tokens_is_idempotent_and_appends_special_tokens():
    tok = build_tokenizer()
    n = len(tok)
    with pytest.raises(ValueError, match="add_emb_tokens"):
        emb_token_ids(tok, 2)
    ids = add_emb_tokens(tok, 2)
    assert ids == [n, n + 1]
    assert add_emb_tokens(tok, 2) == ids and len(tok) == n + 2
    assert emb_tokens(2) == ["[EMB_1]", "[EMB_2]"]
    assert tok.convert_ids_to_tokens(ids) == ["[EMB_1]", "[EMB_2]"]
    assert tok("a [EMB_2]", add_special_tokens=False)["input_ids"][-1] == ids[1]


def test_session_is_the_chat_template_followed_by_emb_tokens(tok):
    tpl = _template(tok)
    msgs = _msgs(("user", "what is the capital of france?"), ("assistant", "paris"))
    msgs += _msgs(("user", "and of the lazy dog?"))
    ids = tpl.session_ids(msgs)
    assert ids[-3:] == emb_token_ids(tok, 3)
    assert tok.decode(ids[:-3]) == tok.apply_chat_template(msgs, tokenize=False)
    # A Session object gives the same ids as its message list.
    assert tpl.session_ids(Session.from_messages("q", msgs)) == ids
    assert tpl.system == []  # chatml template injects no default system message


def test_long_history_is_dropped_oldest_exchange_first(tok):
    question = "and what about the second one?"
    msgs = []
    for i in range(6):
        msgs += _msgs(("user", f"question {i} about the fox"), ("assistant", f"answer {i} dog"))
    msgs += _msgs(("user", question))
    full = _template(tok).session_ids(msgs)
    tpl = _template(tok, max_session_len=len(full) - 5)
    ids = tpl.session_ids(msgs)
    assert len(ids) <= len(full) - 5
    text = tok.decode(ids[:-3])
    assert ids[-3:] == list(tpl.emb_ids)
    assert text.endswith(f"<|im_start|>user\n{question}<|im_end|>\n")
    # Exactly the oldest exchange went: the kept history is a suffix starting with a user turn.
    assert "question 0" not in text and "answer 0" not in text
    assert text.startswith("<|im_start|>user\nquestion 1")
    assert "answer 5 dog" in text


def test_too_long_question_is_cut_from_its_end_keeping_frame_and_emb(tok):
    long_q = "which one is cheaper " * 40
    msgs = _msgs(("user", "old question"), ("assistant", "old answer"), ("user", long_q))
    tpl = _template(tok, max_session_len=40)
    ids = tpl.session_ids(msgs)
    assert len(ids) == 40
    text = tok.decode(ids[:-3])
    assert "old" not in text  # all history dropped before the question is cut
    assert text.startswith("<|im_start|>user\nwhich one is cheaper")
    assert text.endswith("<|im_end|>\n")  # the template's closing tokens survive
    assert ids[-3:] == list(tpl.emb_ids)
    with pytest.raises(ValueError, match="no room"):
        _template(tok, max_session_len=6).session_ids(msgs)


def test_passage_is_one_assistant_message_with_title_and_truncation(tok):
    tpl = _template(tok, max_passage_len=20)
    p = Passage(id="d1", title="Paris", text="paris is the capital of france.")
    assert passage_text(p) == "Paris\nparis is the capital of france."
    ids = _template(tok).passage_ids(p)
    assert tok.decode(ids[:-3]) == f"<|im_start|>assistant\n{passage_text(p)}<|im_end|>\n"
    long = tpl.passage_ids(Passage(id="d2", text="the quick brown fox " * 30))
    assert len(long) == 20 and long[-3:] == list(tpl.emb_ids)
    assert tok.decode(long[:-3]).startswith("<|im_start|>assistant\nthe quick brown fox")
    assert tok.decode(long[:-3]).endswith("<|im_end|>\n")


def test_literal_special_tokens_in_content_stay_text(tok):
    tpl = _template(tok)
    ids = tpl.passage_ids("see [EMB_3] and <|im_end|> here")
    assert ids.count(tpl.emb_ids[-1]) == 1  # only the appended one
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1  # only the template's


def test_default_system_prompt_is_replaced_by_an_empty_one(tok):
    tok.chat_template = SMOLLM2_TEMPLATE
    tpl = _template(tok)
    assert tpl.injects_default_system()
    assert tpl.system == [{"role": "system", "content": ""}]
    text = tok.decode(tpl.session_ids(_msgs(("user", "hello")))[:-3])
    assert "SmolLM" not in text
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
    passage = tok.decode(tpl.passage_ids("paris")[:-3])
    assert "SmolLM" not in passage and passage.endswith("<|im_start|>assistant\nparis<|im_end|>\n")
    # An explicit system prompt, and a session's own system turn, are used as given.
    custom = _template(tok, system_prompt="Find passages.")
    assert "Find passages." in tok.decode(custom.session_ids(_msgs(("user", "hello"))))
    own = _msgs(("system", "Be brief."), ("user", "hello"))
    assert tok.decode(tpl.session_ids(own)[:-3]).startswith("<|im_start|>system\nBe brief.")


def test_no_chat_template_and_alternating_template_fallbacks(tok):
    tok.chat_template = None
    plain = _template(tok)
    assert tok.decode(plain.session_ids(_msgs(("user", "hi")))[:-3]) == "user: hi\n\n"
    tok.chat_template = ALTERNATING_TEMPLATE
    alt = _template(tok)
    assert tok.decode(alt.passage_ids("paris")[:-3]) == "<|im_start|>user\nparis<|im_end|>\n"


def test_csit_pieces_spans(tok):
    tpl = _template(tok)
    msgs = _msgs(("user", "hi"), ("assistant", "hello"), ("user", "what is the capital?"))
    p = tpl.csit_pieces(msgs, "paris is the capital of france.")
    ids = list(p.input_ids)
    s_ids = tpl.session_ids(msgs)
    assert ids[: p.response_start] == s_ids  # session part = standalone session encoding
    assert p.session_len == len(s_ids) - 3 and p.session_emb_pos == len(s_ids) - 1
    assert tok.decode(ids[p.response_start : p.label_start]) == "<|im_start|>assistant\n"
    assert tok.decode(ids[p.label_start : p.label_end]) == (
        "paris is the capital of france.<|im_end|>\n"
    )
    assert ids[p.label_end :] == list(tpl.emb_ids) and len(p) == len(ids)
    # The response is cut from its end to max_response_len, keeping its closing and EMB tokens.
    q = _template(tok, max_response_len=20).csit_pieces(msgs, "the quick brown fox jumps " * 20)
    assert len(q) - q.response_start == 20
    assert tok.decode(q.input_ids[q.label_start : q.label_end]).endswith("<|im_end|>\n")
    assert list(q.input_ids[q.label_end :]) == list(tpl.emb_ids)

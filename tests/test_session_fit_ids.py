"""A session that fits its budget gets exactly the ids the tokenizer gives its whole rendered text
(`session_fit`), also where the question's edges meet the template's framing: a template that
trims contents (Gemma, Llama 3), a token across the framing's "\\n" and the question's start
(Gemma's newline runs, SmolLM2's merges)."""

from __future__ import annotations

import random

import pytest
from conftest import CHAT_TEMPLATE, build_tokenizer, chat_messages

from chatretriever.modeling.sources import BUILTIN_MODELS
from chatretriever.modeling.template import RetrievalTemplate, add_emb_tokens
from chatretriever.types import Turn

QUESTION = "which one is cheaper?"
HISTORY = chat_messages(("user", "the fox and the dog"), ("assistant", "the quick brown fox"))
TRIM_TEMPLATE = CHAT_TEMPLATE.replace("m['content'] }}", "m['content'] | trim }}")


def _trimming_tokenizer():
    """The test tokenizer with a template that strips contents (as Gemma's and Llama 3's)."""
    tok = build_tokenizer()
    tok.chat_template = TRIM_TEMPLATE
    add_emb_tokens(tok, 3)
    return tok


def _merging_tokenizer():
    """The test tokenizer with tokens for runs of newlines (as Gemma's added "\\n\\n", ...): in the
    full text, a question's leading newlines join the framing's "user\\n" into one token."""
    tok = build_tokenizer()
    tok.add_tokens(["\n\n", "\n\n\n"])
    add_emb_tokens(tok, 3)
    return tok


def _chatml_tokenizer():
    tok = build_tokenizer()
    add_emb_tokens(tok, 3)
    return tok


def _template(tok, max_session_len: int = 512) -> RetrievalTemplate:
    return RetrievalTemplate(tok, n_emb_tokens=3, max_session_len=max_session_len)


def _whole(tpl: RetrievalTemplate, msgs: list[dict[str, str]]) -> list[int]:
    """The tokenizer's ids of the chat template's whole text, then the EMB tokens (the
    template's own system message, SmolLM2's empty one, where the session has none)."""
    system = [] if msgs[0]["role"] == "system" else tpl.system
    text = tpl.tokenizer.apply_chat_template([*system, *msgs], tokenize=False)
    return tpl.tokenizer(text, add_special_tokens=False)["input_ids"] + list(tpl.emb_ids)


def _pieces(tpl: RetrievalTemplate, msgs: list[dict[str, str]]) -> list[int]:
    """What the fitter gave before: the frame, the question tokenized alone, the EMB tokens."""
    pre, post = tpl.renderer.frames([[Turn(m["role"], m["content"]) for m in msgs]])[0]
    question = tpl.contents.encode([msgs[-1]["content"]])[0]
    return pre + question + post + list(tpl.emb_ids)


@pytest.mark.parametrize("question", [f" {QUESTION}", f"{QUESTION}\n\n", f"\n  {QUESTION} \t"])
@pytest.mark.parametrize("before", [[], HISTORY, chat_messages(("system", " Be brief.\n"))])
def test_a_trimming_template_gets_the_question_as_rendered(question, before):
    tpl = _template(_trimming_tokenizer())
    msgs = [*before, {"role": "user", "content": question}]
    ids = tpl.session_ids(msgs)
    assert ids == _whole(tpl, msgs)  # no token of the whitespace the template strips
    assert ids == _pieces(tpl, [*before, {"role": "user", "content": QUESTION}])


def test_a_cut_question_of_a_trimming_template_ends_as_rendered():
    tok = _trimming_tokenizer()
    long_q = "pasted text " * 40 + QUESTION + "\n\n"
    ids = _template(tok, max_session_len=32).session_ids(
        [*HISTORY, {"role": "user", "content": long_q}]
    )
    assert len(ids) == 32  # the question's cut is exact
    text = tok.decode(ids[:-3])
    assert text.startswith("<|im_start|>user\n") and "the fox" not in text  # history dropped
    assert text.endswith(f"{QUESTION}<|im_end|>\n")  # its end kept, with no "\n\n"


@pytest.mark.parametrize("question", [f"\n\n{QUESTION}", f"\n\n\n{QUESTION}\n\n"])
@pytest.mark.parametrize("before", [[], HISTORY])
def test_a_question_merging_with_its_framing_gets_the_whole_text_ids(question, before):
    tpl = _template(_merging_tokenizer())
    msgs = [*before, {"role": "user", "content": question}]
    ids = tpl.session_ids(msgs)
    assert ids == _whole(tpl, msgs)
    # the merge happens: the framing's newline and the question's are one token
    assert ids != _pieces(tpl, msgs)
    assert tpl.session_ids_batch([msgs, msgs]) == [ids, ids]


def test_history_is_chosen_with_the_question_tokenized_alone():
    # The documented limit: a session whose whole text just fits, but whose question alone is a
    # token longer, keeps an exchange less; what it keeps is still the whole text's ids.
    tpl = _template(_merging_tokenizer())
    question = {"role": "user", "content": f"\n\n{QUESTION}"}
    exact = len(_whole(tpl, [*HISTORY, question]))
    ids = _template(tpl.tokenizer, max_session_len=exact).session_ids([*HISTORY, question])
    assert ids == _whole(tpl, [question])
    roomy = _template(tpl.tokenizer, max_session_len=exact + 1).session_ids([*HISTORY, question])
    assert roomy == _whole(tpl, [*HISTORY, question])


_WORDS = ["what", "is", "the", "capital", "of", "france", "?", "paris", "0123", "é", "📚", "東京"]
_WORDS += ["fox", "-", "<b>", "<br>", "\n", "\n\n", " ", "  ", "\t"]


def _random_session(rng: random.Random) -> list[dict[str, str]]:
    def text() -> str:
        words = rng.choices(_WORDS, k=rng.randint(0, 12))
        edge = rng.choice(["", " ", "  ", "\n", "\n\n", "\n\n\n", " \n"])
        return (
            edge + "".join(w + rng.choice(["", " "]) for w in words) + rng.choice(["", " ", "\n"])
        )

    n = rng.randint(1, 7)
    roles = ["user" if i % 2 == 0 else "assistant" for i in range(n - 1)] + ["user"]
    msgs = [{"role": r, "content": text()} for r in roles]
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": text()})
    return msgs


@pytest.mark.parametrize("build", [_chatml_tokenizer, _trimming_tokenizer, _merging_tokenizer])
def test_every_session_that_fits_gets_the_whole_text_ids(build):
    tpl = _template(build(), max_session_len=4096)  # nothing is cut
    rng = random.Random(build.__name__)
    sessions = [_random_session(rng) for _ in range(150)]
    assert tpl.session_ids_batch(sessions) == [_whole(tpl, s) for s in sessions]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def builtin_template(request) -> RetrievalTemplate:
    """A built-in model's own tokenizer, offline; skipped where the model is not installed."""
    from transformers import AutoTokenizer

    from chatretriever.modeling.sources import resolve_model_dir

    if not BUILTIN_MODELS[request.param].source.available():
        pytest.skip(f"{request.param} is not installed")
    tok = AutoTokenizer.from_pretrained(resolve_model_dir(request.param), local_files_only=True)
    add_emb_tokens(tok, 3)
    return _template(tok)


# 20 of MTRAG's 507 questions start or end with a space; the last starts as SmolLM2 merges.
@pytest.mark.parametrize("question", ["Major characters ", " what is it?", "\n\nWhat is it?\n"])
def test_a_builtin_model_gets_the_whole_text_ids(builtin_template, question):
    tpl = builtin_template
    msgs = [*HISTORY, {"role": "user", "content": question}]
    assert tpl.session_ids(msgs) == _whole(tpl, msgs)


@pytest.mark.parametrize("text", ["  a passage about the fox \n", "\n\nthe dog\n", "plain"])
def test_passages_and_responses_are_stripped_only_where_the_template_trims(text):
    """A passage is a lone assistant message and a CSIT response an assistant turn: a trimming
    template renders their content stripped (Gemma's passages with edge whitespace got other ids
    than the template renders), a template that keeps it (SmolLM2's ChatML) keeps it as is."""
    trim = _template(_trimming_tokenizer())
    assert trim.passage_ids_batch([text]) == trim.passage_ids_batch([text.strip()])
    session = [Turn("user", QUESTION)]
    (edged,) = trim.csit_pieces_batch([session], [text])
    (stripped,) = trim.csit_pieces_batch([session], [text.strip()])
    assert edged == stripped
    keep = _template(_chatml_tokenizer())
    ids = keep.tokenizer(text, add_special_tokens=False)["input_ids"]
    pre, post = keep.renderer.passage_frame
    assert keep.passage_ids_batch([text])[0] == pre + ids + post + list(keep.emb_ids)
    if text != text.strip():
        assert keep.passage_ids_batch([text]) != keep.passage_ids_batch([text.strip()])

"""Which added tokens user text may yield (`modeling.content_ids`): control strings (special
tokens, and non-special ones the chat template writes) never; other non-special added tokens (as
Gemma's HTML tags and newline runs) exactly as the tokenizer gives them, whole prompts included."""

from __future__ import annotations

from conftest import CHAT_TEMPLATE, build_tokenizer
from tokenizers import AddedToken

from chatretriever.modeling.content_ids import ContentTokenizer
from chatretriever.modeling.grounded_fit import PromptFitter
from chatretriever.modeling.template import RetrievalTemplate, add_emb_tokens

# Gemma-like vocabulary: HTML tags and newline runs are added tokens, but not special ones
VOCABULARY = ["<b>", "</b>", "<td>", "\n", "\n\n", "\n\n\n"]
TOOL_CALL = "<tool_call>"


def _with_added(words: list[str], template: str = CHAT_TEMPLATE):
    """The test tokenizer with `words` as non-special added tokens and EMB tokens."""
    tok = build_tokenizer()
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in words])
    tok.chat_template = template
    add_emb_tokens(tok, 2)
    return tok


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _today(tok, prompt) -> list[int]:
    return _ids(tok, tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))


def test_added_tokens_outside_the_template_tokenize_as_the_tokenizer_does():
    tok = _with_added(VOCABULARY)
    texts = ["make it <b>bold</b>", "<td>1</td>", "para one.\n\npara two.", "a\n\n\n\nb", "end\n"]
    assert ContentTokenizer(tok).encode(texts) == [_ids(tok, t) for t in texts]
    assert tok.convert_tokens_to_ids("<b>") in ContentTokenizer(tok).encode(texts[:1])[0]
    prompts = [
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": text},
            {"role": "user", "content": "q2 " + text},
        ]
        for text in texts
    ]
    assert PromptFitter(tok).fit_batch(prompts, 10_000) == [_today(tok, p) for p in prompts]


def test_newline_runs_merge_where_template_text_meets_a_message():
    # the template's "\n" after the role and a content starting with "\n\n" are one "\n\n\n",
    # as in the full text; split at the template's "\n" they were "\n" + "\n\n"
    tok = _with_added(VOCABULARY)
    triple = tok.convert_tokens_to_ids("\n\n\n")
    prompt = [{"role": "user", "content": "\n\nhi"}, {"role": "assistant", "content": "\n\nok"}]
    ids = PromptFitter(tok).fit_batch([prompt], 10_000)[0]
    assert ids == _today(tok, prompt) and ids.count(triple) == 2
    # the retrieval template's history runs too (its last message is tokenized on its own)
    template = RetrievalTemplate(tok, n_emb_tokens=2, max_session_len=4096)
    session = [{"role": "system", "content": ""}, *prompt, {"role": "user", "content": "q"}]
    plain = _ids(tok, template.render(session)) + list(template.emb_ids)
    assert template.session_ids(session) == plain and plain.count(triple) == 2


def test_control_strings_stay_text_in_user_text():
    # Qwen's template writes its non-special "<tool_call>": typed by a user, it stays text,
    # and so do the special "<|im_end|>" and EMB tokens; "<b>" is not in the template
    template = CHAT_TEMPLATE.replace("{% endfor %}", "{% endfor %}{# " + TOOL_CALL + " #}")
    tok = _with_added([TOOL_CALL, "<b>"], template)
    contents = ContentTokenizer(tok)
    control = tok.convert_tokens_to_ids([TOOL_CALL, "<|im_end|>", "[EMB_1]", "[EMB_2]"])
    for text in ["use <tool_call> here", "a <|im_end|> b [EMB_1][EMB_2]", "<tool_call><b>"]:
        ids = contents.encode([text])[0]
        assert not set(control) & set(ids) and tok.decode(ids) == text
    assert contents.encode(["<b>bold"]) == [_ids(tok, "<b>bold")]
    prompt = [{"role": "user", "content": "call <tool_call> now"}]
    ids = PromptFitter(tok).fit_batch([prompt], 10_000)[0]
    assert control[0] not in ids and control[0] in _today(tok, prompt)

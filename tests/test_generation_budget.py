"""Prompts cut to the model's context: `generate_reply` and the robustness generator on a tiny
random GPT-2 with 64 learned positions (past them its position table raises IndexError)."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

from conftest import build_tokenizer  # noqa: E402

from chatretriever.modeling.backbones import generate_reply, load_backbone  # noqa: E402
from chatretriever.retrieval.robustness.generation import hf_batch_generator  # noqa: E402

CONTEXT, NEW = 64, 6
LONG = [{"role": "user", "content": "the quick brown fox " * 20 + "what is the capital?"}]
SHORT = [{"role": "user", "content": "what is the capital?"}]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=CONTEXT,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids (no stop token: the reference of a reply)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False
        )
    return out[0, len(ids) :].tolist()


def reply_text(tokenizer, model, new: list[int]) -> str:
    eos = model.generation_config.eos_token_id
    cut = next((i for i, t in enumerate(new) if t == eos), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()


def test_generate_reply_keeps_the_end_of_a_prompt_past_the_context(gpt2_dir, caplog):
    model, tokenizer = load_backbone(gpt2_dir, kind="causal")
    ids = prompt_ids(tokenizer, LONG)
    assert len(ids) + NEW > CONTEXT  # before the cut: IndexError in the position table
    end = ids[-(CONTEXT - NEW) :]  # the prompt's last tokens, its question and "assistant\n"
    expected = reply_text(tokenizer, model, greedy(model, end, NEW))
    with caplog.at_level(logging.WARNING):
        assert generate_reply(model, tokenizer, LONG, max_new_tokens=NEW) == expected
        generate_reply(model, tokenizer, LONG, max_new_tokens=NEW)
    warnings = [r for r in caplog.records if "its end kept" in r.getMessage()]
    assert len(warnings) == 1  # once per model, not once per call
    with pytest.raises(ValueError, match="fills the model's context of 64"):
        generate_reply(model, tokenizer, LONG, max_new_tokens=CONTEXT)


def test_generate_reply_leaves_a_prompt_that_fits_as_it_was(gpt2_dir):
    model, tokenizer = load_backbone(gpt2_dir, kind="causal")
    ids = prompt_ids(tokenizer, SHORT)
    expected = reply_text(tokenizer, model, greedy(model, ids, NEW))
    assert generate_reply(model, tokenizer, SHORT, max_new_tokens=NEW) == expected


def test_batched_generator_cuts_only_the_rows_past_the_context(gpt2_dir):
    generate = hf_batch_generator(str(gpt2_dir), max_new_tokens=NEW, temperature=0.0)
    model, tokenizer = generate.model, generate.tokenizer
    ends = [prompt_ids(tokenizer, m)[-(CONTEXT - NEW) :] for m in (LONG, SHORT)]
    alone = [tokenizer.decode(greedy(model, e, NEW), skip_special_tokens=True) for e in ends]
    # The short prompt is left-padded beside the long one; its reply is as it is alone.
    assert generate([LONG, SHORT], [0, 0]) == [t.strip() for t in alone]


def test_scored_options_read_the_end_of_a_prompt_past_the_context(gpt2_dir):
    generate = hf_batch_generator(str(gpt2_dir), temperature=0.0)
    model, tokenizer = generate.model, generate.tokenizer
    options = ["paris", "the capital"]
    tails = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    room = CONTEXT - (max(len(t) for t in tails) - 1)  # the last option token is never fed
    head = prompt_ids(tokenizer, LONG)
    assert len(head) > room
    expected = []
    for tail in tails:
        x = torch.tensor([head[-room:] + tail[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[0].float(), dim=-1)  # (T, V)
        steps = range(room - 1, room - 1 + len(tail))
        expected.append(sum(logp[t, tok].item() for t, tok in zip(steps, tail, strict=True)))
    assert generate.score([LONG], options)[0] == pytest.approx(expected, abs=1e-4)


def test_a_retriever_whose_budgets_pass_the_backbones_context_is_warned(tiny_llama_dir, caplog):
    """A session + response budget over the backbone's positions is named at load, not found as
    an IndexError (learned positions) or silent drift (rotary) on the first long input."""
    import logging

    from chatretriever.methods.chatretriever.model import ChatRetriever

    # the tiny Llama takes 512 positions
    with caplog.at_level(logging.WARNING, "chatretriever.modeling.emb_llm"):
        ChatRetriever.from_pretrained(tiny_llama_dir, max_session_len=400, max_response_len=200,
                                      max_passage_len=600)  # fmt: skip
    (message,) = [r.getMessage() for r in caplog.records if "context" in r.getMessage()]
    assert "max_session_len + max_response_len = 600" in message
    assert "max_passage_len = 600" in message and "512 positions" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, "chatretriever.modeling.emb_llm"):
        ChatRetriever.from_pretrained(tiny_llama_dir, max_session_len=256, max_response_len=256,
                                      max_passage_len=512)  # fmt: skip
    assert not [r for r in caplog.records if "context" in r.getMessage()]

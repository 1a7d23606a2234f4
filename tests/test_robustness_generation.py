"""The batched, seeded HF generator of the robustness evaluation on a tiny random Llama."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from chatretriever.modeling.backbones import generate_reply, load_backbone  # noqa: E402
from chatretriever.retrieval.robustness.generation import hf_batch_generator  # noqa: E402

CHATS = [
    [{"role": "user", "content": "Is the query reasonable?"}],
    [{"role": "user", "content": "Write two turns of context for a long question about doors"}],
]


def test_batched_greedy_equals_one_by_one_with_left_padding(tiny_llama_dir) -> None:
    generate = hf_batch_generator(str(tiny_llama_dir), max_new_tokens=6, temperature=0.0)
    model, tokenizer = load_backbone(tiny_llama_dir, kind="causal")
    alone = [generate_reply(model, tokenizer, c, max_new_tokens=6) for c in CHATS]
    assert generate(CHATS, [0, 0]) == alone  # the shorter prompt is left-padded in the batch
    short = [generate_reply(model, tokenizer, c, max_new_tokens=2) for c in CHATS]
    assert generate(CHATS, [0, 0], 2) == short  # a per-call cap (judgments need few tokens)


def test_sampling_is_reproducible_per_seed(tiny_llama_dir) -> None:
    generate = hf_batch_generator(str(tiny_llama_dir), max_new_tokens=8, temperature=1.0)
    first = generate([CHATS[0]] * 2, [3, 4])
    assert generate([CHATS[0]] * 2, [3, 4]) == first
    runs = {tuple(generate([CHATS[0]], [s])) for s in range(5)}
    assert len(runs) > 1  # seeds change a sampled reply


def test_score_is_each_options_log_likelihood_as_the_reply(tiny_llama_dir) -> None:
    import torch

    generate = hf_batch_generator(str(tiny_llama_dir), temperature=0.0)
    model, tok = generate.model, generate.tokenizer
    options = ["reasonable", "unreasonable"]
    got = generate.score(CHATS, options)  # left-padded: the two prompts differ in length
    for chat, row in zip(CHATS, got, strict=True):
        head = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        for option, value in zip(options, row, strict=True):
            tail = tok(option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([head_ids + tail])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
            want = sum(float(logp[len(head_ids) - 1 + j, t]) for j, t in enumerate(tail))
            assert value == pytest.approx(want, abs=1e-3)
    assert got[0] != got[1]


def test_a_last_assistant_message_is_continued_and_cut_at_the_stop(tiny_llama_dir) -> None:
    generate = hf_batch_generator(str(tiny_llama_dir), max_new_tokens=12, temperature=0.0)
    tok = generate.tokenizer
    started = [*CHATS[1], {"role": "assistant", "content": "Query1:"}]
    text = generate._text(started)
    opened = tok.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False)
    assert text == opened + "Query1:"  # the reply is continued, not closed and answered
    free = generate([started], [0])[0]
    stop = free[len(free) // 2]  # text the free reply reaches (a stop is any string)
    cut = generate([started], [0], None, stop)[0]
    assert stop not in cut and free.startswith(cut) and len(cut) < len(free)


def test_auto_dtype_is_bf16_only_where_it_is_native(monkeypatch) -> None:
    from chatretriever.modeling import precision

    assert precision.dtype_name(None) == precision.dtype_name("") == "float32"
    assert precision.dtype_name("fp16") == "fp16"  # a named dtype is kept
    with pytest.raises(ValueError, match="unknown dtype 'bogus'"):
        precision.dtype_name("bogus")  # told at once, not when the generator loads
    monkeypatch.setattr(precision, "native_bf16", lambda device: device.type == "cpu")
    assert precision.dtype_name("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.dtype_name("auto", "cpu") == "float32"

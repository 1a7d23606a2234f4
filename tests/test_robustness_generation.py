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

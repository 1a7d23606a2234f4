"""Sampled robustness generations depend on their own prompt and seed, never on their batch."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from chatretriever.retrieval.robustness.generation import (  # noqa: E402
    RobustnessLLM,
    batched,
    generation_key,
    hf_batch_generator,
)
from chatretriever.retrieval.robustness.sampling import (  # noqa: E402
    SAMPLER,
    RowSampler,
    item_seed,
)

QUESTIONS = [
    "How much is garage door opener repair?",
    "And a new one?",
    "Which brand lasts longest?",
    "Write two turns of context for a long question about doors and the people who fix them",
    "How much is garage door opener repair?",  # the same prompt twice: the same reply twice
]
CHATS = [[{"role": "user", "content": q}] for q in QUESTIONS]


def test_sampled_replies_are_the_same_in_any_batching(tiny_llama_dir) -> None:
    generate = hf_batch_generator(str(tiny_llama_dir), max_new_tokens=8, temperature=1.0)
    seeds = [0] * len(CHATS)  # as the evaluation asks: one seed shared by every item
    together = generate(CHATS, seeds)
    alone = [generate([c], [0])[0] for c in CHATS]
    assert together == alone  # batch of 5 (left-padded) == batches of 1
    order = [3, 0, 4, 2]  # a subset, in another order, beside other prompts
    assert generate([CHATS[i] for i in order], [0] * 4) == [together[i] for i in order]
    assert together[0] == together[4]
    assert len(set(together[:4])) > 1  # sampled, not one constant reply
    other_seed = generate(CHATS, [1] * len(CHATS))
    assert other_seed != together  # the seed does change what is drawn


def test_the_cached_llm_gives_the_same_replies_for_any_batch_size(tiny_llama_dir) -> None:
    generate = hf_batch_generator(str(tiny_llama_dir), max_new_tokens=8, temperature=1.0)
    runs = []
    for size in (1, 2, 5):
        llm = RobustnessLLM(generate, "tiny", batch_size=size, settings={"temperature": 1.0})
        runs.append(llm.generate(CHATS, [7] * len(CHATS), "response"))
        assert llm.stats.generated == len(CHATS)  # each run generated (no shared cache)
    assert runs[0] == runs[1] == runs[2]


def test_an_items_stream_seed_is_stable_and_tied_to_its_prompt_and_seed() -> None:
    chat = CHATS[0]
    # A fixed value: the same in every process. Changing the hash changes every sampled reply,
    # so it needs a new `SAMPLER` name (the cache would otherwise serve the old replies).
    assert item_seed(chat, 0) == 6841595535084479910
    assert SAMPLER == "per-item-v1"
    assert item_seed(chat, 1) != item_seed(chat, 0)
    assert item_seed(CHATS[1], 0) != item_seed(chat, 0)
    assert 0 <= item_seed(chat, 0) < 2**63  # a valid torch seed


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_a_sampler_refuses_a_temperature_that_is_not_positive(temperature) -> None:
    # 0 would divide the logits by zero: a temperature-0 (greedy) generator builds no sampler
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RowSampler([1], temperature, "cpu")
    assert RowSampler([1], 1e-3, "cpu").temperature == 1e-3  # any positive one is taken


class CountingSampler:
    """A generator that declares a per-item sampler and counts what it is asked."""

    sampler = SAMPLER

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompts, seeds, max_new_tokens=None, stop=None):
        self.calls += len(prompts)
        return ["new reply"] * len(prompts)


@pytest.mark.parametrize(("temperature", "reused"), [(0.7, False), (0.0, True)])
def test_replies_cached_before_the_per_item_sampler_are_not_served_when_sampling(
    tmp_path, temperature, reused
) -> None:
    settings = {"max_new_tokens": 96, "temperature": temperature}
    path = tmp_path / "generations.jsonl"
    before = batched(lambda messages: "old reply")  # a generator that names no sampler
    old = RobustnessLLM(before, "m", path, 8, 0, settings)
    old.generate(CHATS[:1], [0], "response")  # the key of a cache written before the fix
    old.close()
    assert generation_key(CHATS[0], "m", 0, settings) in path.read_text()
    fake = CountingSampler()
    llm = RobustnessLLM(fake, "m", path, 8, 0, settings)
    reply = llm.generate(CHATS[:1], [0], "response")
    llm.close()
    # A sampled reply of the batch-dependent procedure is drawn again; a greedy one did not
    # depend on its batch, so it is still read from the cache.
    assert reply == (["old reply"] if reused else ["new reply"])
    assert fake.calls == (0 if reused else 1)

"""Generation reads each prompt alone (no pad column computed) and decodes the batch with a
static cache (`modeling.generate_batching`): replies, scores and grounded answers are those of
the left-padded batch, in input order, and a sampled reply still depends only on its prompt and
its seed, never on its batch."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from chatretriever.modeling import grounded  # noqa: E402
from chatretriever.modeling.backbones import load_backbone  # noqa: E402
from chatretriever.modeling.generate_batching import (  # noqa: E402
    left_padded,
    prefilled_generate_inputs,
    prefilled_prompts,
    unpadded_rows,
)
from chatretriever.modeling.grounded import GroundedGenerator, grounded_messages  # noqa: E402
from chatretriever.retrieval.robustness import hf_generator  # noqa: E402

# Prompts of very different lengths: a batch of them is mostly padding on the short rows.
QUESTIONS = [
    "How much is garage door opener repair?",
    "And a new one?",
    "Write two turns of context for a long question about doors and the people who fix them, "
    "the brands they use, what they cost and how long a garage door opener lasts in a cold place",
    "Which brand lasts longest?",
    "How much is garage door opener repair?",  # the same prompt twice: the same reply twice
]
CHATS = [[{"role": "user", "content": q}] for q in QUESTIONS]
ROWS = [[5], [7, 8, 9, 10], [11 + i % 50 for i in range(23)], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


@pytest.fixture()
def padded_only(monkeypatch):
    """Forces the left-padded path everywhere (the reference the new path must equal)."""

    def off(*args):
        return None

    monkeypatch.setattr(hf_generator, "prefilled_generate_inputs", off)
    monkeypatch.setattr(hf_generator, "prefilled_prompts", off)
    monkeypatch.setattr(grounded, "prefilled_generate_inputs", off)
    return monkeypatch


def forward_shapes(model) -> list[tuple[int, ...]]:
    """Records the input_ids shape of every forward of `model` (instance attribute patch)."""
    shapes: list[tuple[int, ...]] = []
    forward = model.forward

    def recording(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    model.forward = recording
    return shapes


def test_rows_read_alone_decode_as_the_left_padded_batch(tiny_model_dir) -> None:
    from transformers import StaticCache

    model, _ = load_backbone(tiny_model_dir, kind="causal")
    inputs = prefilled_generate_inputs(model, ROWS, 0, 6)
    assert inputs is not None and isinstance(inputs["cache"], StaticCache)
    padded = left_padded(ROWS, 0, model.device)
    assert torch.equal(inputs["input_ids"], padded["input_ids"])
    assert torch.equal(inputs["attention_mask"], padded["attention_mask"])
    assert unpadded_rows(padded) == ROWS
    with torch.no_grad():
        fast = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
        slow = model.generate(**padded, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert fast.tolist() == slow.tolist()  # greedy, float32: token for token


def test_no_pad_column_is_read(tiny_llama_dir) -> None:
    model, _ = load_backbone(tiny_llama_dir, kind="causal")
    shapes = forward_shapes(model)
    inputs = prefilled_generate_inputs(model, ROWS, 0, 4)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    # Each prompt but its last token, alone (the one-token prompt has nothing to read), then
    # the batch's last column and three decoding steps: never a (B, T) padded block.
    reads = [(1, len(r) - 1) for r in ROWS if len(r) > 1]
    assert shapes == reads + [(len(ROWS), 1)] * 4


def hf_batch_generator_of(model_dir, temperature: float):
    from chatretriever.retrieval.robustness.generation import hf_batch_generator

    return hf_batch_generator(str(model_dir), max_new_tokens=8, temperature=temperature)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_replies_equal_the_padded_path_and_do_not_depend_on_the_batch(
    tiny_llama_dir, padded_only, temperature
) -> None:
    generate = hf_batch_generator_of(tiny_llama_dir, temperature)
    seeds = [3] * len(CHATS)
    padded = generate(CHATS, seeds)
    padded_only.undo()
    together = generate(CHATS, seeds)
    assert together == padded  # greedy and sampled, float32: the padded batch's replies
    assert together == [generate([c], [3])[0] for c in CHATS]  # per item, whatever the batch
    subset = generate([CHATS[i] for i in (2, 0, 3)], [3, 3, 3])
    assert subset == [together[i] for i in (2, 0, 3)]  # in input order
    assert together[0] == together[4]
    if temperature > 0:
        assert len(set(together[:4])) > 1  # sampled, not one constant reply


def test_a_continued_reply_with_a_stop_equals_the_padded_path(tiny_llama_dir, padded_only):
    generate = hf_batch_generator_of(tiny_llama_dir, 1.0)
    chats = [[*c, {"role": "assistant", "content": "Query1:"}] for c in CHATS]
    padded = generate(chats, [0] * len(chats), 6, "\n")
    padded_only.undo()
    assert generate(chats, [0] * len(chats), 6, "\n") == padded


def test_scores_equal_the_padded_path_with_each_prompt_read_alone(tiny_model_dir, padded_only):
    generate = hf_batch_generator_of(tiny_model_dir, 0.0)
    tok = generate.tokenizer
    lengths = [len(tok(generate._text(c), add_special_tokens=False)["input_ids"]) for c in CHATS]
    options = ["reasonable", "unreasonable", "no"]
    shapes = forward_shapes(generate.model)
    padded = generate.score(CHATS, options)
    assert shapes[0] == (len(CHATS), max(lengths))  # one padded block
    padded_only.undo()
    shapes.clear()
    fast = generate.score(CHATS, options)
    assert shapes[: len(CHATS)] == [(1, n) for n in lengths]  # each prompt alone, no padding
    for row, ref in zip(fast, padded, strict=True):
        assert row == pytest.approx(ref, abs=1e-5)


def test_grounded_answers_equal_the_padded_path_in_input_order(tiny_model_dir, padded_only):
    model, tokenizer = load_backbone(tiny_model_dir, kind="causal")
    gen = GroundedGenerator(model, tokenizer, max_new_tokens=6, batch_size=3)
    passages = ["paris is the capital of france.", "open settings and choose reset. " * 6]
    turns = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [grounded_messages(t, passages[: i % 3]) for i, t in enumerate(turns)]
    padded = gen.generate_ids(prompts)
    padded_only.undo()
    fast = gen.generate_ids(prompts)
    assert fast == padded
    assert fast == [gen.generate_ids([p])[0] for p in prompts]  # in input order


def test_models_whose_cache_does_not_allow_it_keep_the_padded_path(tiny_llama_dir) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
    )
    window = Gemma3ForCausalLM(config).eval()  # a sliding-window layer keeps only its end
    assert prefilled_generate_inputs(window, ROWS, 0, 4) is None
    assert prefilled_prompts(window, ROWS, 0) is None
    model, _ = load_backbone(tiny_llama_dir, kind="causal")
    assert prefilled_generate_inputs(model, [[5], [6]], 0, 4) is None  # nothing to read first
    model.generation_config.cache_implementation = "dynamic"  # generate refuses a cache beside
    assert prefilled_generate_inputs(model, ROWS, 0, 4) is None


def test_off_the_cpu_the_padded_batch_is_kept() -> None:
    """An accelerator reads the padded batch in one parallel forward: reading each prompt alone
    would serialise it, so off the CPU the helpers decline before touching the model."""
    import types

    import torch

    gpu_like = types.SimpleNamespace(device=torch.device("cuda"))
    assert prefilled_generate_inputs(gpu_like, ROWS, 0, 4) is None
    assert prefilled_prompts(gpu_like, ROWS, 0) is None

"""The inference fast path: token-budget batches, packing (and pooling under it), the bf16
inference copy, and that it encodes what the training forward encodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.methods.chatretriever.model import ChatRetriever
from chatretriever.modeling.collate import budget_batches, pack_rows, packed_batch
from chatretriever.modeling.fast_encode import FastEncodeSettings, default_settings, hardware_kind
from chatretriever.types import Passage

pytest.importorskip("peft")

PASSAGES = [
    Passage(id="p1", title="Paris", text="paris is the capital of france."),
    Passage(id="p2", text="open settings and choose reset to reset your password."),
    Passage(id="p3", text="the quick brown fox jumps over the lazy dog 0123456789 " * 3),
    Passage(id="p4", text="which one is cheaper?"),
    Passage(id="p5", text="a"),
]
SESSIONS = [
    [{"role": "user", "content": "what is the capital of france?"}],
    [
        {"role": "user", "content": "how do i reset my password?"},
        {"role": "assistant", "content": "open settings and choose reset."},
        {"role": "user", "content": "and in the cloud console?"},
    ],
]


def _retriever(model_dir, **cfg) -> ChatRetriever:
    config = RetrieverConfig(dtype="fp32", max_session_len=96, max_passage_len=64, **cfg)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    r = ChatRetriever.from_pretrained(model_dir, config=config, lora=lora, device="cpu")
    _perturb(r)
    return r


def _perturb(r: ChatRetriever, seed: int = 0) -> None:
    """Non-zero LoRA B matrices and EMB rows, so that a merge that dropped them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in r.model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _plain(r: ChatRetriever, fn: str, items: list, batch_size: int = 2) -> np.ndarray:
    r.encode_settings = FastEncodeSettings(enabled=False)
    try:
        return getattr(r, fn)(items, batch_size=batch_size)
    finally:
        r.encode_settings = None


def test_budget_batches_cover_every_text_within_the_budget():
    lengths = [5, 40, 12, 40, 3, 7, 100, 1]
    batches = budget_batches(lengths, budget=80, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 80
        assert lengths[b[0]] == max(lengths[i] for i in b)  # longest first
    assert batches[0] == [6]  # 100 tokens exceed the budget alone: a batch of its own
    assert [lengths[i] for i in batches[1]] == [40, 40]


def test_pack_rows_first_fit_decreasing():
    lengths = [6, 3, 5, 2, 9, 4]
    rows = pack_rows(lengths, row_len=10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert [[lengths[i] for i in r] for r in rows] == [[9], [6, 4], [5, 3, 2]]
    assert pack_rows([12, 1], row_len=10) == [[0], [1]]  # too long: alone


def test_packed_batch_mask_positions_and_last_tokens():
    batch = packed_batch([[[11, 12], [13, 14, 15]], [[21]]], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15], [21, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 0, 0, 0, 0]]
    assert batch["last"].tolist() == [[0, 1], [0, 4], [1, 0]]
    allowed = (batch["attention_mask"][:, 0] == 0).int().tolist()  # (R, L, L)
    assert allowed[0] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],  # the second text never sees the first
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert allowed[1] == [  # one text, then padding rows that see themselves only
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]


@torch.no_grad()
def test_fast_path_equals_the_training_forward_and_pools_right_under_packing(tiny_model_dir):
    r = _retriever(tiny_model_dir)
    plain = _plain(r, "encode_passages", PASSAGES)
    fast = r.encode_passages(PASSAGES, batch_size=8)
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    # Packed: several passages share a row; each must still pool its own last EMB token.
    r.encode_settings = FastEncodeSettings(pack=True, pack_len=128, token_budget=256)
    packed = r.encode_passages(PASSAGES, batch_size=8)
    rows = pack_rows([len(s) for s in r.template.passage_ids_batch(PASSAGES)], 128)
    assert any(len(row) > 1 for row in rows)  # really packed
    np.testing.assert_allclose(packed, plain, atol=1e-5)
    sessions = r.encode_sessions(SESSIONS)
    r.encode_settings = None
    np.testing.assert_allclose(sessions, _plain(r, "encode_sessions", SESSIONS), atol=1e-5)


@torch.no_grad()
def test_inference_copy_follows_weight_changes_and_leaves_the_model_alone(tiny_llama_dir):
    r = _retriever(tiny_llama_dir)
    before = r.encode_passages(PASSAGES)
    assert r.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == (
        torch.float32
    )  # the original model is neither merged nor cast
    _perturb(r, seed=1)  # a training step changes the adapter: a new copy is made
    after = r.encode_passages(PASSAGES)
    assert not np.allclose(before, after, atol=1e-3)
    np.testing.assert_allclose(after, _plain(r, "encode_passages", PASSAGES), atol=1e-5)


@torch.no_grad()
def test_bf16_inference_copy_casts_once_and_stays_close_to_fp32(tiny_model_dir):
    r = _retriever(tiny_model_dir, fp32_layers=1)
    fp32 = r.encode_passages(PASSAGES)
    r.config.dtype = "bf16"
    bf16 = r.encode_passages(PASSAGES)
    body = r.inference_body()
    dtypes = [layer.self_attn.q_proj.weight.dtype for layer in body.decoder.layers]
    assert dtypes == [torch.float32] + [torch.bfloat16] * (len(dtypes) - 1)
    assert body.decoder.get_input_embeddings().weight.dtype == torch.float32
    # Norms and the residual stream stay fp32 (as under autocast); only attention and MLP cast.
    last = body.decoder.layers[-1]
    assert last.input_layernorm.weight.dtype == torch.float32
    assert last.mlp.down_proj.weight.dtype == torch.bfloat16
    seen: list[torch.dtype] = []
    hook = last.register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).dtype)
    )
    assert np.allclose(r.encode_passages(PASSAGES), bf16)
    hook.remove()
    assert seen and set(seen) == {torch.float32}
    cosine = np.sum(fp32 * bf16, axis=1)  # unit vectors
    assert cosine.min() >= 0.99, cosine
    assert r.runtime_info()["dtype"] == "bfloat16"
    r.config.fp32_layers = 0
    assert {layer.self_attn.q_proj.weight.dtype for layer in r.inference_body().decoder.layers} == {
        torch.bfloat16
    }


def test_defaults_per_hardware_kind():
    cpu = torch.device("cpu")
    assert hardware_kind(cpu) in ("cpu", "cpu-amx", "cpu-avx512-bf16")
    assert default_settings(cpu).token_budget == 4096
    assert default_settings(torch.device("cuda")).token_budget > 4096
    with pytest.raises(ValueError, match="compile"):
        FastEncodeSettings(compile="maybe")
    with pytest.raises(ValueError, match="token_budget"):
        FastEncodeSettings(token_budget=0)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_body_equals_eager(tiny_llama_dir):
    r = _retriever(tiny_llama_dir)
    eager = r.encode_passages(PASSAGES)
    r.encode_settings = FastEncodeSettings(compile="on")
    compiled = r.encode_passages(PASSAGES)
    assert r.inference_body().compiled
    np.testing.assert_allclose(compiled, eager, atol=1e-4)


def test_corpus_embeddings_record_what_ran(tiny_llama_dir, tmp_path):
    from chatretriever.io.embeddings import read_meta
    from chatretriever.retrieval.encode import EncodeConfig, encode_corpus

    r = _retriever(tiny_llama_dir)
    encode_corpus(r, PASSAGES, tmp_path / "emb", EncodeConfig(chunk_size=10, show_progress=False))
    runtime = read_meta(tmp_path / "emb" / "chunk-00000").extra["runtime"]
    assert runtime["hardware"] == hardware_kind(torch.device("cpu"))
    assert runtime["dtype"] == "float32" and runtime["compiled"] is False
    assert runtime["fast_encode"]["token_budget"] == 4096

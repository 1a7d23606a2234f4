"""ChatRetriever on tiny random Llama and Qwen2: CSIT pass, masking, pooling, training, saving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.methods.chatretriever.model import SAVED_CONFIG, ChatRetriever
from chatretriever.modeling.collate import csit_batch, encode_batch
from chatretriever.modeling.fast_encode import FastEncodeSettings
from chatretriever.modeling.losses import (
    combine_csit_losses,
    contrastive_loss,
    session_masked_lm_loss,
)
from chatretriever.modeling.precision import keep_fp32
from chatretriever.retrieval.encoders import Encoder
from chatretriever.types import Passage, Session

pytest.importorskip("peft")

SESSIONS = [
    [{"role": "user", "content": "what is the capital of france?"}],
    [
        {"role": "user", "content": "how do i reset my password?"},
        {"role": "assistant", "content": "open settings and choose reset."},
        {"role": "user", "content": "and in the cloud console?"},
    ],
    Session.from_messages("s3", [{"role": "user", "content": "tell me more about it"}]),
]
PASSAGES = [
    Passage(id="p1", title="Paris", text="paris is the capital of france."),
    Passage(id="p2", text="open settings and choose reset to reset your password."),
    Passage(id="p3", text="the quick brown fox jumps over the lazy dog 0123456789 " * 3),
    Passage(id="p4", text="which one is cheaper?"),
]
RESPONSES = ["paris.", "choose reset in the console settings.", "the fox is quick."]


def _pieces(r: ChatRetriever) -> list:
    return [r.template.csit_pieces(s, resp) for s, resp in zip(SESSIONS, RESPONSES, strict=True)]


def _retriever(model_dir, t=3, lora=True, **cfg) -> ChatRetriever:
    config = RetrieverConfig(
        n_emb_tokens=t, dtype="fp32", max_session_len=96, max_passage_len=64, **cfg
    )
    settings = LoraSettings(enabled=lora, r=4, alpha=8, dropout=0.0)
    return ChatRetriever.from_pretrained(model_dir, config=config, lora=settings, device="cpu")


@torch.no_grad()
def _perturb_adapter(r: ChatRetriever, seed: int = 0) -> None:
    """Give LoRA and the EMB rows non-trivial values (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in r.model.named_parameters():
        if "lora_B" in name or "trainable_tokens_delta" in name:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _train_step(r: ChatRetriever, mode: str = "csit") -> dict[str, torch.Tensor]:
    r.train()
    pieces = _pieces(r)
    sessions = csit_batch(pieces, r.pad_id, mode=mode)
    pos = [r.template.passage_ids(p) for p in PASSAGES[:3]]
    neg = [r.template.passage_ids(PASSAGES[3])] * 3
    passages = encode_batch(pos + neg, r.pad_id)
    out = r(sessions, passages)
    p = out["passage_emb"]  # (2B, D): positives then one hard negative each
    lc = contrastive_loss(out["session_emb"], p[:3], p[3:].unsqueeze(1), temperature=0.05)
    ls = session_masked_lm_loss(out["lm_logits"], out["lm_labels"])
    parts = combine_csit_losses(lc, ls, alpha=0.3)
    opt = torch.optim.AdamW([q for q in r.parameters() if q.requires_grad], lr=1e-2)
    sum(parts.values()).backward()
    opt.step()
    r.eval()
    return parts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_csit_pass_gives_the_standalone_session_embedding(tiny_model_dir, attn):
    r = _retriever(tiny_model_dir, attn_implementation=attn)
    _perturb_adapter(r)
    standalone = r.encode_sessions(SESSIONS, batch_size=2)
    pieces = _pieces(r)
    for mode in ("csit", "vanilla"):
        with torch.no_grad():
            out = r.csit_forward(csit_batch(pieces, r.pad_id, mode=mode))
        np.testing.assert_allclose(out["session_emb"].numpy(), standalone, atol=1e-4)
        n_labels = sum(p.label_end - p.label_start for p in pieces)
        assert out["lm_logits"].shape == (n_labels, len(r.tokenizer))
        assert torch.isfinite(out["lm_logits"]).all()  # padded rows never produce NaN
        targets = torch.cat(
            [torch.tensor(p.input_ids[p.label_start : p.label_end]) for p in pieces]
        )
        assert torch.equal(out["lm_labels"], targets)


def test_one_emb_token_ablation(tiny_llama_dir):
    r = _retriever(tiny_llama_dir, t=1)
    assert len(r.emb_ids) == 1
    pieces = _pieces(r)
    with torch.no_grad():
        out = r.csit_forward(csit_batch(pieces, r.pad_id))
    np.testing.assert_allclose(out["session_emb"].numpy(), r.encode_sessions(SESSIONS), atol=1e-4)


def _one_layer(r: ChatRetriever) -> None:
    body = r._base().get_decoder()
    body.layers = body.layers[:1]
    body.config.num_hidden_layers = 1


def test_response_rows_see_only_the_session_emb_tokens(tiny_model_dir):
    """With one layer, response-side states under the CSIT mask cannot depend on session tokens
    at all (the session reaches them only through the EMB tokens, whose layer input is fixed)."""
    r = _retriever(tiny_model_dir)
    _one_layer(r)
    a = r.template.csit_pieces(SESSIONS[0], RESPONSES[0])
    ids = list(a.input_ids)
    other = [(i * 7 + 11) % 300 + 3 for i in ids[: a.session_len]]  # same length, other tokens
    b = type(a)(
        tuple(other + ids[a.session_len :]), a.session_len, a.n_emb, a.label_start, a.label_end
    )
    for mode, same in (("csit", True), ("vanilla", False)):
        with torch.no_grad():
            h = r._body(csit_batch([a, b], r.pad_id, mode=mode))  # (2, L, H)
        resp = slice(a.response_start, len(a))  # header (separator) row included
        assert torch.allclose(h[0, resp], h[1, resp], atol=1e-6) is same
        assert not torch.allclose(h[0, : a.session_len], h[1, : a.session_len])


def test_pooling_is_identical_with_left_and_right_padding(tiny_model_dir):
    r = _retriever(tiny_model_dir)
    r.encode_settings = FastEncodeSettings(enabled=False)  # the training forward pads either side
    _perturb_adapter(r)
    right = r.encode_passages(PASSAGES, batch_size=4)
    r.padding_side = "left"
    left = r.encode_passages(PASSAGES, batch_size=4)
    np.testing.assert_allclose(left, right, atol=1e-5)
    alone = np.concatenate([r.encode_passages([p], batch_size=1) for p in PASSAGES])
    np.testing.assert_allclose(alone, right, atol=1e-5)
    # Input order is kept although batches are sorted by length; outputs are unit vectors.
    np.testing.assert_allclose(np.linalg.norm(right, axis=1), 1.0, atol=1e-5)
    assert r.encode_sessions([], batch_size=2).shape == (0, r.dim)


def test_retriever_implements_the_encoder_protocol(tiny_llama_dir):
    r = _retriever(tiny_llama_dir, normalize=False)
    assert isinstance(r, Encoder)
    assert r.dim == 32 and r.name == "chatretriever/tiny-llama" and r.normalize is False
    emb = r.encode_sessions(SESSIONS, batch_size=2, show_progress=True)
    assert emb.dtype == np.float32 and emb.shape == (3, 32)
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0)


def test_bf16_encoding_is_close_to_fp32(tiny_llama_dir):
    r = _retriever(tiny_llama_dir)
    fp32 = r.encode_passages(PASSAGES)
    r.config.dtype = "bf16"
    assert r.compute_dtype == torch.bfloat16
    bf16 = r.encode_passages(PASSAGES)
    assert bf16.dtype == np.float32
    assert (np.sum(fp32 * bf16, axis=1) > 0.98).all()  # unit vectors: cosine


def _q_proj_dtypes(r: ChatRetriever) -> list[torch.dtype]:
    """dtype of every decoder layer's q_proj output during one bf16 encoding by the training
    forward (the fast path's inference copy is tested in test_fast_encode.py)."""
    seen: dict[int, torch.dtype] = {}
    layers = r._base().get_decoder().layers
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, out.dtype)
        )
        for i, layer in enumerate(layers)
    ]
    r.encode_settings = FastEncodeSettings(enabled=False)
    r.encode_passages(PASSAGES[:2])
    r.encode_settings = None
    for h in hooks:
        h.remove()
    return [seen[i] for i in range(len(layers))]


def test_fp32_layers_run_the_first_layers_in_fp32_under_bf16(tiny_llama_dir):
    r = _retriever(tiny_llama_dir, fp32_layers=1)
    fp32 = r.encode_passages(PASSAGES)
    r.config.dtype = "bf16"
    n_layers = len(r._base().get_decoder().layers)
    assert n_layers >= 2
    assert _q_proj_dtypes(r) == [torch.float32] + [torch.bfloat16] * (n_layers - 1)
    r.config.fp32_layers = 0  # changed after loading: the hooks follow the config
    assert _q_proj_dtypes(r) == [torch.bfloat16] * n_layers
    r.config.fp32_layers = n_layers  # every layer in fp32: the fp32 embeddings, bit for bit
    assert _q_proj_dtypes(r) == [torch.float32] * n_layers
    np.testing.assert_allclose(r.encode_passages(PASSAGES), fp32, atol=1e-6)
    assert not torch.is_autocast_enabled("cpu")


def test_keep_fp32_restores_autocast_when_the_module_raises():
    class Boom(torch.nn.Linear):
        def forward(self, x):
            assert x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            raise RuntimeError("boom")

    boom, after = Boom(4, 4), torch.nn.Linear(4, 4)
    keep_fp32([boom])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="boom"):
            boom(torch.ones(2, 4, dtype=torch.bfloat16))
        assert torch.is_autocast_enabled("cpu")
        assert after(torch.ones(2, 4)).dtype == torch.bfloat16


def test_fp32_layers_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="fp32_layers"):
        RetrieverConfig(fp32_layers=-1)


def test_lora_step_trains_lora_and_emb_rows_only(tiny_model_dir):
    r = _retriever(tiny_model_dir)
    params = dict(r.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in params.items()}
    emb_layer = r.model.get_input_embeddings()
    probe = torch.tensor([1, 5, 17, *r.emb_ids])
    emb_before = emb_layer(probe).detach().clone()
    parts = _train_step(r)
    assert set(parts) == {"contrastive", "session_lm"}
    assert all(torch.isfinite(v) for v in parts.values())
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed)
    assert any("trainable_tokens_delta" in n for n in changed)
    assert changed <= trainable  # the base model stays frozen
    emb_after = emb_layer(probe).detach()
    assert torch.equal(emb_after[:3], emb_before[:3])  # ordinary tokens untouched
    assert not torch.allclose(emb_after[3:], emb_before[3:])  # EMB tokens trained


def test_adapter_save_load_round_trip(tiny_model_dir, tmp_path):
    r = _retriever(tiny_model_dir)
    _train_step(r)
    expected_s = r.encode_sessions(SESSIONS)
    expected_p = r.encode_passages(PASSAGES)
    out = r.save_pretrained(tmp_path / "ret")
    meta = json.loads((out / SAVED_CONFIG).read_text())
    assert meta["format"] == "adapter" and meta["emb_token_ids"] == list(r.emb_ids)
    assert meta["retriever"]["base_model"] == str(tiny_model_dir.resolve())
    # Only LoRA matrices and the t EMB rows are saved: never the embedding matrix.
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert all("lora_" in k or "trainable_tokens_delta" in k for k in shapes)
    assert [s for k, s in shapes.items() if "trainable_tokens" in k] == [(3, 32)]
    matrix_bytes = len(r.tokenizer) * r.dim * 4
    assert (out / "adapter_model.safetensors").stat().st_size < matrix_bytes / 2
    loaded = ChatRetriever.from_pretrained(out, device="cpu")
    assert loaded.emb_ids == r.emb_ids and loaded.config == r.config
    np.testing.assert_allclose(loaded.encode_sessions(SESSIONS), expected_s, atol=1e-6)
    np.testing.assert_allclose(loaded.encode_passages(PASSAGES), expected_p, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    again = ChatRetriever.from_pretrained(out, is_trainable=True, device="cpu")
    assert any(p.requires_grad for p in again.parameters())
    with pytest.raises(ValueError, match="n_emb_tokens"):
        ChatRetriever.from_pretrained(out, n_emb_tokens=2)
    with pytest.raises(ValueError, match="retriever.n_emb_tokens is 3 in the saved .* but 2"):
        ChatRetriever.from_pretrained(out, config=RetrieverConfig(n_emb_tokens=2))


def test_merged_and_full_saves_reload(tiny_llama_dir, tmp_path):
    r = _retriever(tiny_llama_dir)
    _train_step(r)
    expected = r.encode_passages(PASSAGES)
    merged_dir = r.save_pretrained(tmp_path / "merged", merged=True)
    assert json.loads((merged_dir / SAVED_CONFIG).read_text())["format"] == "merged"
    assert (merged_dir / "model.safetensors").exists()
    merged = ChatRetriever.from_pretrained(merged_dir, device="cpu")
    np.testing.assert_allclose(merged.encode_passages(PASSAGES), expected, atol=1e-5)
    np.testing.assert_allclose(r.encode_passages(PASSAGES), expected)  # r itself is unchanged
    # the same function in full weights keeps the adapter's identity (indexes built with one
    # take the other's queries), also saved again whole; changed weights are another model
    assert merged.fingerprint == r.fingerprint
    adapter = ChatRetriever.from_pretrained(r.save_pretrained(tmp_path / "adapter"), device="cpu")
    assert adapter.fingerprint == merged.fingerprint
    resaved = ChatRetriever.from_pretrained(merged.save_pretrained(tmp_path / "re"), device="cpu")
    assert resaved.fingerprint == r.fingerprint
    with torch.no_grad():
        next(resaved.parameters()).add_(0.01)
    assert resaved.fingerprint != r.fingerprint

    full = _retriever(tiny_llama_dir, lora=False)
    assert all(p.requires_grad for p in full.parameters())
    _train_step(full)
    expected = full.encode_sessions(SESSIONS)
    full_dir = full.save_pretrained(tmp_path / "full")
    assert json.loads((full_dir / SAVED_CONFIG).read_text())["format"] == "full"
    reloaded = ChatRetriever.from_pretrained(full_dir, device="cpu")
    np.testing.assert_allclose(reloaded.encode_sessions(SESSIONS), expected, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError):
        RetrieverConfig(n_emb_tokens=0)
    with pytest.raises(ValueError):
        RetrieverConfig(dtype="fp16")
    with pytest.raises(ValueError):
        RetrieverConfig.from_dict({"base_model": "x", "n_emb_token": 3})
    from chatretriever.config import LossConfig

    assert LossConfig().uses_lm and not LossConfig(alpha=0).uses_lm
    with pytest.raises(ValueError, match="alpha=0"):
        LossConfig(session_mask="none")
    assert LossConfig.from_dict(LossConfig(alpha=0.5).to_dict()).alpha == 0.5
    lora = LoraSettings(target_modules=["q_proj"])
    assert LoraSettings.from_dict(lora.to_dict()) == lora

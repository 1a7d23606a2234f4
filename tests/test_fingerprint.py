"""Model identity by content: fingerprints of weights and settings, the adapter's base check, and
adapter weights that must hold every key."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import build_tiny_model, build_tokenizer

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.methods.chatretriever.model import SAVED_CONFIG, ChatRetriever
from chatretriever.modeling import fingerprint as fp
from chatretriever.modeling import model_cache
from chatretriever.retrieval.encode import EncodeConfig, encode_corpus
from chatretriever.types import Passage

pytest.importorskip("peft")

SESSIONS = [[{"role": "user", "content": "what is the capital of france?"}]]
PASSAGES = [Passage("p1", "paris is the capital of france."), Passage("p2", "open settings.")]


def _retriever(model_dir, lora: bool = True) -> ChatRetriever:
    config = RetrieverConfig(dtype="fp32", max_session_len=64, max_passage_len=48)
    settings = LoraSettings(enabled=lora, r=4, alpha=8, dropout=0.0)
    return ChatRetriever.from_pretrained(model_dir, config=config, lora=settings, device="cpu")


@torch.no_grad()
def _perturb(r: ChatRetriever, seed: int) -> None:
    """Stands for training: LoRA B and the EMB rows get seed-dependent values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in r.model.named_parameters():
        if "lora_B" in name or "trainable_tokens_delta" in name or not r.lora.enabled:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _trained(model_dir, seed: int, lora: bool = True) -> ChatRetriever:
    r = _retriever(model_dir, lora)
    _perturb(r, seed)
    return r


def test_two_models_saved_under_one_name_differ(tiny_llama_dir, tmp_path):
    a = _trained(tiny_llama_dir, seed=0).save_pretrained(tmp_path / "a" / "final")
    b = _trained(tiny_llama_dir, seed=1).save_pretrained(tmp_path / "b" / "final")
    ra, rb = (
        ChatRetriever.from_pretrained(a, device="cpu"),
        ChatRetriever.from_pretrained(b, device="cpu"),
    )
    assert ra.name == rb.name == "chatretriever/final"
    assert len(ra.fingerprint) == 16 and int(ra.fingerprint, 16) >= 0
    assert ra.fingerprint != rb.fingerprint
    # retrained in place: the directory's name stays, its fingerprint does not
    _trained(tiny_llama_dir, seed=2).save_pretrained(a)
    assert ChatRetriever.from_pretrained(a, device="cpu").fingerprint not in {
        ra.fingerprint,
        rb.fingerprint,
    }


@pytest.mark.parametrize("lora", [True, False])
def test_resaving_or_copying_keeps_the_fingerprint(tiny_llama_dir, tmp_path, lora):
    r = _trained(tiny_llama_dir, seed=0, lora=lora)
    first = r.save_pretrained(tmp_path / "first")
    loaded = ChatRetriever.from_pretrained(first, device="cpu")
    again = ChatRetriever.from_pretrained(loaded.save_pretrained(tmp_path / "copy" / "other"))
    assert r.fingerprint == loaded.fingerprint == again.fingerprint
    saved = json.loads((first / SAVED_CONFIG).read_text())
    assert saved["base_fingerprint"] == fp.directory_fingerprint(tiny_llama_dir)
    assert loaded.base_fingerprint == saved["base_fingerprint"]


def test_fingerprint_follows_weights_settings_and_precision(tiny_llama_dir):
    r = _retriever(tiny_llama_dir)
    before = r.fingerprint
    assert r.fingerprint == before  # stable while nothing changes
    _perturb(r, seed=0)  # in-place updates, as an optimizer step does
    trained = r.fingerprint
    assert trained != before
    r.config.dtype = "bf16"
    assert r.fingerprint != trained
    r.config.dtype = "fp32"
    assert r.fingerprint == trained
    r.config.max_passage_len = 40  # encodes passages differently
    assert r.fingerprint != trained


def test_adapter_refuses_another_base(tiny_llama_dir, tmp_path):
    out = _trained(tiny_llama_dir, seed=0).save_pretrained(tmp_path / "ret")
    other = tmp_path / "other-base"  # same architecture and vocabulary, other weights
    build_tiny_model("llama", len(build_tokenizer()), seed=1).save_pretrained(other)
    build_tokenizer().save_pretrained(other)
    with pytest.raises(ValueError, match="trained on a base model with weight fingerprint") as e:
        ChatRetriever.from_pretrained(out, base_model=str(other), device="cpu")
    assert fp.directory_fingerprint(other) in str(e.value) and "\n" not in str(e.value)
    # a copy of the right base (relocated) is accepted
    moved = tmp_path / "moved-base"
    build_tiny_model("llama", len(build_tokenizer()), seed=0).save_pretrained(moved)
    build_tokenizer().save_pretrained(moved)
    assert ChatRetriever.from_pretrained(out, base_model=str(moved), device="cpu").fingerprint


def test_a_dir_saved_before_fingerprints_loads_unchecked(tiny_llama_dir, tmp_path, caplog):
    out = _trained(tiny_llama_dir, seed=0).save_pretrained(tmp_path / "old")
    saved = json.loads((out / SAVED_CONFIG).read_text())
    del saved["base_fingerprint"]
    (out / SAVED_CONFIG).write_text(json.dumps(saved))
    with caplog.at_level(logging.DEBUG, logger="chatretriever"):
        r = ChatRetriever.from_pretrained(out, device="cpu")
    assert "records no base fingerprint" in caplog.text
    assert r.base_fingerprint == fp.directory_fingerprint(tiny_llama_dir)


def _drop_key(path, match: str) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    dropped = next(k for k in state if match in k)
    del state[dropped]
    save_file(state, str(path))
    return dropped


def test_adapter_weights_missing_keys_raise(tiny_qwen2_dir, tmp_path):
    out = _trained(tiny_qwen2_dir, seed=0).save_pretrained(tmp_path / "ret")
    _drop_key(out / "adapter_model.safetensors", "lora_B")
    with pytest.raises(ValueError, match="lacks 1 of the .* adapter weights"):
        ChatRetriever.from_pretrained(out, device="cpu")
    fresh = _retriever(tiny_qwen2_dir)
    with pytest.raises(ValueError, match="lacks 1 of the .* adapter weights"):
        fresh.load_trainable_state(out)  # resuming a checkpoint checks the same


def test_encode_resume_refuses_a_model_retrained_in_place(tiny_llama_dir, tmp_path):
    model_dir = _trained(tiny_llama_dir, seed=0).save_pretrained(tmp_path / "final")
    cfg = EncodeConfig(chunk_size=1, show_progress=False)
    first = ChatRetriever.from_pretrained(model_dir, device="cpu")
    encode_corpus(first, PASSAGES[:1], tmp_path / "emb", cfg)  # an interrupted job: 1 chunk
    _trained(tiny_llama_dir, seed=1).save_pretrained(model_dir)
    second = ChatRetriever.from_pretrained(model_dir, device="cpu")
    assert second.name == first.name
    with pytest.raises(ValueError, match="another model, or one retrained since"):
        encode_corpus(second, PASSAGES, tmp_path / "emb", cfg)


def test_tensors_and_files_share_one_digest(tmp_path):
    from safetensors.torch import save_file

    state = {
        "a.weight": torch.randn(3, 4),
        "b.bias": torch.randn(5).to(torch.bfloat16),
        "c.ids": torch.arange(4),
        "d.empty": torch.zeros(0, 2),
    }
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({"a.weight": state["a.weight"]}, str(shards / "model-1-of-2.safetensors"))
    save_file({k: v for k, v in state.items() if k != "a.weight"}, str(shards / "2.safetensors"))
    digest = fp.tensors_fingerprint(state)
    assert fp.directory_fingerprint(tmp_path) == fp.directory_fingerprint(shards) == digest
    changed = {**state, "a.weight": state["a.weight"] + 1e-6}
    assert fp.tensors_fingerprint(changed) != digest
    renamed = {("z" if k == "a.weight" else k): v for k, v in state.items()}
    assert fp.tensors_fingerprint(renamed) != digest
    with pytest.raises(FileNotFoundError, match="no weight files"):
        fp.directory_fingerprint(tmp_path / "sharded" / "nothing-here")


def test_large_file_digests_are_cached(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(fp, "CACHE_MIN_BYTES", 0)
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(4)}, str(model / "model.safetensors"))
    first = fp.directory_fingerprint(model)
    assert len(list((tmp_path / "cache" / "fingerprints").iterdir())) == 1
    calls = []
    monkeypatch.setattr(fp, "_file_entries", lambda path: calls.append(path) or {})
    assert fp.directory_fingerprint(model) == first and calls == []  # read from the cache
    save_file({"w": torch.zeros(4)}, str(model / "model.safetensors"))  # a new mtime
    fp.directory_fingerprint(model)
    assert calls == [model / "model.safetensors"]

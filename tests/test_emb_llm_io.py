"""The model directories of an EmbLLM (`modeling.emb_llm_io`): building a new retriever on a base,
the saved layout of each format, loading it back, its errors, and which old files a save removes.

Save/load through `EmbLLM.from_pretrained`/`save_pretrained` (and atomicity) is tested in
test_modeling.py and test_atomic.py; these tests call the module's functions directly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.modeling import emb_llm_io
from chatretriever.modeling.emb_llm import EmbLLM
from chatretriever.modeling.fingerprint import model_fingerprint
from chatretriever.types import Passage

pytest.importorskip("peft")

PASSAGES = [
    Passage(id="p1", title="Paris", text="paris is the capital of france."),
    Passage(id="p2", text="open settings and choose reset to reset your password."),
]
CONFIG = RetrieverConfig(n_emb_tokens=2, dtype="fp32", max_passage_len=32)


def _new(base: Path, lora: bool = True, seed: int = 0) -> EmbLLM:
    """A tiny retriever on `base` whose trainable weights are perturbed by `seed`."""
    settings = LoraSettings(enabled=lora, r=4, alpha=8, dropout=0.0)
    r = emb_llm_io.load_new(EmbLLM, str(base), CONFIG, settings, {"max_session_len": 64})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in r.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return r.eval()


def _meta(directory: Path) -> dict:
    return json.loads((directory / EmbLLM.SAVED_CONFIG).read_text())


def test_formats_and_stale_files_are_the_saved_layout():
    assert emb_llm_io.FORMATS == ("adapter", "merged", "full")
    assert emb_llm_io.STALE_WEIGHT_FILES == (
        "adapter_config.json",
        "adapter_model.*",
        "model.safetensors",
        "model.safetensors.index.json",
        "model-*-of-*.safetensors",
    )


def test_load_new_names_and_fingerprints_the_base(tiny_llama_dir):
    r = _new(tiny_llama_dir)
    assert r.name == f"emb-llm/{tiny_llama_dir.name}"
    assert r.config.base_model == str(tiny_llama_dir)
    assert r.config.max_session_len == 64  # the override
    assert r.config.n_emb_tokens == 2 and len(r.emb_ids) == 2
    assert r.base_fingerprint == model_fingerprint(str(tiny_llama_dir))
    assert r.lora.enabled and hasattr(r.model, "peft_config")
    full = emb_llm_io.load_new(EmbLLM, str(tiny_llama_dir), CONFIG, LoraSettings(enabled=False), {})
    assert not hasattr(full.model, "peft_config")
    assert emb_llm_io.load_new(EmbLLM, str(tiny_llama_dir), None, None, {}).lora.enabled


def test_adapter_save_layout_and_round_trip(tiny_llama_dir, tmp_path):
    r = _new(tiny_llama_dir)
    out = tmp_path / "ret"
    assert emb_llm_io.save_retriever(r, out, merged=False) == "adapter"
    names = {p.name for p in out.iterdir()}
    assert {"emb_llm.json", "adapter_model.safetensors", "adapter_config.json"} <= names
    assert "tokenizer_config.json" in names and "model.safetensors" not in names
    meta = _meta(out)
    assert set(meta) == {
        "format",
        "method",
        "retriever",
        "lora",
        "emb_tokens",
        "emb_token_ids",
        "dim",
        "base_fingerprint",
    }
    assert meta["format"] == "adapter" and meta["method"] == "emb-llm"
    assert meta["emb_token_ids"] == list(r.emb_ids)
    assert meta["emb_tokens"] == r.tokenizer.convert_ids_to_tokens(list(r.emb_ids))
    assert meta["dim"] == r.dim
    assert meta["base_fingerprint"] == r.base_fingerprint
    assert meta["retriever"] == r.config.to_dict() and meta["lora"] == r.lora.to_dict()

    loaded = emb_llm_io.load_saved(EmbLLM, out, False, {})
    assert loaded.name == "emb-llm/ret"
    assert loaded.base_fingerprint == r.base_fingerprint
    np.testing.assert_allclose(
        loaded.encode_passages(PASSAGES), r.encode_passages(PASSAGES), atol=1e-5
    )


@pytest.mark.parametrize(
    ("lora", "merged", "fmt"), [(True, True, "merged"), (False, False, "full")]
)
def test_whole_model_saves_write_model_safetensors(tiny_llama_dir, tmp_path, lora, merged, fmt):
    r = _new(tiny_llama_dir, lora=lora, seed=1)
    out = tmp_path / fmt
    assert emb_llm_io.save_retriever(r, out, merged=merged) == fmt
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert _meta(out)["format"] == fmt
    loaded = emb_llm_io.load_saved(EmbLLM, out, False, {})
    assert not hasattr(loaded.model, "peft_config")
    np.testing.assert_allclose(
        loaded.encode_passages(PASSAGES), r.encode_passages(PASSAGES), atol=1e-5
    )


def test_load_saved_rejects_an_unknown_format(tiny_llama_dir, tmp_path):
    out = tmp_path / "ret"
    emb_llm_io.save_retriever(_new(tiny_llama_dir), out, merged=False)
    meta = _meta(out)
    (out / "emb_llm.json").write_text(json.dumps({**meta, "format": "gguf"}))
    message = f"{out / 'emb_llm.json'}: unknown format 'gguf'"
    with pytest.raises(ValueError, match=re.escape(message)):
        emb_llm_io.load_saved(EmbLLM, out, False, {})


def test_load_saved_rejects_other_emb_ids_than_the_tokenizer(tiny_llama_dir, tmp_path):
    out = tmp_path / "ret"
    r = _new(tiny_llama_dir)
    emb_llm_io.save_retriever(r, out, merged=False)
    wrong = [i + 1 for i in r.emb_ids]
    (out / "emb_llm.json").write_text(json.dumps({**_meta(out), "emb_token_ids": wrong}))
    message = f"{out}: tokenizer EMB ids {list(r.emb_ids)} != saved {wrong}"
    with pytest.raises(ValueError, match=re.escape(message)):
        emb_llm_io.load_saved(EmbLLM, out, False, {})


def test_a_save_removes_the_weights_of_an_earlier_save_in_another_format(tiny_llama_dir, tmp_path):
    out = tmp_path / "ret"
    emb_llm_io.save_retriever(_new(tiny_llama_dir, lora=False), out, merged=False)
    assert (out / "model.safetensors").is_file()
    emb_llm_io.save_retriever(_new(tiny_llama_dir), out, merged=False)
    assert not (out / "model.safetensors").exists()
    assert (out / "adapter_model.safetensors").is_file()


def test_a_save_into_its_base_dir_keeps_the_base_weights(tiny_llama_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    weights = (base / "model.safetensors").read_bytes()
    r = _new(base)
    emb_llm_io.save_retriever(r, base, merged=False)
    emb_llm_io.save_retriever(r, base, merged=False)  # a previous save exists: not stale here
    assert (base / "model.safetensors").read_bytes() == weights
    assert (base / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("lora", [True, False], ids=["adapter", "full"])
def test_load_trained_weights_restores_the_trained_state(tiny_llama_dir, tmp_path, lora):
    trained = _new(tiny_llama_dir, lora=lora, seed=3)
    out = tmp_path / "ret"
    emb_llm_io.save_retriever(trained, out, merged=False)
    fresh = _new(tiny_llama_dir, lora=lora, seed=4)
    assert fresh.weights_fingerprint() != trained.weights_fingerprint()
    emb_llm_io.load_trained_weights(fresh.model, out)
    assert fresh.weights_fingerprint() == trained.weights_fingerprint()


def test_load_trained_weights_rejects_weights_of_another_model(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ret"
    emb_llm_io.save_retriever(_new(tiny_llama_dir, lora=False), out, merged=False)
    state = load_file(str(out / "model.safetensors"))
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(out / "model.safetensors"))
    target = _new(tiny_llama_dir, lora=False)
    with pytest.raises(ValueError, match=re.escape(f"{out}: weights do not match")):
        emb_llm_io.load_trained_weights(target.model, out)


def test_same_dir(tmp_path):
    (tmp_path / "a").mkdir()
    assert emb_llm_io.same_dir(tmp_path / "a", str(tmp_path / "a" / ".." / "a"))
    assert not emb_llm_io.same_dir(tmp_path / "a", str(tmp_path))
    assert not emb_llm_io.same_dir(tmp_path / "a", "smollm2-135m-instruct")


def test_sharded_checkpoint_loader_resolves_on_this_transformers(tiny_llama_dir, tmp_path):
    """A full fine-tune saved in shards resumes (transformers moved the loader in v5)."""
    trained = _new(tiny_llama_dir, lora=False, seed=3)
    trained.model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    fresh = _new(tiny_llama_dir, lora=False, seed=4)
    emb_llm_io.load_trained_weights(fresh.model, tmp_path / "sharded")
    assert fresh.weights_fingerprint() == trained.weights_fingerprint()

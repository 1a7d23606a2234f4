"""Item-embedder training: the layout, the loss without in-batch negatives by hand, a smoke run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_items_fixtures import write_domain

from chatretriever.methods.items.data import ItemExample
from chatretriever.methods.items.train import ItemCollator, ItemLoss, item_layout


def _ex(qid: str, pos: list[str], neg: list[str], relevant: list[str] | None = None):
    return ItemExample(
        id=qid,
        query=f"query {qid}",
        positives=tuple((i, f"item {i}") for i in pos),
        negatives=tuple((i, f"item {i}") for i in neg),
        relevant=tuple(relevant or pos),
    )


def test_layout_encodes_a_shared_item_once_and_keeps_relevant_keys():
    examples = [_ex("a", ["1"], ["2", "3"]), _ex("b", ["2"], ["1", "4"], relevant=["2", "9"])]
    texts, layout = item_layout(examples, n_negatives=2)
    assert texts == ["item 1", "item 2", "item 3", "item 4"]
    assert layout.rows.tolist() == [[0, 1, 2], [1, 0, 3]]
    assert layout.positive_keys.shape == (2, 2, 2)
    assert (layout.positive_keys[0, 1] == -1).all()  # example a has one relevant item
    # fewer negatives than slots: padding
    _, padded = item_layout([_ex("c", ["1"], ["2"])], n_negatives=3)
    assert padded.rows.tolist() == [[0, 1, -1, -1]]


class _Table(torch.nn.Module):
    """A fixed text -> vector table standing in for an embedder."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        super().__init__()
        self.table = table

    def embed(self, texts, side):
        return F.normalize(torch.tensor([self.table[t] for t in texts]), dim=-1)


def test_loss_without_in_batch_negatives_by_hand():
    examples = [_ex("a", ["1"], ["2"]), _ex("b", ["3"], ["1"])]
    vec = {
        "query a": [1.0, 0.0],
        "query b": [0.0, 1.0],
        "item 1": [1.0, 0.0],
        "item 2": [0.6, 0.8],
        "item 3": [0.8, 0.6],
    }
    batch = ItemCollator(n_negatives=1)(examples)
    t = 0.5
    got = ItemLoss(temperature=t, in_batch=False)(_Table(vec), batch)["contrastive"]
    # own candidates only: a: [item1 = 1.0, item2 = 0.6]; b: [item3 = 0.6, item1 = 0.0]
    la = -torch.log_softmax(torch.tensor([1.0, 0.6]) / t, 0)[0]
    lb = -torch.log_softmax(torch.tensor([0.6, 0.0]) / t, 0)[0]
    assert got.item() == pytest.approx(((la + lb) / 2).item(), abs=1e-5)
    # in-batch on: candidates [pos a = item1, pos b = item3, neg a = item2, neg b = item1];
    # for a, b's negative item1 is a's own positive: left out; for b every column counts
    both = ItemLoss(temperature=t, in_batch=True)(_Table(vec), batch)["contrastive"]
    la = -torch.log_softmax(torch.tensor([1.0, 0.8, 0.6]) / t, 0)[0]
    lb = -torch.log_softmax(torch.tensor([0.0, 0.6, 0.8, 0.0]) / t, 0)[1]
    assert both.item() == pytest.approx(((la + lb) / 2).item(), abs=1e-5)


def _tiny_bert(root, tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    model = BertModel(cfg)
    out = root / "tiny-bert"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _data_and_recipe(tmp_path, tokenizer, max_steps: int):
    """Built item data, a tiny BERT and a recipe training it (checkpoints every 2 steps)."""
    from chatretriever.io.reclm import load_reclm
    from chatretriever.methods.items.build import BuildConfig, build_items

    data = tmp_path / "data"
    config = BuildConfig(train_per_task=3, test_per_task=1, test_fraction=0.3, max_targets=10)
    build_items(load_reclm(write_domain(tmp_path / "steam")), data, config)
    base = _tiny_bert(tmp_path, tokenizer)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {base}\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{files: [{{path: {data / 'train.jsonl.gz'}}}]}}\n"
        "lengths: {query: 64, item: 32}\n"
        f"training: {{max_steps: {max_steps}, per_device_train_batch_size: 4,"
        " learning_rate: 1.0e-3, save_steps: 2, logging_steps: 1, warmup_steps: 0}\n"
    )
    return base, recipe


def test_training_smoke_and_resume(tmp_path, tokenizer):
    from chatretriever.methods.items.recipe import load_item_recipe, run_item_training
    from chatretriever.retrieval.baselines import TextEmbedder

    base, recipe = _data_and_recipe(tmp_path, tokenizer, 3)
    cfg = load_item_recipe(recipe)
    assert cfg.loss.in_batch is False and cfg.loss.n_negatives == 7
    out = run_item_training(cfg)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss_contrastive"] for r in log if "loss_contrastive" in r]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    from safetensors.torch import load_file

    trained = load_file(str(out / "model.safetensors"))
    initial = load_file(str(base / "model.safetensors"))
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(changed) > len(initial) // 2
    emb = TextEmbedder.from_pretrained(str(out)).encode_texts(["a query", "an item"])
    assert emb.shape == (2, 32)
    # resume: a longer run picks up checkpoint-2 and continues to step 4
    cfg2 = load_item_recipe(recipe, ["training.max_steps=4"])
    run_item_training(cfg2, resume=True)
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_recipe_errors_name_the_file(tmp_path):
    from chatretriever.errors import DataFormatError
    from chatretriever.methods.items.recipe import load_item_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\noutput_dir: o\ndata: {files: [{path: x}], exclude_tasks: [XX]}\n")
    with pytest.raises(DataFormatError, match="bad.yaml.*unknown tasks"):
        load_item_recipe(bad)


def test_llm_embedder_is_injected_by_the_cli(tmp_path, tiny_llama_dir, capsys):
    """`train-items --embedder chatretriever`: a ChatRetriever (last EMB token, LoRA) trains on
    the item tasks through the same trainer; the saved dir evaluates by its path."""
    from chatretriever.cli import main

    data = tmp_path / "data"
    root = write_domain(tmp_path / "steam")
    build = ["build-items", str(root), "--out", str(data), "--train-per-task", "2"]
    assert main([*build, "--test-per-task", "1", "--test-fraction", "0.3"]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_llama_dir}\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{files: [{{path: {data / 'train.jsonl.gz'}}}]}}\n"
        "lengths: {query: 64, item: 48}\n"
        "training: {max_steps: 2, per_device_train_batch_size: 2, learning_rate: 1.0e-3,"
        " logging_steps: 1, warmup_steps: 0}\n"
    )
    assert main(["train-items", str(recipe), "--embedder", "chatretriever"]) == 0
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("loss_contrastive" in r for r in log)
    capsys.readouterr()
    assert main(["eval-items", str(data), "--model", str(tmp_path / "run")]) == 0
    assert "| " in capsys.readouterr().out


def test_resume_at_max_steps_trains_no_further_step(tmp_path, tokenizer):
    """A run stopped at checkpoint-N and resumed with max_steps=N finalises it: the Trainer
    alone would run one more step (N + 1) before it checks max_steps."""
    import shutil

    from safetensors.torch import load_file

    from chatretriever.methods.items.recipe import load_item_recipe, run_item_training

    _, recipe = _data_and_recipe(tmp_path, tokenizer, 4)
    run_item_training(load_item_recipe(recipe))
    out = tmp_path / "run"
    for name in ("model.safetensors", "train_log.jsonl"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoint-4")  # as if stopped after checkpoint-2
    run_item_training(load_item_recipe(recipe, ["training.max_steps=2"]), resume=True)
    assert not (out / "checkpoint-3").exists()
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in log) == 2
    final, ckpt = (
        load_file(str(out / "model.safetensors")),
        load_file(str(out / "checkpoint-2" / "model.safetensors")),
    )
    assert all(torch.equal(final[k], ckpt[k]) for k in ckpt)

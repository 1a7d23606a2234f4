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


def _one_example_file(tmp_path, lines: list[dict]):
    from chatretriever.methods.items.recipe import load_item_recipe

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: nowhere\noutput_dir: {tmp_path / 'run'}\n"
                      f"data: {{files: [{{path: {data}}}]}}\n")  # fmt: skip
    return load_item_recipe(recipe)


def test_training_data_that_cannot_teach_is_refused_naming_the_file(tmp_path):
    from chatretriever.methods.items.recipe import run_item_training

    with pytest.raises(ValueError, match=r"train.jsonl: no training examples"):
        run_item_training(_one_example_file(tmp_path, []))
    bare = {"id": "q", "messages": [{"role": "user", "content": "a game"}],
            "positives": [{"id": "1", "text": "title: A"}], "negatives": []}  # fmt: skip
    with pytest.raises(ValueError, match=r"train.jsonl: no example has negatives"):
        run_item_training(_one_example_file(tmp_path, [bare]))


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
    capsys.readouterr()
    assert main(["train-items", str(recipe)]) == 2  # a chat LLM as a sentence transformer
    assert "pass --embedder chatretriever" in capsys.readouterr().err
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


def test_lora_run_saves_a_small_adapter_and_a_merged_model(tmp_path, tokenizer, monkeypatch):
    """`lora.enabled`: only the adapter trains; the run dir is a merged sentence-transformers
    model that embeds exactly as the LoRA model; `adapter/` resumes; shipped as a built-in
    (`ShippedEncoderAdapter`), the adapter is merged once into the cache and loads by name."""
    import shutil

    from safetensors.torch import load_file

    from chatretriever.methods.items.recipe import load_item_recipe, run_item_training
    from chatretriever.methods.items.train import SentenceEmbedder
    from chatretriever.modeling import sources
    from chatretriever.retrieval.baselines import TextEmbedder

    base, recipe = _data_and_recipe(tmp_path, tokenizer, 3)
    cfg = load_item_recipe(recipe, ["lora.enabled=true", "lora.r=4"])
    assert cfg.lora.target_modules == ("all-linear",)
    out = run_item_training(cfg)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapter.items() if "lora_B" in k)
    merged, initial = (
        load_file(str(out / "model.safetensors")),
        load_file(str(base / "model.safetensors")),
    )
    assert set(merged) == set(initial)  # plain encoder keys: no peft prefixes
    st_config = json.loads((out / "sentence_bert_config.json").read_text())
    assert st_config["max_seq_length"] == 64  # the longer of query 64 / item 32
    assert any(not torch.equal(initial[k], merged[k]) for k in initial)
    texts = ["co-op roguelike", "title: Portal, tags: puzzle"]
    trained = SentenceEmbedder.from_pretrained(str(base), lora=cfg.lora, item_max_len=32)
    trained.load_trainable_state(out)
    trained.eval()
    with torch.no_grad():
        want = trained.embed(texts, "item")

    def fp32(name):  # exact comparison: no bf16 autocast on CPUs that have it
        emb = TextEmbedder.from_pretrained(name)
        emb.bf16 = False
        return emb

    got = fp32(str(out)).encode_texts(texts)
    assert torch.allclose(torch.as_tensor(got), want, atol=1e-5)
    # resume continues the adapter from checkpoint-2
    run_item_training(
        load_item_recipe(recipe, ["lora.enabled=true", "lora.r=4", "training.max_steps=4"]),
        resume=True,
    )
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    # shipped inside a package as a built-in on a (registered) base encoder
    pkg = tmp_path / "site" / "shippkg"
    shutil.copytree(
        out,
        pkg / "assets" / "tiny-items",
        ignore=shutil.ignore_patterns("*.safetensors", "checkpoint-*"),
    )
    shutil.copy(
        out / "adapter" / "adapter_model.safetensors", pkg / "assets" / "tiny-items" / "adapter"
    )
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CHATRETRIEVER_CACHE", str(tmp_path / "cache"))

    class LocalDir:
        packages: tuple[str, ...] = ()

        def available(self) -> bool:
            return True

        def materialise(self, name: str):
            return base

    monkeypatch.setitem(
        sources.BUILTIN_MODELS,
        "tiny-base",
        sources.ModelInfo("tiny-base", "t", "encoder", "MIT", LocalDir()),
    )
    source = sources.ShippedEncoderAdapter("assets/tiny-items", anchor="shippkg", base="tiny-base")
    monkeypatch.setitem(
        sources.BUILTIN_MODELS,
        "tiny-items",
        sources.ModelInfo("tiny-items", "t", "encoder", "MIT", source),
    )
    assert source.available() and source.packages == ()
    built = sources.resolve_model_dir("tiny-items")
    assert built.parent == tmp_path / "cache" / "models" and built.name.startswith("tiny-items-")
    assert sources.resolve_model_dir("tiny-items") == built  # merged once, reused
    by_name = fp32("tiny-items").encode_texts(texts)
    assert torch.allclose(torch.as_tensor(by_name), want, atol=1e-5)
    (pkg / "assets" / "tiny-items" / "adapter" / "adapter_model.safetensors").unlink()
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="incomplete.*adapter_model.safetensors"):
        sources.resolve_model_dir("tiny-items")

"""Reranker tuning: pair data, DPO rows, the supervised loss, SFT and DPO smoke runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chatretriever.errors import DataFormatError
from chatretriever.methods.rationale.prompts import BinaryChoicePrompt
from chatretriever.methods.rationale.tuning import (
    ChoiceCollator,
    TuneConfig,
    answer_loss,
    choice_pairs,
    dpo_rows,
    iter_pairs,
    run_dpo,
    run_sft,
    write_pairs,
)
from chatretriever.modeling.recipe import load_config
from chatretriever.types import Passage, Session, Turn

PASSAGES = [Passage("q", "ask a question", title="Question"), Passage("r", "mirror feelings"),
            Passage("s", "give advice")]  # fmt: skip
SESSIONS = [
    Session("a", (Turn("user", "i am sad"),)),
    Session("b", (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "help me"))),
]
GOLD = {"a": "r", "b": "s"}


def test_choice_pairs_and_round_trip(tmp_path):
    pairs = choice_pairs(SESSIONS, PASSAGES, GOLD, n_negatives=2, seed=1)
    assert [(p.session.id, p.relevant) for p in pairs] == [
        ("a", True), ("a", False), ("a", False), ("b", True), ("b", False), ("b", False),
    ]  # fmt: skip
    assert pairs[0].document == "mirror feelings"
    assert {p.document for p in pairs[1:3]} == {"Question\nask a question", "give advice"}
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    assert list(iter_pairs(tmp_path / "pairs.jsonl")) == pairs
    (tmp_path / "bad.jsonl").write_text(json.dumps({"document": "x", "relevant": "yes"}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: field .relevant."):
        list(iter_pairs(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="not a passage"):
        choice_pairs(SESSIONS, PASSAGES, {"a": "zzz", "b": "s"})


def test_dpo_rows_shape(tokenizer):
    prompt = BinaryChoicePrompt(tokenizer, "ab")
    pairs = choice_pairs(SESSIONS, PASSAGES, GOLD, n_negatives=1)
    rows = dpo_rows(prompt, pairs)
    assert len(rows) == 4 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("A", "B"), ("B", "A")] * 2
    assert rows[0]["prompt"].startswith("<|im_start|>user\nHere is a reply strategy")
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert (
        "Strategy: mirror feelings" in rows[0]["prompt"] and "Seeker: i am sad" in rows[0]["prompt"]
    )
    batch = ChoiceCollator(prompt)(pairs)
    assert batch["targets"].tolist() == [prompt.option_ids[0], prompt.option_ids[1]] * 2
    assert len(batch["sequences"]) == 4


def test_answer_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    first = -(2.0 - math.log(math.exp(2.0) + 2.0))
    second = -(0.0 - math.log(2.0 + math.e))
    assert answer_loss(logits, targets)["sft"].item() == pytest.approx((first + second) / 2)


def _recipe(tmp_path, model_dir, objective: str):
    pairs = choice_pairs(SESSIONS, PASSAGES, GOLD, n_negatives=1)
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    raw = {
        "objective": objective,
        "model": str(model_dir),
        "output_dir": str(tmp_path / objective),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"files": [{"path": str(tmp_path / "pairs.jsonl")}]},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                     "logging_steps": 1, "save_steps": 100, "warmup_steps": 0},
    }  # fmt: skip
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp_path / "r.yaml", TuneConfig.from_dict)


def _lora_weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_sft_smoke(tmp_path, tiny_llama_dir):
    config = _recipe(tmp_path, tiny_llama_dir, "sft")
    out = run_sft(config)
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss_sft"] for row in logs if "loss_sft" in row]
    assert losses and all(math.isfinite(v) for v in losses)
    weights = _lora_weights(out)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    assert (out / "train_config.yaml").is_file()
    # the reranker loads the adapter, and it changes the scores
    from chatretriever.methods.rationale.reranker import BinaryChoiceReranker

    docs = [p.document for p in choice_pairs(SESSIONS, PASSAGES, GOLD)][:2]
    base = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, device="cpu")
    tuned = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=out, device="cpu")
    assert not np.allclose(base.score_pairs(docs, SESSIONS), tuned.score_pairs(docs, SESSIONS))


def test_dpo_smoke(tmp_path, tiny_llama_dir):
    pytest.importorskip("trl")
    config = _recipe(tmp_path, tiny_llama_dir, "dpo")
    assert config.dpo.beta == 0.1
    out = run_dpo(config)
    weights = _lora_weights(out)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logs if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (out / "train_config.yaml").is_file()


def test_recipe_rejects_unknown_objective(tmp_path):
    with pytest.raises(DataFormatError, match="objective"):
        load_config(_write(tmp_path, {"objective": "rl"}), TuneConfig.from_dict)


def _write(tmp_path, raw):
    import yaml

    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({**raw, "data": {"files": [{"path": "p"}]}}))
    return path


def test_recipe_rejects_unknown_dtype(tmp_path):
    with pytest.raises(DataFormatError, match="dtype"):
        load_config(_write(tmp_path, {"dtype": "fp16"}), TuneConfig.from_dict)


def test_sft_loss_bf16_runs_under_autocast_and_stays_close(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatretriever.methods.rationale.tuning import sft_loss_fn

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = BinaryChoicePrompt(tokenizer, "ab", 32, 64)
    inputs = ChoiceCollator(prompt)(choice_pairs(SESSIONS, PASSAGES, GOLD, n_negatives=1))
    seen: list[torch.dtype] = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda _m, _a, out: seen.append(out.dtype)
    )
    pad, vocab = tokenizer.pad_token_id or 0, len(tokenizer)
    with torch.no_grad():
        fp32 = sft_loss_fn(pad, vocab, torch.float32)(model, inputs)["sft"]
        bf16 = sft_loss_fn(pad, vocab, torch.bfloat16)(model, inputs)["sft"]
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the bf16 forward ran under autocast
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.05)
    assert next(model.parameters()).dtype == torch.float32  # weights untouched

"""Reranker tuning: pair data, DPO rows, the supervised loss, SFT and DPO smoke runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chatretriever.errors import DataFormatError
from chatretriever.methods.rationale.pairs import (
    ChoiceCollator,
    choice_pairs,
    dpo_rows,
    iter_pairs,
    write_pairs,
)
from chatretriever.methods.rationale.prompts import BinaryChoicePrompt
from chatretriever.methods.rationale.tuning import TuneConfig, answer_loss, run_dpo, run_sft
from chatretriever.modeling.recipe import deep_merge, load_config
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
    assert len(rows) == 4
    assert all(set(r) == {"prompt_ids", "chosen_ids", "rejected_ids"} for r in rows)
    yes, no = prompt.option_ids
    eos = tokenizer.eos_token_id
    assert [(r["chosen_ids"], r["rejected_ids"]) for r in rows] == [
        ([yes, eos], [no, eos]), ([no, eos], [yes, eos])
    ] * 2  # fmt: skip
    text = tokenizer.decode(rows[0]["prompt_ids"])
    assert text.startswith("<|im_start|>user\nHere is a reply strategy")
    assert text.endswith("<|im_start|>assistant\n")
    assert "Strategy: mirror feelings" in text and "Seeker: i am sad" in text
    batch = ChoiceCollator(prompt)(pairs)
    assert batch["targets"].tolist() == [yes, no] * 2
    # DPO's prompts are the very ids supervised tuning and the reranker read
    assert [r["prompt_ids"] for r in rows] == batch["sequences"]


def test_answer_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    first = -(2.0 - math.log(math.exp(2.0) + 2.0))
    second = -(0.0 - math.log(2.0 + math.e))
    assert answer_loss(logits, targets)["sft"].item() == pytest.approx((first + second) / 2)


def _recipe(tmp_path, model_dir, objective: str, output: str | None = None, **extra):
    pairs = choice_pairs(SESSIONS, PASSAGES, GOLD, n_negatives=1)
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    raw = {
        "objective": objective,
        "model": str(model_dir),
        "output_dir": str(tmp_path / (output or objective)),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"files": [{"path": str(tmp_path / "pairs.jsonl")}]},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                     "logging_steps": 1, "save_steps": 100, "warmup_steps": 0},
    }  # fmt: skip
    raw = deep_merge(raw, extra)
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


def test_recipe_rejects_an_unknown_wording_and_training_typos(tmp_path):
    with pytest.raises(DataFormatError, match="wording must be one of ab, tf, got 'xyz'"):
        load_config(_write(tmp_path, {"wording": "xyz"}), TuneConfig.from_dict)
    with pytest.raises(DataFormatError, match="did you mean 'learning_rate'"):
        load_config(_write(tmp_path, {"training": {"lerning_rate": 1}}), TuneConfig.from_dict)


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
    # Both are near log V on a random model, so only an absolute bound means anything: bf16
    # rounding moves it by 3.4e-5 here, logits read one position early by 0.18.
    assert bf16.item() == pytest.approx(fp32.item(), abs=1e-3)
    assert next(model.parameters()).dtype == torch.float32  # weights untouched


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_from_init_adapter_starts_from_its_weights(tmp_path, tiny_llama_dir):
    init = run_sft(_recipe(tmp_path, tiny_llama_dir, "sft", "init"))
    # lr 0: the saved adapter is the init one exactly (a new LoRA would have B = 0, random A);
    # the recipe's lora (r 8) is ignored for the saved one's (r 4)
    frozen = _recipe(tmp_path, tiny_llama_dir, "sft", "lr0", init_adapter=str(init),
                     lora={"r": 8}, training={"learning_rate": 0.0})  # fmt: skip
    assert _same_weights(_lora_weights(run_sft(frozen)), _lora_weights(init))
    trained = run_sft(_recipe(tmp_path, tiny_llama_dir, "sft", "on", init_adapter=str(init)))
    after, before = _lora_weights(trained), _lora_weights(init)
    assert after.keys() == before.keys() and not _same_weights(after, before)
    assert {v.shape[0] for k, v in after.items() if "lora_A" in k} == {4}  # the saved r


def test_dpo_from_sft_adapter(tmp_path, tiny_llama_dir):
    pytest.importorskip("trl")
    sft = run_sft(_recipe(tmp_path, tiny_llama_dir, "sft"))
    config = _recipe(tmp_path, tiny_llama_dir, "dpo", init_adapter=str(sft),
                     training={"save_steps": 2})  # fmt: skip
    out = run_dpo(config)
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logs if "loss" in row]
    # step 1 is logged from the forward before the first update: policy == reference (the SFT
    # adapter; the base model would give nonzero rewards), so every margin is 0 and the loss log 2
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert logs[0]["rewards/chosen"] == 0.0 and logs[0]["rewards/rejected"] == 0.0
    assert logs[1]["rewards/chosen"] != 0.0  # the policy moved away from the reference
    init, trained = _lora_weights(sft), _lora_weights(out)
    assert trained.keys() == init.keys() and not _same_weights(trained, init)
    # only the trained adapter at the top; the checkpoint's frozen reference is still the SFT one
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2"]
    assert _same_weights(_lora_weights(out / "checkpoint-2" / "ref"), init)
    from chatretriever.methods.rationale.reranker import BinaryChoiceReranker

    docs = [p.document for p in choice_pairs(SESSIONS, PASSAGES, GOLD)][:2]
    tuned = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=out, device="cpu")
    assert np.isfinite(tuned.score_pairs(docs, SESSIONS)).all()


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_init_adapter_must_be_an_adapter_dir(tmp_path, tiny_llama_dir, objective):
    run = run_sft if objective == "sft" else run_dpo
    if objective == "dpo":
        pytest.importorskip("trl")
    missing = _recipe(tmp_path, tiny_llama_dir, objective, init_adapter=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"init_adapter: .*nope: not a directory"):
        run(missing)
    (tmp_path / "empty").mkdir()
    empty = _recipe(tmp_path, tiny_llama_dir, objective, init_adapter=str(tmp_path / "empty"))
    with pytest.raises(
        ValueError,
        match=r"init_adapter: .*empty: not a LoRA adapter dir \(no adapter_config.json\)",
    ):
        run(empty)
    with pytest.raises(DataFormatError, match="init_adapter"):
        load_config(_write(tmp_path, {"init_adapter": 3}), TuneConfig.from_dict)

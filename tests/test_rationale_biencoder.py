"""The fine-tuned bi-encoder baseline of issue 16: ESConv training sessions as contrastive
examples (strategy and response tasks), its recipe, and a two-step training run on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from chatretriever.apps.registry import load_encoder
from chatretriever.io.training import read_training_examples
from chatretriever.methods.chatretriever.recipe import load_recipe, run_training
from chatretriever.methods.rationale import tasks
from chatretriever.types import Session, Turn

RECIPE = Path(__file__).parents[1] / "configs" / "rationale-biencoder.yaml"
DIALOGS = [
    {"dialog": [{"text": "I am sad.", "speaker": "usr"},
                {"text": "Why is that?", "speaker": "sys", "strategy": "Question"},
                {"text": "I failed my exam.", "speaker": "usr"},
                {"text": "That must hurt.", "speaker": "sys",
                 "strategy": "Reflection of feelings"},
                {"text": "Try a study plan.", "speaker": "sys",
                 "strategy": "Providing Suggestions or Information"}]},
    {"dialog": [{"text": "My dog died.", "speaker": "usr"},
                {"text": "I lost a pet too.", "speaker": "sys", "strategy": "Self-disclosure"},
                {"text": "It was hard.", "speaker": "usr"},
                {"text": "You did all you could.", "speaker": "sys",
                 "strategy": "Affirmation and Reassurance"}]},
]  # fmt: skip


@pytest.fixture
def train_sessions(tmp_path) -> list[Session]:
    """The task sessions of a fake MultiESC split (no real data needed)."""
    (tmp_path / "multiesc_valid.txt").write_text("\n".join(json.dumps(d) for d in DIALOGS))
    split = {"train": {"multiesc_valid.txt": "all"}, "eval": {}}
    (tmp_path / "split.json").write_text(json.dumps(split))
    split = tasks.load_split(tmp_path / "split.json", tmp_path)
    return tasks.task_sessions(tasks.split_dialogs(split, "train"))


def test_strategy_examples_hold_the_gold_and_the_seven_others(train_sessions):
    examples = tasks.strategy_examples(train_sessions)
    all_ids = {p.id for p in tasks.strategy_passages()}
    assert [ex.id for ex in examples] == [s.id for s in train_sessions]
    assert [ex.positives[0].id for ex in examples] == [
        "question", "reflection", "suggestions", "self-disclosure", "affirmation",
    ]  # fmt: skip
    for ex, s in zip(examples, train_sessions, strict=True):
        (pos,) = ex.positives
        assert len(ex.negatives) == 7
        assert pos.id not in {n.id for n in ex.negatives}
        assert pos.text not in {n.text for n in ex.negatives}
        assert {pos.id} | {n.id for n in ex.negatives} == all_ids
        assert ex.messages == s.turns and ex.messages[-1].role == "user"
        assert ex.target == s.response and ex.source == tasks.STRATEGY_SOURCE
    # the two-message reply: the second turn's session is the first's, its prefix in metadata
    assert examples[2].messages == examples[1].messages
    assert examples[2].metadata["supporter_prefix"] == ["That must hurt."]


def test_write_contrastive_is_read_back_by_the_training_reader(tmp_path, train_sessions):
    path = tmp_path / "out" / "strategy" / "train" / "contrastive.jsonl"
    assert tasks.write_contrastive(path, train_sessions) == 5
    back = read_training_examples(path)
    assert [ex.to_dict() for ex in back] == [
        ex.to_dict() for ex in tasks.strategy_examples(train_sessions)
    ]
    assert not list(path.parent.glob(".*tmp*"))  # the atomic writer left no temporary file


def test_strategy_examples_refuse_a_session_without_a_strategy():
    bare = Session("s1", (Turn("user", "hi"),), response="hello", metadata={})
    with pytest.raises(ValueError, match="s1.*strategy_id None"):
        tasks.strategy_examples([bare])
    wrong = Session("s2", (Turn("user", "hi"),), metadata={"strategy_id": "sarcasm"})
    with pytest.raises(ValueError, match="s2.*'sarcasm'"):
        tasks.strategy_examples([wrong])


def _dialog_sessions(n_dialogs: int, turns: int) -> list[Session]:
    return [
        Session(
            f"d{d}_{t}",
            (Turn("user", f"problem {d} part {t}"),),
            response=f"reply {t} in dialog {d}",
            metadata={"dialog": f"d{d}"},
        )
        for d in range(n_dialogs)
        for t in range(turns)
    ]


@pytest.mark.parametrize("n_dialogs", [2, 6])  # few candidates (listed) and many (drawn)
def test_response_examples_draw_negatives_from_other_dialogs(n_dialogs):
    sessions = _dialog_sessions(n_dialogs, turns=3)
    examples = tasks.response_examples(sessions, n_negatives=2, seed=1)
    assert examples == tasks.response_examples(sessions, n_negatives=2, seed=1)
    for ex, s in zip(examples, sessions, strict=True):
        assert ex.positives[0].id == tasks.response_doc_id(s.id)
        assert ex.positives[0].text == s.response == ex.target
        negs = [n.id for n in ex.negatives]
        assert len(negs) == len(set(negs)) == 2
        assert all(not n.startswith(f"{s.metadata['dialog']}_") for n in negs)
    few = tasks.response_examples(_dialog_sessions(2, turns=1), n_negatives=5)
    assert [len(ex.negatives) for ex in few] == [1, 1]  # only one turn of another dialog
    with pytest.raises(ValueError, match="n_negatives"):
        tasks.response_examples(sessions, n_negatives=-1)
    no_dialog = Session("x", (Turn("user", "q"),), response="r")
    with pytest.raises(ValueError, match="x: metadata.dialog"):
        tasks.response_examples([no_dialog])


def test_recipe_is_contrastive_only_with_seven_hard_negatives():
    cfg = load_recipe(RECIPE)
    assert (cfg.loss.alpha, cfg.loss.n_hard_negatives, cfg.loss.in_batch) == (0.0, 7, True)
    assert not cfg.loss.uses_lm
    assert (cfg.retriever.max_session_len, cfg.retriever.max_passage_len) == (256, 64)
    assert cfg.lora.enabled and cfg.model == "smollm2-135m-instruct"
    files = [f.path for f in cfg.data.files]
    assert files == ["outputs/esconv/strategy/train/contrastive.jsonl"]


def test_two_training_steps_on_the_contrastive_file(tmp_path, train_sessions, tiny_llama_dir):
    data = tmp_path / "contrastive.jsonl"
    tasks.write_contrastive(data, train_sessions)
    overrides = [
        f"model={tiny_llama_dir}",
        f"output_dir={tmp_path / 'run'}",
        f"data.files=[{{path: {data}}}]",
        "retriever.dtype=fp32",
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0",
        "training.max_steps=2",
        "training.per_device_train_batch_size=2",
        "training.warmup_steps=0",
        "training.logging_steps=1",
        "training.use_cpu=true",
    ]
    out = run_training(load_recipe(RECIPE, overrides))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [row for row in log if "loss" in row]
    assert len(steps) == 2
    for row in steps:
        assert np.isfinite(row["loss"]) and row["loss"] == pytest.approx(row["loss_contrastive"])
        assert "loss_session_lm" not in row  # alpha 0: contrastive only
    state = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())  # B starts at 0
    assert (out / "train_config.yaml").is_file()
    # the run dir is an encoder by name, as benchmarks and the CLI load models
    enc = load_encoder(str(out))
    q = enc.encode_sessions(train_sessions)  # (5, D)
    p = enc.encode_passages(tasks.strategy_passages())  # (8, D)
    assert q.shape == (5, enc.dim) and p.shape == (8, enc.dim)
    assert np.isfinite(q @ p.T).all()

"""Teacher distillation: the KL loss by hand, teacher scores in the training file and the
collator, the builder step that scores with a teacher, and a tiny training run with it on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import HashEncoder
from fixtures import write

from chatretriever.errors import DataFormatError
from chatretriever.io.training import (
    TeacherScores,
    TrainingExample,
    TrainingPassage,
    example_from_dict,
    read_training_examples,
    write_training_examples,
)
from chatretriever.modeling.candidates import positive_index, teacher_slot_scores
from chatretriever.modeling.losses import score_distillation_loss
from chatretriever.types import Passage, Session, Turn


def _kl(teacher: list[float], student: list[float]) -> float:
    """KL(softmax(teacher) || softmax(student)) written out with math.exp."""
    zt, zs = sum(math.exp(x) for x in teacher), sum(math.exp(x) for x in student)
    p = [math.exp(x) / zt for x in teacher]
    q = [math.exp(x) / zs for x in student]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_distillation_loss_equals_the_kl_worked_out_by_hand():
    student = torch.tensor([[0.2, 0.1, 0.0], [0.3, 0.3, 0.1]])
    teacher = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, float("nan")]])
    valid = torch.tensor([[True, True, True], [True, True, True]])
    out = score_distillation_loss(student, teacher, valid, 0.1, 0.2)
    # row 0: teacher/0.2 = [4.5, 2.5, 0.5], student/0.1 = [2, 1, 0]; row 1: its NaN slot is
    # left out: teacher [1, 4], student [3, 3]
    want = (_kl([4.5, 2.5, 0.5], [2.0, 1.0, 0.0]) + _kl([1.0, 4.0], [3.0, 3.0])) / 2
    assert set(out) == {"distill"}
    assert out["distill"].item() == pytest.approx(want, rel=1e-5)
    assert want == pytest.approx(0.5 * (0.11562 + 0.50227), rel=1e-3)  # worked on paper


def test_distillation_leaves_out_padding_and_rows_with_one_candidate():
    student = torch.tensor([[1.0, 0.0, 5.0], [1.0, 9.0, 9.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 7.0], [0.3, 0.1, 0.2]])
    valid = torch.tensor([[True, True, False], [True, False, False]])  # row 1: its positive only
    out = score_distillation_loss(student, teacher, valid, 1.0, 1.0)["distill"]
    assert out.item() == pytest.approx(_kl([0.0, 1.0], [1.0, 0.0]), rel=1e-6)  # mean of 1 row
    out.backward()
    assert student.grad[0, 2] == 0 and bool((student.grad[1] == 0).all())
    same = score_distillation_loss(
        torch.tensor([[2.0, 1.0]]), torch.tensor([[2.0, 1.0]]), None, 1, 1
    )
    assert same["distill"].item() == pytest.approx(0.0, abs=1e-7)  # same distribution: KL 0
    with pytest.raises(ValueError, match="both be"):
        score_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 2))


def _example(n_pos: int = 2, n_neg: int = 2, teacher: bool = True) -> TrainingExample:
    pos = tuple(TrainingPassage(f"positive {i}", f"p{i}") for i in range(n_pos))
    neg = tuple(TrainingPassage(f"negative {i}", f"n{i}") for i in range(n_neg))
    scores = TeacherScores("t", tuple(0.9 - 0.1 * i for i in range(n_pos)), (0.3, 0.2)[:n_neg])
    return TrainingExample(
        "ex", (Turn("user", "q"),), pos, neg, source="s", teacher=scores if teacher else None
    )


def test_teacher_scores_round_trip_and_bad_ones_name_the_field(tmp_path):
    ex = _example()
    path = tmp_path / "train.jsonl"
    write_training_examples(path, [ex])
    assert read_training_examples(path) == [ex]
    row = json.loads(path.read_text())
    assert row["teacher"] == {
        "model": "t",
        "query": "",
        "positives": [0.9, 0.8],
        "negatives": [0.3, 0.2],
    }
    row["teacher"]["negatives"] = [0.3]
    write(path, json.dumps(row) + "\n")
    with pytest.raises(
        DataFormatError, match=r"train.jsonl:1: field 'teacher.negatives'.*2 scores"
    ):
        read_training_examples(path)
    row["teacher"] = {"positives": [1, 2], "negatives": [0, 0]}
    with pytest.raises(DataFormatError, match="teacher.model"):
        example_from_dict(row, path, 3)
    with pytest.raises(ValueError, match="score again"):
        TrainingExample("x", ex.messages, ex.positives, ex.negatives[:1], teacher=ex.teacher)


def test_collator_slots_get_the_teacher_score_of_the_sampled_positive():
    ex, short = _example(), _example(n_pos=1, n_neg=1)
    for epoch in range(4):
        got = teacher_slot_scores([ex, short], n_negatives=2, seed=3, epoch=epoch)
        picked = positive_index(ex.id, 2, 3, epoch)
        assert got[0].tolist() == pytest.approx([0.9 - 0.1 * picked, 0.3, 0.2])
        assert got[1, :2].tolist() == pytest.approx([0.9, 0.3]) and math.isnan(got[1, 2])
    with pytest.raises(ValueError, match="--teacher"):
        teacher_slot_scores([_example(teacher=False)], 2)


def test_builder_scores_positives_and_negatives_with_the_teacher_query():
    from chatretriever.retrieval.training_data.teacher import add_teacher_scores, teacher_query

    enc = HashEncoder(dim=256)
    turns = (Turn("user", "tell me about jaguars"), Turn("user", "what do they eat"))
    pos = (TrainingPassage("jaguars eat deer and caimans", "d"),)
    neg = (TrainingPassage("pasta with tomato sauce", "x"),)
    plain = TrainingExample("a", turns, pos, neg)
    rewritten = TrainingExample("b", turns, pos, neg, metadata={"rewrite": "what do jaguars eat"})
    assert teacher_query(plain) == ("what do they eat\ntell me about jaguars", "user_turns")
    assert teacher_query(rewritten) == ("what do jaguars eat", "rewrite")
    out = add_teacher_scores([plain, rewritten], enc, show_progress=False)
    for ex in out:
        (q,) = enc.encode_sessions([Session("q", (Turn("user", teacher_query(ex)[0]),))])
        p, n = enc.encode_passages([Passage("p", pos[0].text), Passage("n", neg[0].text)])
        assert ex.teacher.positives == pytest.approx([float(q @ p)], rel=1e-5)
        assert ex.teacher.negatives == pytest.approx([float(q @ n)], rel=1e-5)
        assert ex.teacher.model.startswith("fake-hash@")
    assert [ex.teacher.query for ex in out] == ["user_turns", "rewrite"]
    assert out[0].teacher.positives[0] > out[0].teacher.negatives[0]


def test_a_teacher_that_keeps_a_texts_end_reads_the_question_last():
    """An LLM teacher (`keeps_text_end`, e.g. a ChatRetriever) cuts an over-long text's start:
    its joined query must end with the question, or a long one would lose it."""
    from chatretriever.retrieval.training_data.teacher import add_teacher_scores

    class EndKeepingEncoder(HashEncoder):
        keeps_text_end = True

        def encode_sessions(self, sessions, *args, **kwargs):
            self.seen = [s.question for s in sessions]
            return super().encode_sessions(sessions, *args, **kwargs)

    enc = EndKeepingEncoder(dim=64)
    turns = (Turn("user", "tell me about jaguars"), Turn("user", "what do they eat"))
    ex = TrainingExample("a", turns, (TrainingPassage("jaguars eat deer", "d"),), ())
    add_teacher_scores([ex], enc, show_progress=False)
    assert enc.seen == ["tell me about jaguars\nwhat do they eat"]


def test_training_with_distillation_logs_the_part_and_changes_the_adapter(tmp_path, tiny_llama_dir):
    import yaml
    from safetensors.torch import load_file

    from chatretriever.methods.chatretriever.recipe import load_recipe, run_training

    topics = ["volcano lava", "penguin bird", "violin bow", "glacier ice"]
    rows = []
    for i, t in enumerate(topics):
        others = [topics[(i + j) % 4] for j in (1, 2)]
        ex = TrainingExample(
            f"ex{i}",
            (Turn("user", f"tell me about {t}"), Turn("user", "what is it?")),
            (TrainingPassage(f"{t} facts"),),
            tuple(TrainingPassage(f"{o} facts") for o in others),
            teacher=TeacherScores("t", (0.8,), (0.5, 0.1)),
        )
        rows.append(ex)
    data = tmp_path / "train.jsonl"
    write_training_examples(data, rows)
    recipe = {
        "model": str(tiny_llama_dir),
        "output_dir": str(tmp_path / "run"),
        "retriever": {"max_session_len": 48, "max_passage_len": 16, "max_response_len": 16},
        "loss": {"alpha": 0.0, "session_mask": "none", "temperature": 0.05, "n_hard_negatives": 2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "distill": {"weight": 0.5, "temperature": 0.1},
        "data": {"files": [{"path": str(data)}]},
        "training": {
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "learning_rate": 5e-3,
            "warmup_steps": 0,
            "logging_steps": 1,
            "save_steps": 10,
            "use_cpu": True,
            "dataloader_num_workers": 0,
        },
    }
    cfg = load_recipe(write(tmp_path / "recipe.yaml", yaml.safe_dump(recipe)))
    assert (cfg.distill.weight, cfg.distill.temperature) == (0.5, 0.1)
    out = run_training(cfg)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [row for row in log if "loss" in row]
    assert len(steps) == 2
    for row in steps:
        assert np.isfinite(row["loss_distill"]) and row["loss_distill"] > 0
        assert row["loss"] == pytest.approx(row["loss_contrastive"] + row["loss_distill"], rel=1e-4)
    state = load_file(str(Path(out) / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())  # B starts at 0
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["distill"] == {"weight": 0.5, "temperature": 0.1}

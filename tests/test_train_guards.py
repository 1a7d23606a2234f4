"""`chatretriever train` refuses, before any model loads, what would train nothing or train
something else than the recipe says: no batch to fill, a resume of a finished run or with
another recipe, missing teacher scores, bad `--set` values and `training.*` choices, caps of an
absent source; gradient accumulation weighs LM tokens as one big batch; `build-train` names
the file and line of a duplicate id."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import yaml
from fixtures import write
from test_train import (
    _assert_same_update,
    _initial_retriever,
    _recipe,
    _relevance_rows,
    _trainable,
    _trainable_of,
)

from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.methods.chatretriever.recipe import load_recipe, run_training


def _sha(path: Path) -> str:
    return hashlib.sha1((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def _one_error_line(capsys) -> str:
    """The one `error:` line of a command (progress bars and INFO logs aside; an exception the
    CLI did not handle would have left `main` instead of its exit status 2)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


# --------------------------------------------------------------------- 1: zero optimizer steps
@pytest.mark.parametrize(
    "overrides",
    [
        ["training.per_device_train_batch_size=32"],  # 12 examples (6 x repeat 2) < 32
        ["training.max_steps=-1", "training.num_train_epochs=1",
         "training.per_device_train_batch_size=32"],  # epoch mode
        ["data.caps={b: 1}", "data.files=[{path: SRC}]"],  # capped below one batch of 3
    ],
)  # fmt: skip
def test_a_run_that_fills_no_batch_is_refused_before_training(tmp_path, tiny_llama_dir, overrides):
    rows = [
        {
            "id": f"e{i}",
            "source": "a" if i < 1 else "b",
            "messages": [{"role": "user", "content": f"question {i}"}],
            "positives": [{"text": f"answer {i}"}],
        }
        for i in range(6)
    ]
    recipe = _recipe(tmp_path, tiny_llama_dir, rows)
    src = str(tmp_path / "train.jsonl")
    cfg = load_recipe(recipe, [o.replace("SRC", src) for o in overrides])
    n = 2 if "data.caps={b: 1}" in overrides else 12  # one of source a, one of b (no repeat)
    with pytest.raises(ValueError, match=rf"^{n} training examples .*per_device_train_batch"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()  # no "saved" untrained model


# ------------------------------------------------------------- 2 and 3: what --resume continues
def test_resume_of_a_finished_run_without_checkpoints_keeps_the_model(tmp_path, tiny_llama_dir):
    recipe = _recipe(tmp_path, tiny_llama_dir, max_steps=1, save_strategy="no")
    run_training(load_recipe(recipe))
    out = tmp_path / "run"
    before = _sha(out)
    with pytest.raises(ValueError, match="finished model .*no checkpoint.*--resume has nothing"):
        run_training(load_recipe(recipe, ["training.seed=3"]), resume=True)
    assert _sha(out) == before
    # a kill inside the final save's renames leaves the marker aside: still a finished model
    holder = out / ".run.x1.old"
    holder.mkdir()
    (out / "chatretriever.json").rename(holder / "chatretriever.json")
    with pytest.raises(ValueError, match="finished model"):
        run_training(load_recipe(recipe), resume=True)


def test_resume_with_another_recipe_names_the_keys(tmp_path, tiny_llama_dir, capsys):
    recipe = _recipe(tmp_path, tiny_llama_dir, max_steps=2, save_steps=2)
    run_training(load_recipe(recipe))  # leaves checkpoint-2 and train_config.yaml
    out = tmp_path / "run"
    saved = (out / "train_config.yaml").read_text()
    changed = ["--set", "loss.alpha=0.9", "--set", "training.learning_rate=0.1"]
    assert main(["train", str(recipe), "--resume", *changed]) == 2
    err = _one_error_line(capsys)
    assert "loss.alpha: 0.3 -> 0.9" in err and "training.learning_rate: 0.005 -> 0.1" in err
    assert "training.seed" not in err and "--overwrite" in err
    assert (out / "train_config.yaml").read_text() == saved  # the run's own recipe kept
    from chatretriever.modeling.run_dir import check_resumed_recipe

    # the same recipe, or one that only trains longer and logs / saves / loads otherwise: fine
    check_resumed_recipe(load_recipe(recipe), out)
    longer = ["training.max_steps=9", "training.logging_steps=5", "training.seed=42",
              "training.dataloader_num_workers=2"]  # fmt: skip
    check_resumed_recipe(load_recipe(recipe, longer), out)  # seed 42 is the default


# ------------------------------------------------------------------------ 4: teacher scores
def test_missing_teacher_scores_are_named_before_the_model_loads(
    tmp_path, tiny_llama_dir, monkeypatch
):
    from chatretriever.methods.chatretriever.model import ChatRetriever

    def row(i: int, teacher: bool) -> dict:
        out = {
            "id": f"t{i}",
            "messages": [{"role": "user", "content": f"q {i}"}],
            "positives": [{"text": f"p {i}"}],
        }
        if teacher:
            out["teacher"] = {"model": "m", "positives": [0.5], "negatives": []}
        return out

    ok = write(tmp_path / "ok.jsonl", "".join(json.dumps(row(i, True)) + "\n" for i in range(4)))
    lines = [row(9, True), row(10, False)]
    missing = write(tmp_path / "missing.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.setattr(ChatRetriever, "from_pretrained", None)  # loading would fail loudly
    cfg = load_recipe(
        _recipe(tmp_path, tiny_llama_dir),
        ["distill.weight=0.5", f"data.files=[{ok}, {missing}]"],
    )
    with pytest.raises(DataFormatError, match=r"missing.jsonl:2: field 'teacher': missing"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------- 5, 6, 8, 9: the recipe, as read
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("data.files=[{path: x", r"--set 'data.files=\[\{path: x': the value is not valid YAML"),
        ("loss.alpha=: bad", "--set 'loss.alpha=: bad': the value is not valid YAML"),
        ("training.save_strategy=no", r"training.save_strategy: got false .*quote it"),
        ("training.optim=bogus", r"training.optim: 'bogus' is not one of \[.*'adamw_torch'"),
        ("training.lr_scheduler_type=bogus", r"training.lr_scheduler_type: 'bogus' is not one"),
        ("training.bf16=true", "training.bf16: precision is set by the recipe's dtype"),
        ("training.output_dir=elsewhere", "training.output_dir: the output directory is the"),
        ("method=items", "method must be 'chatretriever'"),
    ],
)
def test_bad_recipe_values_are_one_line_at_dry_run(tmp_path, capsys, override, match):
    recipe = _recipe(tmp_path, Path("some-model"))
    assert main(["train", str(recipe), "--dry-run", "--set", override]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"error: {recipe}:"), err
    assert __import__("re").search(match, err), err


def test_quoted_no_and_the_recipes_own_method_are_accepted(tmp_path, capsys):
    recipe = _recipe(tmp_path, Path("some-model"))
    raw = yaml.safe_load(recipe.read_text())
    write(recipe, yaml.safe_dump({"method": "chatretriever", **raw}))
    args = ["train", str(recipe), "--dry-run", "--set", "training.save_strategy='no'"]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "chatretriever" and printed["training"]["save_strategy"] == "no"
    # `--set method=uniconv` chooses the UniConv recipe, as `method: uniconv` does
    assert main(["train", str(recipe), "--dry-run", "--set", "method=uniconv"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "uniconv" and "uniconv" in printed


# ------------------------------------------------------------------------ 7: data.caps
def test_caps_of_an_absent_source_are_refused_and_counts_logged(tmp_path, tiny_llama_dir, caplog):
    from chatretriever.modeling.recipe_data import cap_sources

    class Ex:
        def __init__(self, i: int, source: str) -> None:
            self.id, self.source = f"x{i}", source

    parts = [([Ex(i, "mtrag" if i % 2 else "topiocqa") for i in range(6)], 1)]
    with pytest.raises(ValueError, match=r"data.caps.topiocqaa: .*present: 'mtrag', 'topiocqa'"):
        cap_sources(parts, {"topiocqaa": 1})
    with caplog.at_level(logging.INFO, logger="chatretriever.modeling.recipe"):
        (kept, _), = cap_sources(parts, {"topiocqa": 1})  # fmt: skip
    assert [ex.source for ex in kept].count("topiocqa") == 1 and len(kept) == 4
    assert "data.caps.topiocqa: 3 -> 1 examples" in caplog.text


# -------------------------------------------------------------- 10: a killed final save's dirs
def test_leftovers_of_a_killed_final_save_are_removed_by_the_next_run(tmp_path, tiny_llama_dir):
    recipe = _recipe(tmp_path, tiny_llama_dir, max_steps=1, save_strategy="no")
    out = tmp_path / "run"
    for name in (".run.ab12.tmp", ".run.cd34.old"):  # staging / set-aside dirs, no marker
        (out / name).mkdir(parents=True)
        (out / name / "adapter_model.safetensors").write_bytes(b"old")
    run_training(load_recipe(recipe))
    assert sorted(p.name for p in out.glob(".run.*")) == []
    assert (out / "chatretriever.json").is_file()


# ------------------------------------------------------- 12: accumulation of unequal targets
def test_accumulation_weighs_lm_tokens_as_one_big_batch(tmp_path, tiny_llama_dir):
    """Targets of 1 and 12 words: the session LM part is the token mean over the step's four
    examples, also when they come in two micro-batches (before, each micro-batch's mean)."""
    rows = _relevance_rows()
    for row, target in zip(
        rows, ("Yes.", "No.", " ".join(["word"] * 12), "Maybe not."), strict=True
    ):
        row["target"] = target
    sgd = {"max_steps": 1, "optim": "sgd", "learning_rate": 0.5,
           "lr_scheduler_type": "constant", "max_grad_norm": 0.0}  # fmt: skip
    runs, logs = {}, {}
    for name, bs, accumulation in (("big", 4, 1), ("accumulated", 2, 2)):
        recipe = _recipe(
            tmp_path / name,
            tiny_llama_dir,
            rows,
            repeat=1,
            loss={"in_batch": False, "alpha": 1.0},
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accumulation,
            **sgd,
        )
        out = run_training(load_recipe(recipe, ["retriever.dtype=fp32"]))
        runs[name] = _trainable(out)
        logs[name] = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert logs["accumulated"]["loss_session_lm"] == pytest.approx(
        logs["big"]["loss_session_lm"], abs=1e-5
    )
    start = _trainable_of(_initial_retriever(load_recipe(recipe, ["retriever.dtype=fp32"])))
    _assert_same_update(runs["accumulated"], runs["big"], start)


# --------------------------------------------------------- 13: build-train duplicate ids
def test_build_train_names_the_file_and_line_of_a_duplicate_id(tmp_path, capsys):
    line = {"id": "s1", "messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello there"}]}  # fmt: skip
    one = write(tmp_path / "one.jsonl", json.dumps(line) + "\n" + json.dumps(line) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["build-train", "sessions", str(one), "--out", str(out), "--no-progress"]) == 2
    assert f"{one}:2: field 'id': duplicate id 's1'" in _one_error_line(capsys)
    two = write(tmp_path / "two.jsonl", json.dumps(line) + "\n")
    single = write(tmp_path / "single.jsonl", json.dumps(line) + "\n")
    assert main(["build-train", "sessions", str(single), str(two), "--out", str(out)]) == 2
    assert f"{two}:1: field 'id': duplicate id 's1' (first at {single}:1)" in _one_error_line(
        capsys
    )
    assert not out.exists()

"""Reranker tuning runs: the output dir guard (--resume / --overwrite) and DPO's token ids."""

from __future__ import annotations

import pytest
import yaml

from chatretriever.cli import main
from chatretriever.methods.rationale.pairs import (
    ChoiceCollator,
    ChoicePair,
    choice_pairs,
    dpo_rows,
    write_pairs,
)
from chatretriever.methods.rationale.prompts import BinaryChoicePrompt
from chatretriever.methods.rationale.tuning import TuneConfig, prepare_output_dir, run_sft
from chatretriever.modeling.recipe import deep_merge, load_config
from chatretriever.types import Passage, Session, Turn

PASSAGES = [Passage("r", "mirror feelings"), Passage("s", "give advice")]
SESSIONS = [Session("a", (Turn("user", "i am sad"),)), Session("b", (Turn("user", "help me"),))]


def _recipe(tmp_path, model_dir, **extra) -> TuneConfig:
    write_pairs(tmp_path / "pairs.jsonl", choice_pairs(SESSIONS, PASSAGES, {"a": "r", "b": "s"}))
    raw = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "out"),
        "max_document_tokens": 16,
        "max_query_tokens": 32,
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "data": {"files": [{"path": str(tmp_path / "pairs.jsonl")}]},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 1,
                     "logging_steps": 1, "warmup_steps": 0},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(deep_merge(raw, extra)))
    return load_config(tmp_path / "r.yaml", TuneConfig.from_dict)


def _weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_a_second_run_into_a_finished_one_is_refused(tmp_path, tiny_llama_dir, capsys):
    first = run_sft(_recipe(tmp_path, tiny_llama_dir))
    before = _weights(first)
    capsys.readouterr()
    # the CLI: one line naming both ways out, and the adapter untouched
    assert main(["rerank-train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run (checkpoint-1" in err
    assert "--resume" in err and "--overwrite" in err
    assert _weights(first).keys() == before.keys()
    assert all((_weights(first)[k] == v).all() for k, v in before.items())
    # a finished run without checkpoints (save_strategy "no") is a run too
    import shutil

    shutil.rmtree(first / "checkpoint-1")
    with pytest.raises(ValueError, match=r"already holds a run \(adapter_config.json\)"):
        prepare_output_dir(_recipe(tmp_path, tiny_llama_dir))
    # and --resume of it has nothing to continue: refused, the adapter kept (it retrained)
    with pytest.raises(ValueError, match=r"finished model \(adapter_config.json\) and no"):
        prepare_output_dir(_recipe(tmp_path, tiny_llama_dir), resume=True)
    assert all((_weights(first)[k] == v).all() for k, v in before.items())
    # DPO into it is refused the same way (before TRL or the model loads)
    dpo = main(["rerank-train", str(tmp_path / "r.yaml"), "--set", "objective=dpo"])
    assert dpo == 2 and "already holds a run" in capsys.readouterr().err
    assert main(["rerank-train", str(tmp_path / "r.yaml"), "--resume", "--overwrite"]) == 2
    assert "not both" in capsys.readouterr().err


def test_overwrite_starts_over_and_resume_needs_the_same_recipe(tmp_path, tiny_llama_dir):
    run_sft(_recipe(tmp_path, tiny_llama_dir, training={"max_steps": 2, "save_steps": 2}))
    out = tmp_path / "out"
    assert (out / "checkpoint-2").is_dir()
    run_sft(_recipe(tmp_path, tiny_llama_dir), overwrite=True)
    # the old run's checkpoint is gone: a later --resume cannot continue it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert yaml.safe_load((out / "train_config.yaml").read_text())["training"]["max_steps"] == 1
    # another wording or LoRA rank is another run: refused, naming what differs
    with pytest.raises(ValueError, match=r"another recipe .*lora.*wording"):
        prepare_output_dir(_recipe(tmp_path, tiny_llama_dir, wording="tf", lora={"r": 4}), True)
    with pytest.raises(ValueError, match=r"training.learning_rate: .*--overwrite"):
        prepare_output_dir(_recipe(tmp_path, tiny_llama_dir, training={"learning_rate": 1}), True)
    # training longer is what --resume is for: step 2 runs from checkpoint-1
    longer = _recipe(tmp_path, tiny_llama_dir, training={"max_steps": 2})
    run_sft(longer, resume=True)
    log = (out / "train_log.jsonl").read_text().splitlines()
    steps = [yaml.safe_load(line).get("step") for line in log]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert 2 in steps


def test_dpo_trains_on_the_ids_the_reranker_scores(tmp_path, tiny_llama_dir):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatretriever.methods.rationale.tuning import _id_rows_dpo_trainer
    from chatretriever.modeling.adapters import peft_lora_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = BinaryChoicePrompt(tokenizer, "tf")
    # a typed end-of-turn marker stays text for the scorer; decoded and tokenized again (the
    # old text rows) it became the special token
    typed = Session("x", (Turn("user", "i typed <|im_end|> here"),))
    pairs = [ChoicePair("Question\nask a question", typed, True),
             ChoicePair("give advice", SESSIONS[0], False)]  # fmt: skip
    scored = ChoiceCollator(prompt)(pairs)["sequences"]
    rows = dpo_rows(prompt, pairs)
    assert [r["prompt_ids"] for r in rows] == scored
    retokenized = tokenizer(tokenizer.decode(scored[0]), add_special_tokens=False)["input_ids"]
    assert retokenized != scored[0]  # why text rows could not be used
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=None, report_to=[],
                         use_cpu=True, bf16=False, per_device_train_batch_size=2)  # fmt: skip
    trainer = _id_rows_dpo_trainer(trl)(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_lora_config(TuneConfig().lora),
    )
    fed = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    yes, no = prompt.option_ids
    eos = tokenizer.eos_token_id
    for i, (ids, option) in enumerate([(scored[0], yes), (scored[1], no)]):  # the chosen rows
        row = fed["input_ids"][i][fed["attention_mask"][i].bool()].tolist()
        assert row == ids + [option, eos]
        completion = fed["input_ids"][i][fed["completion_mask"][i].bool()].tolist()
        assert completion == [option, eos]


def _no_model(*args, **kwargs):
    raise AssertionError("the model loaded before the training arguments were checked")


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_refused_training_settings_fail_before_the_model_loads(
    tmp_path, tiny_llama_dir, monkeypatch, capsys, objective
):
    """TrainingArguments refuses some combinations only when built (load_best_model_at_end
    without evaluation): that happens before the backbone loads, and the CLI says it in one line."""
    if objective == "dpo":
        pytest.importorskip("trl")
    from chatretriever.methods.rationale import tuning

    monkeypatch.setattr(tuning, "_model_and_prompt", _no_model)
    _recipe(tmp_path, tiny_llama_dir, objective=objective)
    argv = [
        "rerank-train",
        str(tmp_path / "r.yaml"),
        "--set",
        "training.load_best_model_at_end=true",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "load_best_model_at_end" in err and "model loaded" not in err
    assert not (tmp_path / "out").exists()  # nothing written either

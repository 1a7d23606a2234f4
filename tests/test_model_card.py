"""Model cards: the renderer on inline facts, and the README.md each training command's final
save leaves (its usage snippet run on the tiny model, its command lines parsed by the real
parsers), a user's README kept, our old card replaced, a failed card leaving the old file."""

from __future__ import annotations

import json
import logging
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from readme_commands import ROOT, Checker, extract
from test_items_train import _data_and_recipe as items_recipe
from test_rationale_distill import recipe  # noqa: F401 (the rerank-distill recipe fixture)
from test_rationale_tuning_runs import _recipe as tune_recipe
from test_train import _recipe as csit_recipe
from test_uniconv import _recipe as uniconv_recipe

from chatretriever.cli import build_parser, main
from chatretriever.modeling import model_card
from chatretriever.modeling.model_card import (
    CARD_FILE,
    MARKER,
    BaseModelFacts,
    CardFacts,
    CardSpec,
    base_model_facts,
    is_replaceable,
    render_card,
    write_run_card,
)
from chatretriever.modeling.sources import BUILTIN_MODELS

SPEC = CardSpec(
    what="A test model",
    python="load($dir, base=$model)",
    cli=("chatretriever encode C.jsonl --model $dir --out E",),
    settings=("loss.temperature", "loss.alpha", "init_adapter", "absent.key"),
)
RECIPE = {
    "model": "smollm2-135m-instruct",
    "output_dir": "runs/my model",
    "loss": {"temperature": 0.01, "alpha": 0.3},
    "init_adapter": None,
    "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05,
             "target_modules": ["v_proj", "q_proj"]},
    "data": {"files": [{"path": "a.jsonl", "repeat": 1, "limit": None},
                       {"path": "b.jsonl", "repeat": 4, "limit": 100}],
             "caps": {"topiocqa": 2000}, "cap_seed": 0, "query": "session"},
}  # fmt: skip
LOG = [
    {"loss": 2.5, "loss_contrastive": 2.0, "loss_session_lm": 0.5, "step": 10, "epoch": 0.1},
    {"loss": 1.25, "loss_contrastive": 1.0, "loss_session_lm": 0.25, "step": 20, "epoch": 0.2},
    {"step": 20, "best_step": 10, "best_val_agreement": 0.75},
    {"train_runtime": 12.5, "train_loss": 1.9, "step": 20, "epoch": 0.2},
]


def _full_facts() -> CardFacts:
    return CardFacts(
        output_dir="runs/my model",
        spec=SPEC,
        recipe=RECIPE,
        training={
            "max_steps": 20,
            "num_train_epochs": 3.0,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-4,
            "seed": 7,
            "world_size": 2,
        },
        log_history=LOG,
        n_examples=1234,
        base=base_model_facts("smollm2-135m-instruct"),
        lora=RECIPE["lora"],
        fingerprint="0123456789abcdef",
        precision="bf16",
        versions={"chatretriever": "9.9", "torch": "2.0"},
        date="2025-01-02 03:04 UTC",
    )


def _section(card: str, title: str) -> str:
    """The text of a `## title` section (empty when absent)."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card, re.M | re.S)
    return m.group(1) if m else ""


def _rows(card: str) -> dict[str, str]:
    """The training table's {setting: value}."""
    return dict(re.findall(r"^\| `([^`]+)` \| (.*) \|$", card, re.M))


def test_render_shows_every_fact_it_is_given():
    card = render_card(_full_facts())
    lines = card.splitlines()
    assert lines[0].startswith(MARKER) and "9.9" in lines[0] and lines[0].endswith("-->")
    assert lines[1] == "# my model"  # the output dir's name
    smol = BUILTIN_MODELS["smollm2-135m-instruct"]
    assert lines[3] == (
        f"A test model, trained from `smollm2-135m-instruct` (built in: {smol.description})."
    )
    assert "```python\nload('runs/my model', base='smollm2-135m-instruct')\n```" in card
    assert "chatretriever encode C.jsonl --model 'runs/my model' --out E" in card
    rows = _rows(card)
    assert rows == {
        "training.max_steps": "20",  # epochs do not bound a run with max_steps
        "training.per_device_train_batch_size": "8",
        "training.gradient_accumulation_steps": "2",
        "training.learning_rate": "0.0001",
        "training.seed": "7",
        "processes": "2",
        "LoRA": "r 16, alpha 32, dropout 0.05, on q_proj, v_proj",
        "loss.temperature": "0.01",
        "loss.alpha": "0.3",  # init_adapter (null) and absent.key are left out
    }
    data = card.split("Data:\n", 1)[1]
    assert "- `a.jsonl`\n- `b.jsonl` (repeat: 4, limit: 100)\n" in data
    assert "- `data.caps`: topiocqa: 2000\n- `data.cap_seed`: 0\n" in data
    assert "- Training examples used: 1234" in data
    log = _section(card, "Training log")
    assert "- Steps trained: 20\n" in log and "- `train_runtime`: 12.5 s\n" in log
    assert "- Kept: `best_step` 10, `best_val_agreement` 0.75\n" in log
    assert "| first | 10 | 2.5 | 2 | 0.5 |" in log and "| last | 20 | 1.25 | 1 | 0.25 |" in log
    assert "`loss_contrastive` | `loss_session_lm`" in log
    prov = _section(card, "Provenance")
    assert "`0123456789abcdef`" in prov and "computed in bf16" in prov
    assert "chatretriever 9.9, torch 2.0; card written 2025-01-02 03:04 UTC" in prov
    assert "`train_config.yaml`" in prov and "`train_log.jsonl`" in prov
    assert f"licence: {smol.licence} (`smollm2-135m-instruct`" in _section(card, "Licence")


def test_render_leaves_out_what_it_does_not_know():
    spec = replace(SPEC, python="load($dir)")  # no `model` in this recipe
    raw = {"output_dir": "x", "lora": {"enabled": False, "r": 16}, "loss": {"alpha": 0.5},
           "data": {"files": [], "caps": {}, "cap_seed": 0}}  # fmt: skip
    card = render_card(CardFacts(output_dir="out/x", spec=spec, recipe=raw, lora=raw["lora"]))
    assert card.splitlines()[1:4] == ["# x", "", "A test model."]  # no base named
    assert _rows(card) == {"LoRA": "off (full fine-tuning)", "loss.alpha": "0.5"}
    for absent in ("## Training log", "## Licence", "Fingerprint", "Data:", "Trained with"):
        assert absent not in card
    assert "`train_config.yaml`" in _section(card, "Provenance")
    # one logged loss: one row, no runtime line without the Trainer's closing row
    card = render_card(CardFacts("x", spec, raw, log_history=[{"loss": 3.0, "step": 1}]))
    log = _section(card, "Training log")
    assert "| first and last | 1 | 3 |" in log and "train_runtime" not in log


def test_base_model_facts_follow_saved_runs_to_the_registry(tmp_path):
    first, second = tmp_path / "v1", tmp_path / "v2"
    for run, base in ((first, "smollm2-135m-instruct"), (second, str(first))):
        run.mkdir()
        (run / "train_config.yaml").write_text(yaml.safe_dump({"model": base}))
    facts = base_model_facts(str(second))
    smol = BUILTIN_MODELS["smollm2-135m-instruct"]
    assert facts == BaseModelFacts(str(second), (str(first), smol.name), smol.name,
                                   smol.description, smol.licence)  # fmt: skip
    card = render_card(CardFacts("o", SPEC, {"model": str(second)}, base=facts))
    assert f"trained from `{second}` (a model saved by an earlier chatretriever run" in card
    assert f"licence: {smol.licence} (`{smol.name}`" in card
    # a loop of saved runs ends; a plain local directory has no registry entry
    (first / "train_config.yaml").write_text(yaml.safe_dump({"model": str(second)}))
    assert base_model_facts(str(second)).licence is None
    assert base_model_facts(str(tmp_path)) == BaseModelFacts(str(tmp_path))


# --- what each training command leaves ---------------------------------------------------------


def _card(out: Path) -> str:
    text = (out / CARD_FILE).read_text()
    assert text.startswith(MARKER)
    return text


def _block(card: str, lang: str) -> str:
    return re.search(rf"```{lang}\n(.*?)\n```", card, re.S).group(1)


def _run_python(card: str) -> dict:
    """Runs the card's Python snippet; returns its names."""
    names: dict = {}
    exec(compile(_block(card, "python"), "<card>", "exec"), names)  # noqa: S102 (our own card)
    return names


def _check_commands(card: str, out: Path) -> list:
    """The card's command lines: each `chatretriever` one parsed by the real parser (those
    naming --model or --adapter name this directory); every command checked as the README's
    are (subcommands and options exist, benchmark scripts too)."""
    parsed = []
    for line in _block(card, "bash").splitlines():
        words = shlex.split(line, comments=True)
        if words[0] == "chatretriever":
            args = build_parser().parse_args(words[1:])
            if "--model" in words or "--adapter" in words:
                assert str(out) in (getattr(args, "model", None), getattr(args, "adapter", None))
            parsed.append(args)
    checker = Checker(ROOT, card.split("\n"))
    assert checker.check(extract(card, checker.subcommands)) == []
    return parsed


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _first_loss_row(card: str) -> list[str]:
    return re.search(r"^\| first(?: and last)? \| (.*) \|$", card, re.M).group(1).split(" | ")


def test_train_card_loads_its_model_and_a_resume_writes_it_again(tmp_path, tiny_llama_dir):
    from chatretriever.methods.chatretriever.recipe import load_recipe, run_training

    path = csit_recipe(tmp_path, tiny_llama_dir, save_steps=1)
    out = run_training(load_recipe(path))
    card = _card(out)
    retriever = _run_python(card)["retriever"]
    assert retriever.encode_sessions([[{"role": "user", "content": "hi"}]]).shape[0] == 1
    assert f"Fingerprint: `{retriever.fingerprint}`" in card  # the identity an index records
    assert [a.command for a in _check_commands(card, out)] == ["index", "chat"]
    rows = _rows(card)
    assert rows["training.learning_rate"] == "0.005" and rows["loss.alpha"] == "0.3"
    assert rows["LoRA"] == "r 4, alpha 8, dropout 0.0, on k_proj, o_proj, q_proj, v_proj"
    assert "- Training examples used: 12" in card  # 6 examples x repeat 2
    assert f"trained from `{tiny_llama_dir}`" in card and "## Licence" not in card
    first = next(r for r in _log(out) if "loss" in r)
    step, loss = _first_loss_row(card)[:2]
    assert int(step) == first["step"] and float(loss) == pytest.approx(first["loss"], rel=1e-5)
    assert "- Steps trained: 2\n" in card
    # checkpoints get no card (peft's own template is there)
    assert not (out / "checkpoint-2" / CARD_FILE).read_text().startswith(MARKER)
    # --resume trains on and writes the card again
    run_training(load_recipe(path, ["training.max_steps=3"]), resume=True)
    assert "- Steps trained: 3\n" in _card(out) and _card(out) != card


def test_uniconv_card_answers_with_its_model(tmp_path, tiny_llama_dir):
    from chatretriever.methods.uniconv.recipe import load_recipe, run_training

    out = run_training(load_recipe(uniconv_recipe(tmp_path, tiny_llama_dir)))
    card = _card(out)
    names = _run_python(card)
    assert type(names["model"]).__name__ == "UniConv" and isinstance(names["answer"], str)
    assert [a.command for a in _check_commands(card, out)] == ["index", "answer"]
    rows = _rows(card)
    assert rows["uniconv.alpha"] == "0.5" and rows["uniconv.cii_negatives"] == "2"
    assert f"Fingerprint: `{names['model'].fingerprint}`" in card


def test_train_items_card_loads_its_embedder(tmp_path, tokenizer):
    from chatretriever.methods.items.recipe import load_item_recipe, run_item_training

    _, path = items_recipe(tmp_path, tokenizer, 2)
    out = run_item_training(load_item_recipe(path))
    card = _card(out)
    names = _run_python(card)
    assert names["items"].shape == (1, 32) and names["queries"].shape == (1, 32)
    assert [a.command for a in _check_commands(card, out)] == ["eval-items", "recommend"]
    rows = _rows(card)
    assert rows["LoRA"] == "off (full fine-tuning)" and rows["loss.n_negatives"] == "7"
    assert rows["training.learning_rate"] == "0.001" and "Fingerprint" not in card


def test_rerank_train_cards_sft_and_dpo(tmp_path, tiny_llama_dir):
    from chatretriever.methods.rationale.tuning import run_dpo, run_sft

    out = run_sft(tune_recipe(tmp_path, tiny_llama_dir))
    card = _card(out)
    scores = _run_python(card)["scores"]
    assert scores.shape == (1,)
    (args,) = _check_commands(card, out)
    assert (args.command, args.model, args.wording) == ("rerank", str(tiny_llama_dir), "ab")
    rows = _rows(card)
    assert rows["LoRA"] == "r 2, alpha 4, dropout 0.0, on k_proj, o_proj, q_proj, v_proj"
    assert rows["objective"] == "sft" and rows["max_document_tokens"] == "16"
    assert "dpo.beta" not in rows and "- Training pairs used: 4" in card
    pytest.importorskip("trl")
    (tmp_path / "dpo").mkdir()
    dpo = run_dpo(tune_recipe(tmp_path / "dpo", tiny_llama_dir, objective="dpo",
                              dpo={"beta": 0.2}))  # fmt: skip
    rows = _rows(_card(dpo))
    assert rows["objective"] == "dpo" and rows["dpo.beta"] == "0.2"
    assert rows["training.learning_rate"] == "1e-06"  # DPO's own default, as trained
    assert _run_python(_card(dpo))["scores"].shape == (1,)
    # TRL writes a draft card into output_dir at each checkpoint: not over a user's README
    (dpo / CARD_FILE).write_text("# my notes\n")
    run_dpo(tune_recipe(tmp_path / "dpo", tiny_llama_dir, objective="dpo"), overwrite=True)
    assert (dpo / CARD_FILE).read_text() == "# my notes\n"


def test_rerank_distill_card_loads_its_student(recipe):  # noqa: F811 (the imported fixture)
    assert main(["rerank-distill", str(recipe), "--set", "rank_weight=1"]) == 0
    out = recipe.parent / "student"
    card = _card(out)
    assert _run_python(card)["scores"].shape == (1, 1)
    assert _check_commands(card, out) == []  # a benchmark line only: checked, not parsed
    rows = _rows(card)
    assert rows["rank_weight"] == "1" and rows["predictor.inner"] == "16"
    assert rows["training.max_steps"] == "3" and rows["training.learning_rate"] == "0.001"
    assert "- Training queries used: 2" in card and "`loss_rank`" in card


# --- whose README it is ------------------------------------------------------------------------


def test_a_user_readme_is_kept_and_peft_template_replaced(tmp_path, tiny_llama_dir, caplog):
    from chatretriever.methods.rationale.tuning import run_sft

    out = tmp_path / "out"
    out.mkdir()
    (out / CARD_FILE).write_text("# my notes\n")
    with caplog.at_level(logging.WARNING, logger="chatretriever.modeling.model_card"):
        run_sft(tune_recipe(tmp_path, tiny_llama_dir))
    assert (out / CARD_FILE).read_text() == "# my notes\n"  # not peft's template either
    assert "README.md was not written by chatretriever: kept" in caplog.text
    # peft writes its unfilled template beside every adapter (here a checkpoint's): replaceable
    template = out / "checkpoint-1" / CARD_FILE
    assert "Model Card for Model ID" in template.read_text() and is_replaceable(template)
    (out / CARD_FILE).write_text(template.read_text())
    run_sft(tune_recipe(tmp_path, tiny_llama_dir), overwrite=True)
    assert _card(out)
    # the shipped models' hand-written cards carry no marker: nothing writes over them
    shipped = sorted((ROOT / "src/chatretriever/assets").glob(f"*/{CARD_FILE}"))
    assert len(shipped) >= 6 and not any(is_replaceable(p) for p in shipped)


def test_a_card_that_fails_leaves_the_old_file(tmp_path, caplog):
    old = f"{MARKER} 0.0 -->\n# an old card\n"
    (tmp_path / CARD_FILE).write_text(old)
    broken = CardSpec(what="x", python="load($no_such_value)")
    with caplog.at_level(logging.WARNING, logger="chatretriever.modeling.model_card"):
        assert write_run_card(tmp_path, broken, {"output_dir": str(tmp_path)}, {}) is None
    assert (tmp_path / CARD_FILE).read_text() == old
    assert "no model card written" in caplog.text and "no_such_value" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [CARD_FILE]  # no temporary file
    # in a staged save, the staging dir's README (peft's template) is dropped too
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / CARD_FILE).write_text("peft's template")
    assert write_run_card(tmp_path, broken, {}, {}, [], staging=staging) is None
    assert not (staging / CARD_FILE).exists() and (tmp_path / CARD_FILE).read_text() == old
    # the same card that renders replaces the old one
    assert write_run_card(tmp_path, SPEC, {"model": "m"}, {}, []) == tmp_path / CARD_FILE
    assert "load(" in (tmp_path / CARD_FILE).read_text()


def test_a_card_failure_in_a_training_run_keeps_the_model(tmp_path, tiny_llama_dir, monkeypatch):
    from chatretriever.methods.rationale import tuning

    def fail(facts):
        raise RuntimeError("render failed")

    monkeypatch.setattr(model_card, "render_card", fail)
    out = tuning.run_sft(tune_recipe(tmp_path, tiny_llama_dir))
    assert (out / "adapter_config.json").is_file() and (out / "train_log.jsonl").is_file()
    assert not (out / CARD_FILE).exists()  # neither a card nor peft's template moved in

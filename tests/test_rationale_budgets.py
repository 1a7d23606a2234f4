"""Prompt budgets of a tuned reranker: an adapter scores with the budgets its recipe records
unless the caller gives others (the library, the `rerank` command, the rationale benchmark)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from test_rationale_cli import CORPUS, _files
from test_rationale_distill import _adapter

from chatretriever.cli import main
from chatretriever.methods.rationale.prompts import BinaryChoicePrompt
from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
from chatretriever.methods.rationale.tuned_adapter import resolve_budgets, tuned_budgets
from chatretriever.methods.rationale.tuning import TuneConfig
from chatretriever.modeling.recipe import SAVED_RECIPE, save_recipe
from chatretriever.types import Passage, Session, Turn

TUNED = {"max_document_tokens": 32, "max_query_tokens": 48}
DEFAULTS = {"max_document_tokens": 256, "max_query_tokens": 384}  # BinaryChoicePrompt's
# longer than every budget here (the tiny tokenizer spends about a token per character)
LONG_DOC = "ask the seeker about their exam and listen " * 20
LONG_SESSION = Session("long", (Turn("user", "i failed my exam and i am sad " * 20),))
WARNED = "prompt budgets than it was tuned with"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_llama_dir) -> Path:
    """An adapter with the recipe `rerank-train` saves, tuned at 32 / 48 tokens."""
    out = _adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapters") / "tuned")
    save_recipe(TuneConfig(model=str(tiny_llama_dir), **TUNED), out)
    return out


def _budgets(reranker: BinaryChoiceReranker) -> dict[str, int]:
    return {k: getattr(reranker.prompt, k) for k in TUNED}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if WARNED in r.getMessage()]


def test_an_adapter_scores_with_its_tuned_budgets(tuned, tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, "chatretriever.methods.rationale.tuned_adapter"):
        rr = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=tuned, device="cpu")
    assert _budgets(rr) == TUNED and not _warnings(caplog)
    # the prompts are cut there: the very ids of a prompt built with those budgets
    at_tuned = BinaryChoicePrompt(rr.tokenizer, "ab", **TUNED)
    at_defaults = BinaryChoicePrompt(rr.tokenizer, "ab")
    assert rr.prompt.document_ids([LONG_DOC]) == at_tuned.document_ids([LONG_DOC])
    assert rr.prompt.query_ids([LONG_SESSION]) == at_tuned.query_ids([LONG_SESSION])
    assert rr.prompt.document_ids([LONG_DOC]) != at_defaults.document_ids([LONG_DOC])
    assert rr.prompt.query_ids([LONG_SESSION]) != at_defaults.query_ids([LONG_SESSION])
    assert (
        len(rr.prompt.document_ids([LONG_DOC])[0])
        == len(at_tuned.document_ids([""])[0]) + TUNED["max_document_tokens"]
    )


def test_a_budget_given_wins_and_warns(tuned, tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, "chatretriever.methods.rationale.tuned_adapter"):
        rr = BinaryChoiceReranker.from_pretrained(
            tiny_llama_dir, adapter=tuned, device="cpu", max_document_tokens=16
        )
    # the one given wins, the other one is still the adapter's
    assert _budgets(rr) == {"max_document_tokens": 16, "max_query_tokens": 48}
    warned = _warnings(caplog)
    assert len(warned) == 1 and "max_document_tokens 32 (tuned) vs 16" in warned[0]
    assert "max_query_tokens" not in warned[0]
    assert resolve_budgets(tuned, max_query_tokens=40) == {**TUNED, "max_query_tokens": 40}


def test_without_a_recorded_budget_the_defaults_stay(tuned, tiny_llama_dir, tmp_path, caplog):
    plain = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, device="cpu")
    assert _budgets(plain) == DEFAULTS
    bare = shutil.copytree(tuned, tmp_path / "bare", ignore=shutil.ignore_patterns(SAVED_RECIPE))
    rr = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=bare, device="cpu")
    assert _budgets(rr) == DEFAULTS
    # a recipe recording one budget (an older or hand-written one): that one, the other default
    half = shutil.copytree(bare, tmp_path / "half")
    recipe = {"model": str(tiny_llama_dir), "wording": "ab", "max_document_tokens": 32,
              "max_query_tokens": "long"}  # fmt: skip
    (half / SAVED_RECIPE).write_text(yaml.safe_dump(recipe))
    with caplog.at_level(logging.WARNING, "chatretriever.methods.rationale.tuned_adapter"):
        rr = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=half, device="cpu")
    assert _budgets(rr) == {"max_document_tokens": 32, "max_query_tokens": 384}
    assert not _warnings(caplog)
    assert tuned_budgets(half) == {"max_document_tokens": 32}
    assert tuned_budgets(bare) == {} and resolve_budgets(None) == {}


def _rerank(tmp_path: Path, model: Path, out: str, *extra: str) -> dict:
    """`chatretriever rerank` on the CLI fixtures; the settings saved beside its run."""
    common = _files(tmp_path) + ["--model", str(model), "--k", "2"]  # also writes run.txt
    assert main(["rerank", "--run", str(tmp_path / "run.txt"), "--out", out, *common, *extra]) == 0
    return json.loads(Path(f"{out}.settings.json").read_text())


def test_rerank_command_records_the_budgets_it_used(tuned, tiny_llama_dir, tmp_path, capsys):
    settings = _rerank(tmp_path, tiny_llama_dir, str(tmp_path / "a.txt"), "--adapter", str(tuned))
    assert {k: settings[k] for k in TUNED} == TUNED
    given = _rerank(tmp_path, tiny_llama_dir, str(tmp_path / "b.txt"), "--adapter", str(tuned),
                    "--max-query-tokens", "40")  # fmt: skip
    assert {k: given[k] for k in TUNED} == {"max_document_tokens": 32, "max_query_tokens": 40}
    plain = _rerank(tmp_path, tiny_llama_dir, str(tmp_path / "c.txt"))
    assert {k: plain[k] for k in TUNED} == DEFAULTS
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["rerank", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the --adapter's tuned budget (its train_config.yaml), else 256" in text
    assert "the --adapter's tuned budget (its train_config.yaml), else 384" in text


def test_benchmark_rows_score_with_the_adapters_budgets(tuned, tiny_llama_dir):
    import argparse

    path = Path(__file__).parents[1] / "benchmarks" / "rationale.py"
    spec = importlib.util.spec_from_file_location("rationale_benchmark_budgets", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(model=str(tiny_llama_dir), wording="ab", batch_size=2,
                              max_query_tokens=None)  # fmt: skip
    assert _budgets(bench._reranker(args, str(tuned))) == TUNED
    zero_shot = {"max_document_tokens": 256, "max_query_tokens": bench.ZERO_SHOT_QUERY_TOKENS}
    assert _budgets(bench._reranker(args, None)) == zero_shot
    args.max_query_tokens = 40
    assert _budgets(bench._reranker(args, str(tuned))) == {**TUNED, "max_query_tokens": 40}
    assert bench.parse_args(["quality"]).max_query_tokens is None
    # the row reports the budgets it was scored with
    args.max_query_tokens = None
    docs = [Passage(c["_id"], c["text"]) for c in CORPUS]
    _, timing = bench.reranker_run([LONG_SESSION], docs, args, str(tuned), "sft")
    assert timing["budgets"] == {"document": 32, "query": 48}
    result = {"environment": {"command": "x", "cpu_model": "c", "cpu_count": 1,
                              "loadavg_1_5_15": []},
              "rerank_queries": 1, "response_candidates": 3,
              "strategy_subset": {"sft": {"queries": 1, **{m: 0.5 for m in bench.MEASURES}}},
              "timing": {"strategy_subset": {"sft": timing}}}  # fmt: skip
    assert "s/query; prompts cut at 32 / 48 tokens)" in bench.quality_markdown(result)


def test_distillation_reads_the_teacher_at_its_tuned_budgets(tuned, tiny_llama_dir, tmp_path):
    from chatretriever.methods.rationale.pairs import choice_pairs, write_pairs

    passages = [Passage("r", LONG_DOC), Passage("s", "give advice")]
    sessions = [Session("a", LONG_SESSION.turns), Session("b", (Turn("user", "hi there"),))]
    write_pairs(tmp_path / "pairs.jsonl", choice_pairs(sessions, passages, {"a": "r", "b": "s"}, 1))
    raw = {
        "model": str(tiny_llama_dir),
        "adapter": str(tuned),
        "output_dir": str(tmp_path / "student"),  # no budgets: the teacher's tuned ones
        "batch_size": 2,
        "data": {"files": [{"path": str(tmp_path / "pairs.jsonl")}]},
        "predictor": {"inner": 8},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2},
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(raw))
    saved = tmp_path / "student" / SAVED_RECIPE
    assert main(["rerank-distill", str(tmp_path / "distill.yaml")]) == 0
    assert {k: yaml.safe_load(saved.read_text())[k] for k in TUNED} == TUNED
    given = ["--set", "max_document_tokens=16", "--set", "output_dir=" + str(tmp_path / "s2")]
    assert main(["rerank-distill", str(tmp_path / "distill.yaml"), *given]) == 0
    recorded = yaml.safe_load((tmp_path / "s2" / SAVED_RECIPE).read_text())
    assert {k: recorded[k] for k in TUNED} == {**TUNED, "max_document_tokens": 16}
    # a teacher without recorded budgets (here none at all): the distillation's own 64 / 256
    zero = ["--set", "adapter=null", "--set", "output_dir=" + str(tmp_path / "s3")]
    assert main(["rerank-distill", str(tmp_path / "distill.yaml"), *zero]) == 0
    recorded = yaml.safe_load((tmp_path / "s3" / SAVED_RECIPE).read_text())
    assert {k: recorded[k] for k in TUNED} == {"max_document_tokens": 64, "max_query_tokens": 256}

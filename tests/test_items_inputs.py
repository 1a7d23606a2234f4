"""Bad and unusual inputs of the item room: each is one clear error naming the file, line and
field (or is read as documented), never a traceback or a silently changed score."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from test_items_fixtures import records, write_domain

from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl
from chatretriever.io.reclm import load_reclm
from chatretriever.methods.items.build import BuildConfig, build_items, read_catalog
from chatretriever.methods.items.evaluate import load_test_set, rank_items

SMALL = BuildConfig(train_per_task=4, test_per_task=3, test_fraction=0.3, max_targets=10)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One small build (every task) that the cases below copy and break."""
    root = tmp_path_factory.mktemp("items")
    build_items(load_reclm(write_domain(root / "steam")), root / "out", SMALL)
    return root / "out"


def _copy(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "out"))


# --- a metadata field named `id` (defect 1) -------------------------------------------------------


def test_a_metadata_id_field_never_replaces_the_catalog_id(tmp_path):
    root = write_domain(tmp_path / "steam")
    rows = records()
    for r in rows:
        r["id"] = "app-" + r["item_id"]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_items(load_reclm(root), tmp_path / "out", SMALL)
    with gzip.open(tmp_path / "out" / "catalog.jsonl.gz", "rt") as f:
        first = json.loads(f.readline())
    assert first["id"] == "1" and first["metadata_id"] == "app-1000"
    items = read_catalog(tmp_path / "out" / "catalog.jsonl.gz")
    assert [p.id for p in items] == [str(i) for i in range(1, 41)]
    assert items[0].metadata["id"] == "app-1000"  # the user's field comes back under its name
    # every qrels and mask id names a catalog item, so the test set loads and scores
    _, sessions, qrels = load_test_set(tmp_path / "out")
    assert sessions and all(set(q) <= {p.id for p in items} for q in qrels.values())


# --- the test set is checked against the catalog (defects 3 and 4) --------------------------------


def _edit_query(out: Path, edit) -> None:
    path = out / "test" / "queries.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    edit(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _set_meta(key, value):
    def edit(rows):
        rows[1]["metadata"][key] = value

    return edit


def _first_constraint(rows):
    return next(r for r in rows if r["metadata"]["constraints"])


def _break_constraint(change):
    def edit(rows):
        c = _first_constraint(rows)["metadata"]["constraints"][0]
        change(c)

    return edit


def _constraint_line(out: Path) -> int:
    rows = [json.loads(x) for x in (out / "test" / "queries.jsonl").read_text().splitlines()]
    return 1 + rows.index(_first_constraint(rows))


QUERY_CASES = {
    "unknown task": (_set_meta("task", "XYZ"), r"queries.jsonl:2: field 'metadata.task'"),
    "no task": (lambda rows: rows[1]["metadata"].pop("task"), r":2: field 'metadata.task'"),
    "exclude a string": (
        _set_meta("exclude", "12"),
        r":2: field 'metadata.exclude': expected a list of item ids, got str",
    ),
    "exclude unknown item": (
        _set_meta("exclude", ["9999"]),
        r":2: field 'metadata.exclude\[0\]': item id '9999' names no item",
    ),
    "no queries": (lambda rows: rows.clear(), r"queries.jsonl: no test queries"),
    "query without qrels": (
        lambda rows: rows.append({**rows[0], "id": "EXTRA-1"}),
        r"queries.jsonl:\d+: field 'id': query 'EXTRA-1' has no line in test/qrels.txt",
    ),
}


@pytest.mark.parametrize("case", sorted(QUERY_CASES))
def test_a_changed_query_file_stops_with_its_line_and_field(built, tmp_path, case):
    edit, match = QUERY_CASES[case]
    out = _copy(built, tmp_path)
    _edit_query(out, edit)
    with pytest.raises(DataFormatError, match=match):
        load_test_set(out)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.pop("value"), "missing \\['value'\\]"),
        (lambda c: c.update(op="contains"), "constraint op must be one of"),
        (lambda c: c.update(op="price_below", value="cheap"), "price_below needs a number"),
        (lambda c: c.update(op="released_in", value="2017-13"), "needs a date YYYY or YYYY-MM"),
    ],
)
def test_a_bad_constraint_names_the_query_line_and_its_index(built, tmp_path, change, match):
    out = _copy(built, tmp_path)
    _edit_query(out, _break_constraint(change))
    line = _constraint_line(out)
    where = rf"queries.jsonl:{line}: field 'metadata.constraints\[0\]': .*"
    with pytest.raises(DataFormatError, match=where + match):
        load_test_set(out)


def test_catalog_and_qrels_are_checked_against_each_other(built, tmp_path):
    out = _copy(built, tmp_path)
    cat = out / "catalog.jsonl.gz"
    rows = [json.loads(x) for x in gzip.open(cat, "rt")]
    rows[5]["id"] = rows[4]["id"]
    with gzip.open(cat, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match=r"catalog.jsonl.gz:6: field 'id': duplicate id '5'"):
        load_test_set(out)
    out = _copy(built, tmp_path / "again")
    with open(out / "test" / "qrels.txt", "a") as f:
        f.write("UH2I-00000 0 9999 1\n")
    with pytest.raises(DataFormatError, match=r"qrels.txt:\d+: field 'doc_id': doc id '9999'"):
        load_test_set(out)


def test_eval_items_cli_reports_a_bad_query_in_one_line(built, tmp_path, capsys):
    out = _copy(built, tmp_path)
    _edit_query(out, lambda rows: rows[0]["metadata"].pop("task"))
    assert main(["eval-items", str(out), "--model", "bm25"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "queries.jsonl:1: field 'metadata.task'" in err
    assert "\n" not in err


def test_rank_items_refuses_a_bare_string_mask():
    from chatretriever.types import Session, Turn

    s = Session("q", (Turn("user", "x"),), metadata={"task": "UH2I", "exclude": "12"})
    with pytest.raises(TypeError, match="not a string"):
        rank_items(lambda sess, depth: [[("1", 1.0), ("2", 0.5)]], [s], depth=2)


# --- histories too short or missing (defect 5) ----------------------------------------------------


def test_one_item_users_are_left_out_of_the_history_tasks(tmp_path, caplog):
    from test_items_fixtures import domain

    from chatretriever.io.reclm import UserHistory
    from chatretriever.methods.items.build import _contexts
    from chatretriever.methods.items.catalog import ItemCatalog
    from chatretriever.methods.items.tasks import generate

    data = domain()
    lonely = [UserHistory(f"x{i}", (str(1 + i),)) for i in range(20)]  # some hash into test
    with caplog.at_level("WARNING"):
        train, test = _contexts(ItemCatalog(data.items), [*data.histories, *lonely], SMALL)
    assert "20 users with a single item left out" in caplog.text
    users = {h.user_id for h in (*train.histories, *test.histories)}
    assert not users & {h.user_id for h in lonely}
    for task in ("UH2I", "UQ2I"):
        for q in generate(task, test, 10, seed=0):
            assert q.exclude, "a history query always has a history"
            assert ": ." not in q.query and "After ," not in q.query


@pytest.mark.parametrize("content", [None, "", "u1 3\nu2 5\n"])
def test_no_usable_history_is_one_error_naming_the_file(tmp_path, capsys, content):
    root = write_domain(tmp_path / "steam")
    seq = root / "sequential_data.txt"
    if content is None:
        seq.unlink()
    else:
        seq.write_text(content)
    args = ["build-items", str(root), "--out", str(tmp_path / "o"), "--train-per-task", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sequential_data.txt" in err and "randrange" not in err
    assert "UH2I, I2I, US2I, UQ2I need them" in err
    # the tasks that need no history still build
    assert main([*args, "--tasks", "FA2I", "NM2I", "--test-per-task", "2"]) == 0


# --- release dates (defect 6) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("date", "parsed"),
    [
        ("2017-13-05", None),
        ("2017-00-05", None),
        ("2017-02-30", None),
        ("2016-02-29", "2016-02-29"),
        ("2017-12", "2017-12"),
        ("2017-13", None),
        ("2017", "2017"),
        ("Mar 5, 2017", None),
    ],
)
def test_release_of_refuses_impossible_months_and_days(date, parsed):
    from chatretriever.methods.items.catalog import release_of

    assert release_of({"release_date": date}) == parsed


@pytest.mark.parametrize("date", ["2017-13-05", "2017-00-05"])
def test_vc2i_on_impossible_dates_neither_crashes_nor_misnames_the_month(tmp_path, date):
    root = write_domain(tmp_path / "steam")
    rows = records()
    for r in rows:
        r["release_date"] = date
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = BuildConfig(train_per_task=8, test_per_task=4, tasks=["VC2I"], max_targets=10)
    counts = build_items(load_reclm(root), tmp_path / "out", config)
    assert counts["train"]["VC2I"] > 0  # price conditions (+ tags) only
    for _, ex in iter_jsonl(tmp_path / "out" / "train.jsonl.gz"):
        assert not any(c["op"].startswith("released") for c in ex["metadata"]["constraints"])
        assert "released" not in ex["messages"][0]["content"]


def test_values_the_tasks_cannot_use_are_counted_at_build_time(tmp_path, caplog):
    root = write_domain(tmp_path / "steam")
    rows = records()
    rows[0]["release_date"], rows[1]["release_date"] = "Mar 5, 2017", "Coming Soon"
    rows[2]["tags"] = [["x"], {"a": 1}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = BuildConfig(train_per_task=2, test_per_task=1, tasks=["FA2I"], max_targets=10)
    with caplog.at_level("WARNING"):
        build_items(load_reclm(root), tmp_path / "out", config)
    assert "2 of 40 items: release_date is not a date YYYY[-MM[-DD]] (e.g. 'Mar 5, 2017')" in (
        caplog.text
    )
    assert "1 of 40 items: tags holds a list or an object" in caplog.text


# --- --out that cannot be written (defect 7) ------------------------------------------------------


def test_build_items_refuses_an_out_that_is_a_file_before_any_work(tmp_path, capsys):
    root = write_domain(tmp_path / "steam")
    (tmp_path / "afile").write_text("keep me")
    assert main(["build-items", str(root), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "--out must be a directory, and this is a file" in err
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize(
    ("out", "match"),
    [("adir", "--out must be a file, and this is a directory"), ("afile/x.json", "is a file")],
)
def test_eval_items_checks_its_out_before_evaluating(
    built, tmp_path, capsys, monkeypatch, out, match
):
    import chatretriever.methods.items.evaluate as ev

    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(ev, "evaluate_ranker", lambda *a, **k: pytest.fail("evaluated"))
    assert main(["eval-items", str(built), "--model", "bm25", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


# --- Ctrl-C while paraphrasing keeps the replies so far (defect 8) --------------------------------


def test_an_interrupted_paraphrase_keeps_the_replies_so_far(tmp_path, monkeypatch, capsys):
    import chatretriever.methods.items.recommend as rec
    import chatretriever.modeling.backbones as bb

    calls = []

    def fake_llm_chat(model, tokenizer, max_new_tokens=160):
        def chat(messages):
            calls.append(messages)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return f"my paraphrase number {len(calls)}"

        return chat

    monkeypatch.setattr(bb, "load_backbone", lambda name, kind=None: (None, None))
    monkeypatch.setattr(rec, "llm_chat", fake_llm_chat)
    root = write_domain(tmp_path / "steam")
    out = tmp_path / "o"
    args = ["build-items", str(root), "--out", str(out), "--train-per-task", "5"]
    assert main([*args, "--test-per-task", "2", "--paraphrase-llm", "fake"]) == 130
    cached = [json.loads(x) for x in (out / "paraphrase_cache.jsonl").read_text().splitlines()]
    assert [c["reply"] for c in cached] == ["my paraphrase number 1", "my paraphrase number 2"]


# --- recommend --items <domain>/metadata.jsonl (defect 12) ----------------------------------------


def test_recommend_reads_a_reclm_metadata_file(tmp_path):
    from chatretriever.cli.items import _catalog

    root = write_domain(tmp_path / "steam")
    items, schema = _catalog(str(root / "metadata.jsonl"), None)
    assert schema is None  # none told: Steam's rendering, the recommender's own noun
    assert [p.id for p in items] == [p.id for p in _catalog(str(root), None)[0]]
    assert items[0].text.startswith("title: Dark Star 0, tags: Action")


# --- the package's entry points (defect 12) ---------------------------------------------------


def test_the_entry_points_import_from_the_package():
    import chatretriever.methods.items as items
    from chatretriever.methods.items import ItemRecommender, build_items, dense_ranker
    from chatretriever.methods.items.build import build_items as defined

    assert build_items is defined and callable(dense_ranker) and ItemRecommender.respond
    assert all(getattr(items, name) is not None for name in items.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        items.nothing  # noqa: B018

"""The item catalog schema: Steam's default reproduces the paper's build exactly; another
catalog (movies, products) is described by a schema file or inferred, renders its own fields,
builds the tasks its fields allow (the others skipped with one warning each) and is evaluated
on its own constraints; bad inputs stop with the file, line and field."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
from fakes import HashEncoder
from test_items_fixtures import domain, write_domain

from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.io.reclm import load_reclm
from chatretriever.methods.items.build import BuildConfig, _contexts, build_items
from chatretriever.methods.items.catalog import Constraint, ItemCatalog, render_item
from chatretriever.methods.items.evaluate import evaluate_ranker, load_test_set
from chatretriever.methods.items.schema import CatalogSchema
from chatretriever.methods.items.tasks import generate
from chatretriever.methods.items.templates import TASKS, templates_for

GENRES = ["Drama", "Comedy", "Thriller", "Sci-Fi", "Horror", "Romance"]
PEOPLE = ["Ava Stone", "Ben Vale", "Cal Moss", "Dia Park", "Eli Lund", "Fay Reyes", "Gus Kim"]
DIRECTORS = ["Ann Novak", "Bo Okafor", "Cy Reyes", "Dee Kim"]
WORDS = ["Silent", "River", "Night", "Glass", "Paper", "Iron", "Golden", "Winter"]
NOUNS = ["Harbor", "Garden", "Letter", "Storm", "Road", "Mirror", "Station"]
MOVIE_SCHEMA = {
    "noun": "movie",
    "list_fields": ["genres", "cast"],
    "scalar_fields": ["director"],
    "date": "year",
    "text_fields": ["overview"],
    "tag_field": "genres",
    "labels": {"cast": "starring"},
    "ignore": ["rating"],
}


def movies(n: int = 60) -> list[dict]:
    """A movie catalog in its own field names; some items lack a director or a year."""
    out = []
    for i in range(n):
        r = {
            "item_id": f"tt{1000 + i}",
            "title": f"{WORDS[i % 8]} {NOUNS[i * 3 % 7]} {i}",
            "genres": [GENRES[(i + j) % 6] for j in range(1 + i % 3)],
            "director": DIRECTORS[i % 4],
            "cast": [PEOPLE[(i * 2 + j) % 7] for j in range(2)],
            "year": 1980 + (i * 7) % 40,
            "overview": f"A story about {PEOPLE[i % 7]} and a {NOUNS[i % 7].lower()} ({i}).",
            "rating": 5.0 + (i % 5) / 2,
        }
        if i % 9 == 0:
            del r["director"]
        if i % 11 == 0:
            del r["year"]
        out.append(r)
    return out


def write_catalog_dir(root: Path, records: list[dict], n_users: int = 30) -> Path:
    """metadata.jsonl + sequential_data.txt (users of 3-6 items) under root."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = []
    for u in range(n_users):
        items = dict.fromkeys(1 + (u * 7 + j * 5) % len(records) for j in range(3 + u % 4))
        lines.append(" ".join([f"u{u}", *map(str, items)]))
    (root / "sequential_data.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def movie_dir(tmp_path) -> Path:
    root = write_catalog_dir(tmp_path / "movies", movies())
    (tmp_path / "movie_schema.json").write_text(json.dumps(MOVIE_SCHEMA))
    return root


def _build(root: Path, out: Path, *extra: str) -> int:
    args = ["build-items", str(root), "--out", str(out), "--train-per-task", "6"]
    return main([*args, "--test-per-task", "3", "--test-fraction", "0.3", *extra])


# --- the default is Steam's schema, exactly ------------------------------------------------


def test_the_default_schema_renders_and_draws_every_task_as_before():
    """Item texts and the queries of all ten tasks on the Steam-like fixture are those of the
    code before schemas (the digest was computed with it: the same 336 queries, byte for
    byte)."""
    data = domain()
    train, test = _contexts(ItemCatalog(data.items), data.histories, BuildConfig())
    rows = [
        q.to_dict()
        for task in TASKS
        for ctx, seed in ((train, 0), (test, 1))
        for q in generate(task, ctx, 20, seed=seed)
    ]
    texts = [render_item(p) for p in data.items]
    assert texts[0] == (
        "title: Dark Star 0, tags: Action, genres: Action, Adventure, game details: "
        "Single-player, Multi-player, publisher: Pub 0, developer: Studio 0, price: Free to "
        "Play, release date: 2010-01-01"
    )
    digest = hashlib.sha256(json.dumps([rows, texts]).encode()).hexdigest()
    assert len(rows) == 336
    assert digest == "f945503504232cf46eb6991a0968120b613c3d5d3429360af3a7e26283c4b893"


@pytest.mark.slow
def test_the_steam_build_of_the_readme_is_unchanged(shared_data, tmp_path):
    """`build-items ../shared/data/steam --train-per-task 200 --test-per-task 100
    --catalog-size 3000` gives the README's test set (and training data) byte for byte."""
    out = tmp_path / "items"
    assert main(["build-items", str(shared_data / "steam"), "--out", str(out),
                 "--train-per-task", "200", "--test-per-task", "100",
                 "--catalog-size", "3000"]) == 0  # fmt: skip

    def digest(name: str) -> str:
        path = out / name
        data = gzip.open(path).read() if name.endswith(".gz") else path.read_bytes()
        return hashlib.sha256(data).hexdigest()

    assert digest("test/queries.jsonl") == (
        "360f80ade022408338cde0e48927cb853614ccdb9a1451230479a07ec8bc7b67"
    )
    assert digest("test/qrels.txt") == (
        "33ce5eeb988c57b22a34b2d89967cb7a0b704d74c732429d14f84ee0e1981049"
    )
    assert digest("train.jsonl.gz") == (
        "4d83113e328c300f6a5305907869092b504dbbcceead8d706b60e6eccb8aa1c0"
    )
    assert digest("catalog.jsonl.gz") == (
        "7fb6d437962f2776aeb40f6d747dbe6b4c21d4423f799726f4a6417e9e739203"
    )
    assert json.loads((out / "schema.json").read_text())["noun"] == "game"


# --- a movie catalog with a schema file --------------------------------------------------------


def test_a_movie_schema_builds_every_task_on_its_own_fields(movie_dir, capsys):
    out = movie_dir.parent / "items"
    assert _build(movie_dir, out, "--schema", str(movie_dir.parent / "movie_schema.json")) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["skipped"] == {}
    assert all(counts["train"][t] > 0 for t in TASKS), counts["train"]
    saved = json.loads((out / "schema.json").read_text())
    assert saved["list_fields"] == ["genres", "cast"] and saved["date"] == "year"
    rows = [json.loads(x) for x in gzip.open(out / "train.jsonl.gz", "rt")]
    fields = {c["field"] for r in rows for c in r["metadata"]["constraints"]}
    assert {"genres", "cast", "director", "year"} <= fields  # all of its kinds are asked for
    assert {r["metadata"]["constraints"][0]["op"] for r in rows if r["metadata"]["task"] == "VC2I"
            } <= {"released_before", "released_after", "released_in"}  # fmt: skip
    texts = [p["text"] for r in rows for p in r["positives"]]
    assert any("starring: " in t and "director: " in t and "overview: A story" in t for t in texts)
    queries = " ".join(r["messages"][0]["content"] for r in rows)
    assert "movie" in queries and "game" not in queries and "play " not in queries
    # eval-items reads the schema back: the same item text, and coverage of its constraints
    items, sessions, qrels = load_test_set(out)
    assert items[1].text == render_item(items[1], _movie_schema())
    assert items[1].text.startswith("title: River Storm 1, genres: Comedy, Thriller, starring:")
    assert main(["eval-items", str(out), "--model", "bm25", "--out", str(out / "r.json")]) == 0
    res = json.loads((out / "r.json").read_text())
    assert set(res["tasks"]) == set(TASKS)
    assert 0 <= res["tasks"]["VC2I"]["constraint_coverage@5"] <= 1
    # a ranker putting the items that meet a query's (year, genres, ...) constraints first
    # covers them at 1; one putting them last does not
    meta = {p.id: {**p.metadata, "title": p.title} for p in items}

    def ranker(first: bool):
        def rank(queries, depth):
            out = []
            for s in queries:
                cons = [Constraint.from_dict(c) for c in s.metadata["constraints"]]
                ok = [all(c.holds(meta[p.id]) for c in cons) for p in items]
                order = sorted(range(len(items)), key=lambda i: (ok[i] != first, i))
                out.append([(items[i].id, float(-r)) for r, i in enumerate(order)])
            return out

        return rank

    best = evaluate_ranker(ranker(True), items, sessions, qrels)["tasks"]
    worst = evaluate_ranker(ranker(False), items, sessions, qrels)["tasks"]
    for task in ("FA2I", "SA2I", "VC2I", "NA2I"):
        assert best[task]["constraint_coverage@1"] == 1.0
        assert worst[task]["constraint_coverage@1"] == 0.0


def _movie_schema() -> CatalogSchema:
    return CatalogSchema.from_dict(MOVIE_SCHEMA)


def test_movie_masks_and_coverage_test_the_schema_fields():
    """Masks agree with the per-item test on every constraint drawn, and a price or date
    condition reads the field it names (the coverage metric needs no schema)."""
    from chatretriever.io.reclm import UserHistory
    from chatretriever.types import Passage

    items = [
        Passage(str(i), "", r["title"], {k: v for k, v in r.items() if k != "title"})
        for i, r in enumerate(movies(), start=1)
    ]
    catalog = ItemCatalog(items, _movie_schema())
    users = [UserHistory(f"u{u}", (str(1 + u), str(2 + u), str(3 + u))) for u in range(30)]
    train, _ = _contexts(catalog, users, BuildConfig())
    drawn = [c for task in ("FA2I", "VC2I", "NA2I") for q in generate(task, train, 10)
             for c in q.constraints]  # fmt: skip
    assert {c.field for c in drawn} >= {"year", "genres"}
    for c in drawn:
        assert catalog.mask(c).tolist() == [c.holds(m) for m in catalog.meta], c
    assert Constraint("year", "released_before", "1990").holds({"year": 1985})
    assert not Constraint("release_date", "released_before", "1990").holds({"year": 1985})
    assert Constraint("cost", "price_below", "10").holds({"cost": "$9.50"})


# --- --schema infer ----------------------------------------------------------------------------


def test_infer_gives_the_movie_schema_and_later_commands_read_it(movie_dir, capsys):
    from chatretriever.methods.items.infer import infer_schema

    schema = infer_schema(load_reclm(movie_dir).items)
    assert schema.list_fields == ("genres", "cast") and schema.scalar_fields == ("director",)
    assert (schema.date, schema.price, schema.text_fields) == ("year", None, ("overview",))
    assert schema.tag_field == "genres" and schema.ignore == ("rating",)  # a number: no kind
    out = movie_dir.parent / "inferred"
    assert _build(movie_dir, out, "--schema", "infer") == 0
    captured = capsys.readouterr()
    printed = captured.err[captured.err.index("{") : captured.err.rindex("}") + 1]
    assert json.loads(printed) == json.loads((out / "schema.json").read_text())
    assert json.loads(captured.out)["skipped"] == {}
    items, _, _ = load_test_set(out)
    assert "cast: " in items[1].text and "director: " in items[1].text


def test_infer_names_prices_dates_and_keeps_ids_out():
    from chatretriever.methods.items.infer import infer_schema
    from chatretriever.types import Passage

    rows = [
        {"sku": f"X{i:04d}", "brand": ["Acme", "Zento", "Lumo"][i % 3],
         "features": [["usb-c", "wireless", "rgb"][i % 3], "4k"], "price": f"${5 + i}.99",
         "released": f"20{10 + i % 9}-0{1 + i % 9}-15", "in_stock": bool(i % 2)}
        for i in range(40)
    ]  # fmt: skip
    items = [Passage(str(i), "", f"Thing {i}", r) for i, r in enumerate(rows, 1)]
    schema = infer_schema(items)
    assert (schema.price, schema.date, schema.tag_field) == ("price", "released", "features")
    assert schema.scalar_fields == ("brand",) and set(schema.ignore) == {"sku", "in_stock"}
    assert list(schema.price_steps) == sorted(schema.price_steps) and schema.price_steps[0] > 5


# --- tasks the fields do not allow ------------------------------------------------------------


def test_missing_kinds_skip_their_tasks_with_one_warning_each(tmp_path, capsys, caplog):
    products = [
        {"item_id": f"p{i}", "title": f"Acme Gadget {i}", "brand": ["Acme", "Zento"][i % 2]}
        for i in range(40)
    ]
    root = write_catalog_dir(tmp_path / "shop", products)
    (tmp_path / "s.yaml").write_text("noun: gadget\nscalar_fields: [brand]\n")
    with caplog.at_level("WARNING"):
        assert _build(root, tmp_path / "o", "--schema", str(tmp_path / "s.yaml")) == 0
    counts = json.loads(capsys.readouterr().out)
    assert set(counts["skipped"]) == {"US2I", "AS2I", "NA2I", "UQ2I", "VC2I"}
    assert counts["skipped"]["VC2I"] == "a price or a date field (price, date)"
    assert set(counts["train"]) == {"UH2I", "I2I", "FA2I", "SA2I", "NM2I"}
    saved = json.loads((tmp_path / "o" / "build_config.json").read_text())
    assert saved["counts"]["skipped"] == counts["skipped"]
    for task in counts["skipped"]:
        assert sum(f"{task} skipped: it needs" in r.getMessage() for r in caplog.records) == 1
    # only skippable tasks asked for: one error line, nothing written
    assert _build(root, tmp_path / "none", "--schema", str(tmp_path / "s.yaml"),
                  "--tasks", "VC2I", "US2I") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: none of the tasks VC2I, US2I can be built")
    assert "Trace" not in err
    assert not (tmp_path / "none" / "train.jsonl.gz").exists()


def test_a_task_that_draws_no_query_is_warned_of(tmp_path, caplog):
    """FA2I on a field every item shares: no item fails it, so no query has negatives."""
    same = [{"item_id": f"p{i}", "title": f"Gadget {i}", "brand": "Acme"} for i in range(30)]
    root = write_catalog_dir(tmp_path / "shop", same)
    schema = CatalogSchema(scalar_fields=("brand",), noun="gadget")
    with caplog.at_level("WARNING"):
        counts = build_items(load_reclm(root), tmp_path / "o", BuildConfig(
            train_per_task=3, test_per_task=2, test_fraction=0.3, tasks=["FA2I", "NM2I"]),
            schema=schema)  # fmt: skip
    assert counts["train"] == {"FA2I": 0, "NM2I": 3}
    assert "FA2I: no training or test query could be drawn from this catalog" in caplog.text
    assert "NM2I: no" not in caplog.text


def test_the_default_schema_on_other_fields_says_what_it_leaves_out(movie_dir, caplog):
    with caplog.at_level("WARNING"):
        counts = build_items(load_reclm(movie_dir), movie_dir.parent / "o", BuildConfig(
            train_per_task=3, test_per_task=2, test_fraction=0.3))  # fmt: skip
    unnamed = [r.getMessage() for r in caplog.records if "are in no kind of" in r.getMessage()]
    assert len(unnamed) == 1 and "of Steam's schema (the default)" in unnamed[0]
    named = unnamed[0].removeprefix("item fields ").split(" are in")[0].split(", ")
    assert sorted(named) == ["cast", "director", "overview", "rating", "year"]
    assert "--schema infer" in unnamed[0]
    assert set(counts["skipped"]) == {"US2I", "VC2I", "NA2I"}


# --- the schema file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "field", "match"),
    [
        ({"list_field": ["genres"]}, "list_field", "unknown schema key"),
        ({"list_fields": "genres"}, "list_fields", "expected a list of field names"),
        ({"list_fields": ["genres"], "tag_field": "cast"}, "tag_field", "not one of the list"),
        ({"list_fields": ["genres"], "scalar_fields": ["genres"]}, "scalar_fields", "already in"),
        ({"scalar_fields": ["title"]}, "scalar_fields", "'title' cannot be given a kind"),
        ({"noun": "{movie}"}, "noun", "expected a word"),
        ({"price": "cost", "price_steps": [10, 5]}, "price_steps", "increasing positive"),
    ],
)
def test_a_bad_schema_file_names_its_key(tmp_path, schema, field, match):
    from chatretriever.methods.items.schema import load_schema

    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    with pytest.raises(DataFormatError, match=match) as e:
        load_schema(path)
    assert (e.value.path, e.value.field) == (str(path), field)


def test_a_malformed_schema_file_names_its_line(tmp_path, capsys, movie_dir):
    from chatretriever.methods.items.schema import load_schema

    path = tmp_path / "s.json"
    path.write_text('{"noun": "movie",\n  "list_fields": [genres]}\n')
    with pytest.raises(DataFormatError) as e:
        load_schema(path)
    assert e.value.line == 2
    (tmp_path / "s.yaml").write_text(json.dumps(MOVIE_SCHEMA))  # JSON is YAML too
    assert load_schema(tmp_path / "s.yaml") == _movie_schema()
    assert _build(movie_dir, tmp_path / "o", "--schema", str(tmp_path / "nothere.json")) == 2
    assert "nothere.json: no such schema file" in capsys.readouterr().err


def test_neutral_templates_name_the_noun_and_keep_train_and_test_apart():
    for task in TASKS:
        train = templates_for(task, "train", "movie")
        test = templates_for(task, "test", "movie")
        assert not set(train) & set(test) and len(test) == 1
        for t in (*train, *test):
            assert "game" not in t and "{noun" not in t
            t.format(history="h", title="t", attributes="a", summary="s", keywords="k", tag="g",
                     misspelled="m", conditions="c", negated="n")  # fmt: skip
    assert templates_for("UH2I", "test", "book", "books")[0].startswith("My recent books")
    assert templates_for("UH2I", "test") == ("My recent games, newest first: {history}. "
                                             "Suggest the next one for me.",)  # fmt: skip


# --- the recommender ---------------------------------------------------------------------------


def test_the_recommender_shows_the_schema_tag_field_and_noun(movie_dir, tmp_path):
    from chatretriever.cli.items import _catalog
    from chatretriever.methods.items.recommend import ItemRecommender

    out = tmp_path / "items"
    assert _build(movie_dir, out, "--schema", str(movie_dir.parent / "movie_schema.json")) == 0
    items, schema = _catalog(str(out / "catalog.jsonl.gz"), None)  # schema.json beside it
    assert schema == _movie_schema() and "starring: " in items[1].text
    reply = ItemRecommender(HashEncoder(), items, None, schema=schema).respond("a thriller")
    assert reply.text.startswith("Here are movies that fit")
    assert "()" not in reply.text and any(g in reply.text for g in GENRES)


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "file", "line", "field", "match"),
    [
        (lambda m: m.replace('"title": "Night', '"title: "Night', 1), "metadata.jsonl", 3,
         None, "malformed JSON"),
        (lambda m: m.replace('"title": "Night Station 2", ', ""), "metadata.jsonl", 3,
         "title", "missing field"),
        (lambda m: m.replace('"Night Station 2"', '"  "'), "metadata.jsonl", 3, "title",
         "empty title"),
        (lambda m: m, "sequential_data.txt", 2, "item[2]", "item 61 names no item"),
        (lambda m: "", "metadata.jsonl", None, None, "no items"),
    ],
)  # fmt: skip
def test_bad_input_names_the_file_line_and_field(movie_dir, change, file, line, field, match):
    meta, seq = movie_dir / "metadata.jsonl", movie_dir / "sequential_data.txt"
    meta.write_text(change(meta.read_text()))
    if file == "sequential_data.txt":
        lines = seq.read_text().splitlines()
        lines[1] = lines[1].split()[0] + " 3 61"
        seq.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=match) as e:
        load_reclm(movie_dir)
    assert (e.value.path, e.value.line, e.value.field) == (str(movie_dir / file), line, field)


def test_an_empty_history_file_is_one_error_naming_it(movie_dir, capsys):
    (movie_dir / "sequential_data.txt").write_text("")
    schema = str(movie_dir.parent / "movie_schema.json")
    assert _build(movie_dir, movie_dir.parent / "o", "--schema", schema) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no user history")
    assert f"({movie_dir / 'sequential_data.txt'} missing, empty or one-item users only)" in err


def test_steam_fixture_build_writes_the_steam_schema(tmp_path):
    from chatretriever.methods.items.schema import STEAM_SCHEMA, load_schema

    out = tmp_path / "o"
    counts = build_items(load_reclm(write_domain(tmp_path / "steam")), out,
                         BuildConfig(train_per_task=2, test_per_task=1))  # fmt: skip
    assert counts["skipped"] == {} and load_schema(out / "schema.json") == STEAM_SCHEMA

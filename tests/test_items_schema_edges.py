"""Edges of the catalog schema found in review: the default schema's noun, numbers that are no
year, prices that do not read, bad schema files, the default tag field, "an item", and a task
that a run retrieves nothing for."""

from __future__ import annotations

import logging

import pytest
from fakes import HashEncoder
from test_items_fixtures import write_domain
from test_items_schema import _build, movies, write_catalog_dir

from chatretriever.errors import DataFormatError
from chatretriever.io.reclm import load_reclm
from chatretriever.methods.items.build import BuildConfig, build_items
from chatretriever.methods.items.catalog import Constraint, parse_date, unusable_values
from chatretriever.methods.items.infer import infer_schema
from chatretriever.methods.items.schema import CatalogSchema, SchemaError, load_schema
from chatretriever.methods.items.templates import TASKS, templates_for
from chatretriever.types import Passage, Run, Session, Turn


def _recommender_noun(root, out):
    from chatretriever.cli.items import _catalog
    from chatretriever.methods.items.recommend import ItemRecommender

    assert _build(root, out) == 0  # no --schema: Steam's is saved as schema.json
    items, schema = _catalog(str(out / "catalog.jsonl.gz"), None)
    return ItemRecommender(HashEncoder(), items, None, schema=schema).noun


def test_a_build_without_schema_keeps_the_catalog_noun(tmp_path):
    movie_dir = write_catalog_dir(tmp_path / "movies", movies())
    assert _recommender_noun(movie_dir, tmp_path / "m") == "items"
    assert _recommender_noun(write_domain(tmp_path / "steam"), tmp_path / "s") == "games"


@pytest.mark.parametrize(
    ("value", "date"),
    [
        (1489017600, None),  # a unix time
        (20170305, None),
        ("20170305", None),
        (12037, None),
        (999, None),
        (1999.5, None),
        (1999, "1999"),
        (1999.0, "1999"),
        ("2017-03-05", "2017-03-05"),
        ("2017-03", "2017-03"),
        ("2017", "2017"),
    ],
)
def test_only_a_four_digit_year_reads_as_a_year(value, date):
    assert parse_date(value) == date


def test_a_timestamp_is_no_date_for_a_condition_nor_for_infer():
    meta = {"release_date": 1489017600}
    assert not Constraint("release_date", "released_before", "1500").holds(meta)
    schema = CatalogSchema(date="release_date")
    assert list(unusable_values([Passage("1", "", "A", meta)], schema)) == [
        "release_date is not a date YYYY[-MM[-DD]]"
    ]
    items = [
        Passage(str(i), "", f"T{i}", {"yearly_sales": 12000 + i, "updated": 1489017600 + i})
        for i in range(20)
    ]
    assert infer_schema(items).date is None
    years = [Passage(str(i), "", f"T{i}", {"releaseYear": 1990 + i % 9}) for i in range(20)]
    assert infer_schema(years).date == "releaseYear"


def test_prices_that_do_not_read_are_named_and_the_skip_says_so(tmp_path, caplog):
    records = [{**r, "price": "12,99 €"} for r in movies()]
    root = write_catalog_dir(tmp_path / "eu", records)
    schema = CatalogSchema(list_fields=("genres",), price="price", noun="movie")
    with caplog.at_level(logging.WARNING):
        counts = build_items(load_reclm(root), tmp_path / "o", BuildConfig(
            train_per_task=3, test_per_task=2, test_fraction=0.3), schema=schema)  # fmt: skip
    text = caplog.text
    assert "60 of 60 items: price is not a price (a number, or text like $12.99)" in text
    assert "e.g. '12,99 €'" in text
    assert "VC2I" in counts["skipped"]
    assert "the values of price do not read as prices" in text


def test_a_schema_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_bytes('{"noun": "pel\u00edcula"}'.encode("latin-1"))
    with pytest.raises(DataFormatError, match="not UTF-8 text") as e:
        load_schema(path)
    assert e.value.path == str(path)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({"casts": "starring"}, "'casts' is no field of the schema"),
        ({"title": "Name"}, "'title' cannot be relabelled"),
    ],
)
def test_labels_must_name_a_field_of_the_schema(labels, match):
    with pytest.raises(SchemaError, match=match) as e:
        CatalogSchema(list_fields=("cast",), labels=labels)
    assert e.value.key == "labels"
    assert CatalogSchema(list_fields=("cast",), labels={"cast": "starring"}).label("cast") == (
        "starring"
    )


@pytest.mark.parametrize("steps", [[float("nan")], [1, float("inf")]])
def test_price_steps_must_be_finite(steps):
    with pytest.raises(SchemaError, match="finite") as e:
        CatalogSchema(price="price", price_steps=steps)
    assert e.value.key == "price_steps"


def test_an_upper_case_yaml_suffix_is_yaml(tmp_path):
    path = tmp_path / "s.YML"
    path.write_text("noun: movie\nlist_fields: [genres, cast]\ntag_field: genres\n")
    assert load_schema(path) == CatalogSchema(
        noun="movie", list_fields=("genres", "cast"), tag_field="genres"
    )


def test_the_default_tag_field_is_not_the_genre_field():
    schema = CatalogSchema(list_fields=("genres", "keywords"), genre_field="genres")
    assert (schema.tag_field, schema.genre_field) == ("keywords", "genres")
    assert CatalogSchema(list_fields=("genres",), genre_field="genres").tag_field is None
    assert CatalogSchema(list_fields=("genres", "cast")).tag_field == "genres"


def test_a_vowel_noun_takes_an():
    texts = [t for task in TASKS for s in ("train", "test") for t in templates_for(task, s, "item")]
    assert not any("a item" in t or "A item" in t for t in texts)
    assert "Recommend an item for this person: {summary}" in texts
    assert "An item {conditions}." in texts
    assert "Find a movie with {attributes}." in templates_for("FA2I", "train", "movie")
    assert templates_for("US2I", "train")[1] == "Recommend a game for this player: {summary}"


def test_multi_turn_requests_say_an_item():
    from chatretriever.methods.items.recommend import multi_turn_requests

    cons = [{"field": "genres", "op": "has", "value": v} for v in ("Drama", "Horror")]
    s = Session("q", (Turn("user", "x"),), metadata={"task": "FA2I", "constraints": cons})
    (conv,) = multi_turn_requests([s], {}, schema=CatalogSchema(list_fields=("genres",)))
    assert conv.turns[0].content.startswith("I'm looking for an item with ")


def test_a_task_the_run_retrieves_nothing_for_scores_zero(caplog):
    from chatretriever.methods.items.evaluate import evaluate_items

    items = [Passage(str(i), f"t{i}", f"T{i}", {"genres": ["Drama"]}) for i in range(1, 4)]
    sessions = [
        Session("a", (Turn("user", "x"),), metadata={"task": "I2I"}),
        Session("b", (Turn("user", "y"),), metadata={"task": "UH2I"}),
    ]
    qrels = {"a": {"1": 1}, "b": {"2": 1}}
    run = Run({"a": {"1": 2.0, "3": 1.0}}, "bm25")  # nothing for "b", the only UH2I query
    with caplog.at_level(logging.WARNING):
        result = evaluate_items(run, sessions, qrels, items, ks=(1,))
    assert result["tasks"]["I2I"]["nDCG@10"] == 1.0
    uh2i = result["tasks"]["UH2I"]
    assert uh2i["queries"] == 1 and all(v == 0 for k, v in uh2i.items() if k != "queries")
    assert "UH2I: the run 'bm25' retrieved nothing" in caplog.text


def test_a_yaml_schema_key_given_twice_is_refused_with_its_line(tmp_path):
    """YAML keeps the last of two equal keys: a schema's first `noun:` would vanish unseen."""
    path = tmp_path / "s.yaml"
    path.write_text("noun: movie\nlist_fields: [genres]\nnoun: book\n")
    with pytest.raises(DataFormatError, match="given twice") as e:
        load_schema(path)
    assert e.value.line == 3 and "s.yaml" in str(e.value)

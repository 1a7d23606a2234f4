"""The ten item-query generators, the data build, the metrics and the masked evaluation."""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_items_fixtures import domain, write_domain

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl
from chatretriever.io.sessions import read_sessions
from chatretriever.io.trec import read_qrels
from chatretriever.methods.items.build import (
    BuildConfig,
    _contexts,
    build_items,
    read_catalog,
)
from chatretriever.methods.items.catalog import Constraint, ItemCatalog, render_item
from chatretriever.methods.items.data import iter_item_examples
from chatretriever.methods.items.evaluate import evaluate_items, rank_items
from chatretriever.methods.items.metrics import (
    constraint_coverage_at_k,
    hit_at_k,
    precision_at_k,
)
from chatretriever.methods.items.tasks import cooccurrence, generate, misspell
from chatretriever.methods.items.templates import TASKS, TEMPLATES, templates_for
from chatretriever.types import Passage, Session, Turn


@pytest.fixture(scope="module")
def contexts():
    data = domain()
    catalog = ItemCatalog(data.items)
    config = BuildConfig(test_fraction=0.3, max_targets=10)
    return _contexts(catalog, data.histories, config)


# --- catalog and constraints ---------------------------------------------------------------------

META = {
    "title": "Dark Star",
    "tags": ["Action", "Indie"],
    "developer": "Studio 1",
    "price": 4.99,
    "release_date": "2016-03-05",
}


@pytest.mark.parametrize(
    ("constraint", "holds"),
    [
        (Constraint("tags", "has", "indie"), True),  # case-insensitive
        (Constraint("tags", "has", "Horror"), False),
        (Constraint("tags", "lacks", "Horror"), True),
        (Constraint("developer", "has", "Studio 1"), True),
        (Constraint("title", "has", "dark star"), True),
        (Constraint("price", "has", "4.99"), True),
        (Constraint("price", "price_below", "5"), True),
        (Constraint("price", "price_above", "5"), False),
        (Constraint("release_date", "released_before", "2016"), False),
        (Constraint("release_date", "released_after", "2015"), True),
        (Constraint("release_date", "released_after", "2016"), False),  # same year is not after
        (Constraint("release_date", "released_after", "2016-03"), False),  # nor the same month
        (Constraint("release_date", "released_in", "2016-03"), True),
        (Constraint("release_date", "released_in", "2016-04"), False),
    ],
)
def test_constraint_holds(constraint, holds):
    assert constraint.holds(META) is holds


def test_free_price_reads_zero_and_missing_fails():
    assert Constraint("price", "price_below", "1").holds({"price": "Free to Play"})
    assert not Constraint("price", "price_below", "1").holds({"price": None})
    assert not Constraint("release_date", "released_after", "2000").holds({})


def test_catalog_masks_agree_with_the_per_item_test():
    catalog = ItemCatalog(domain().items)
    cons = [
        Constraint("tags", "has", "Puzzle"),
        Constraint("tags", "lacks", "Indie"),
        Constraint("price", "price_below", "6"),
        Constraint("price", "price_above", "6"),
        Constraint("release_date", "released_before", "2013"),
        Constraint("release_date", "released_after", "2014"),  # the catalog has 2014 items
        Constraint("release_date", "released_in", "2015-04"),
        Constraint("genres", "has", "casual"),
    ]
    for c in cons:
        expected = np.array([c.holds(m) for m in catalog.meta])
        assert (catalog.mask(c) == expected).all(), c
        assert 0 < expected.sum() < len(catalog) or c.op == "released_in"


def test_render_item_as_the_paper():
    item = Passage("1", "", title="Dark Star", metadata={"tags": ["A", "B"], "price": 14.99})
    assert render_item(item) == "title: Dark Star, tags: A, B, price: 14.99"


# --- generators ----------------------------------------------------------------------------------


def test_templates_of_train_and_test_are_disjoint():
    for task in TASKS:
        train, test = set(templates_for(task, "train")), set(templates_for(task, "test"))
        assert train and test and not train & test
        assert train | test == set(TEMPLATES[task])


@pytest.mark.parametrize("task", TASKS)
def test_generator_is_deterministic_and_negatives_violate(task, contexts):
    train, test = contexts
    a = generate(task, train, 8, seed=3)
    b = generate(task, train, 8, seed=3)
    assert a == b and len(a) >= 3
    assert generate(task, train, 8, seed=4) != a
    cat = train.catalog
    for q in a + generate(task, test, 5, seed=1):
        assert len(q.negatives) == 7 == len(set(q.negatives))
        assert not set(q.negatives) & set(q.positives)
        for pos in q.positives:  # every target meets the query
            assert cat.satisfies_all(pos, q.constraints)
        for neg in q.negatives:  # a negative never does
            if q.constraints:
                assert not cat.satisfies_all(neg, q.constraints), (q.query, neg)
            assert neg not in q.exclude


def test_history_tasks_mask_the_history_and_use_leave_last_out(contexts):
    _, test = contexts
    for task in ("UH2I", "UQ2I"):
        qs = generate(task, test, 5, seed=0)
        assert len(qs) == 5, task  # an empty list would pass the loop below
        for q in qs:
            users = [h for h in test.histories if h.items == (*q.exclude, q.positives[0])]
            assert users, "the target is the last item of a test user, the rest is masked"
            assert not set(q.negatives) & set(users[0].items)
            assert q.template == 0  # the one test template


@pytest.mark.parametrize("task", ["UH2I", "UQ2I"])
def test_history_negatives_avoid_the_users_later_items_too(task, contexts):
    train, _ = contexts
    checked = 0
    for q in generate(task, train, 60, seed=0):
        cut = len(q.exclude)
        for h in train.histories:
            if h.items[:cut] == q.exclude and h.items[cut] == q.positives[0]:
                assert not set(q.negatives) & set(h.items), (q.query, h.user_id)
                checked += cut + 1 < len(h.items)  # the user has items after the target
    assert checked > 5


def test_i2i_targets_are_co_occurring_items_and_mask_the_source(contexts):
    train, _ = contexts
    qs = generate("I2I", train, 5, seed=0)
    assert len(qs) == 5  # an empty list would pass the loop below
    for q in qs:
        (src,) = q.exclude
        related = {i for i, _ in train.cooccurrence[src]}
        assert set(q.positives) <= related
        assert not set(q.negatives) & related


def test_cooccurrence_similarity_by_hand():
    from chatretriever.io.reclm import UserHistory

    hist = [UserHistory("a", ("1", "2")), UserHistory("b", ("1", "2", "3"))]
    sim = dict(cooccurrence(hist)["1"])
    assert sim["2"] == pytest.approx(2 / (np.sqrt(2 * 2) + 10))
    assert sim["3"] == pytest.approx(1 / (np.sqrt(2 * 1) + 10))


def test_misspell_changes_the_title_deterministically():
    a = misspell("Stardew Valley", random.Random(0))
    assert a == misspell("Stardew Valley", random.Random(0))
    assert a != "Stardew Valley"


def test_users_split_by_id(contexts):
    train, test = contexts
    assert {h.user_id for h in train.histories}.isdisjoint({h.user_id for h in test.histories})
    assert set(train.cooccurrence).isdisjoint(test.cooccurrence)


# --- the build ------------------------------------------------------------------------------------


def test_build_writes_training_jsonl_queries_and_qrels(tmp_path):
    from chatretriever.io.reclm import load_reclm

    root = write_domain(tmp_path / "steam")
    config = BuildConfig(train_per_task=6, test_per_task=4, test_fraction=0.3, max_targets=10)
    counts = build_items(load_reclm(root), tmp_path / "out", config)
    assert set(counts["train"]) == set(TASKS)
    examples = list(iter_item_examples(tmp_path / "out" / "train.jsonl.gz"))
    assert len(examples) == sum(counts["train"].values())
    assert all(len(ex.negatives) == 7 and ex.positives for ex in examples)
    train_queries = {ex.query.casefold() for ex in examples}
    sessions = read_sessions(tmp_path / "out" / "test" / "queries.jsonl")
    assert len(sessions) == sum(counts["test"].values())
    assert not {s.question.casefold() for s in sessions} & train_queries
    qrels = read_qrels(tmp_path / "out" / "test" / "qrels.txt")
    assert {q.query_id for q in qrels} == {s.id for s in sessions}
    assert len(read_catalog(tmp_path / "out" / "catalog.jsonl.gz")) == 40
    # the same seed builds the same files
    build_items(load_reclm(root), tmp_path / "again", config)
    same = list(iter_item_examples(tmp_path / "again" / "train.jsonl.gz"))
    assert same == examples


def test_training_reader_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q", "messages": [{"role": "user", "content": "x"}], "positives": []}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: field 'positives'"):
        list(iter_item_examples(bad))


# --- metrics against hand-computed values -------------------------------------------------------


def test_hit_and_precision_by_hand():
    ranked = ["a", "b", "c", "d"]
    assert hit_at_k(ranked, {"c"}, 1) == 0.0
    assert hit_at_k(ranked, {"c"}, 5) == 1.0
    assert precision_at_k(ranked, {"b", "c", "z"}, 2) == 0.5
    assert precision_at_k(ranked, {"b", "c", "z"}, 5) == 2 / 5  # missing places count as misses


def test_metrics_refuse_a_bare_string_of_ids():
    with pytest.raises(TypeError, match="targets must be a collection"):
        hit_at_k(["1"], "12", 1)  # not the ids "1" and "2", nor a substring test
    with pytest.raises(TypeError, match="targets must be a collection"):
        precision_at_k(["1", "2"], "12", 2)
    with pytest.raises(TypeError, match="ranked must be a collection"):
        hit_at_k("12", {"1"}, 1)
    with pytest.raises(TypeError, match="ranked must be a collection"):
        constraint_coverage_at_k("12", [], {"1": {}, "2": {}}, 2)


def test_constraint_coverage_by_hand():
    meta = {
        "a": {"tags": ["Indie"], "price": 3.0},
        "b": {"tags": ["Indie"], "price": 12.0},
        "c": {"tags": ["RPG"], "price": 1.0},
        "d": {"tags": ["Indie", "RPG"], "price": 0.5},
    }
    cons = [Constraint("tags", "has", "Indie"), Constraint("price", "price_below", "10")]
    ranked = ["a", "b", "c", "d"]
    assert constraint_coverage_at_k(ranked, cons, meta, 1) == 1.0
    assert constraint_coverage_at_k(ranked, cons, meta, 4) == 2 / 4  # a and d
    assert constraint_coverage_at_k(ranked, cons, meta, 5) == 2 / 5
    assert constraint_coverage_at_k(ranked, [], meta, 2) == 1.0


def test_masked_ranking_and_per_task_scores_by_hand():
    items = [Passage(str(i), f"t{i}", title=f"G{i}", metadata={"tags": ["A"] if i % 2 else []})
             for i in range(1, 7)]  # fmt: skip
    sessions = [
        Session("u", (Turn("user", "q"),), metadata={"task": "UH2I", "exclude": ["1", "2"]}),
        Session(
            "f",
            (Turn("user", "q"),),
            metadata={
                "task": "FA2I",
                "constraints": [{"field": "tags", "op": "has", "value": "A"}],
            },
        ),
    ]

    def rank(sess, depth):  # the same fixed ranking for every query: 1 > 2 > ... > 6
        return [[(str(i), 10.0 - i) for i in range(1, 7)][:depth] for _ in sess]

    run = rank_items(rank, sessions, depth=3)
    assert list(run.scores["u"]) == ["3", "4", "5"]  # history masked out, then cut at depth
    assert list(run.scores["f"]) == ["1", "2", "3"]
    qrels = {"u": {"4": 1}, "f": {"1": 1, "3": 1, "5": 1}}
    res = evaluate_items(run, sessions, qrels, items, ks=(1, 5))
    assert res["tasks"]["UH2I"]["hit@1"] == 0.0 and res["tasks"]["UH2I"]["hit@5"] == 1.0
    assert res["tasks"]["UH2I"]["precision@5"] == pytest.approx(1 / 5)
    assert res["tasks"]["FA2I"]["constraint_coverage@1"] == 1.0
    assert res["tasks"]["FA2I"]["constraint_coverage@5"] == pytest.approx(2 / 5)  # 1 and 3
    ndcg_u = (1 / np.log2(3)) / 1.0  # the target at rank 2
    assert res["tasks"]["UH2I"]["nDCG@10"] == pytest.approx(ndcg_u, abs=1e-4)
    assert res["mean"]["hit@5"] == pytest.approx(1.0)


def test_training_file_is_the_project_format(tmp_path):
    from chatretriever.io.reclm import load_reclm

    root = write_domain(tmp_path / "steam")
    config = BuildConfig(train_per_task=2, test_per_task=1, tasks=["FA2I"], max_targets=10)
    build_items(load_reclm(root), tmp_path / "o", config)
    (_, obj), *_ = iter_jsonl(tmp_path / "o" / "train.jsonl.gz")
    assert obj["messages"][0]["role"] == "user" and obj["source"] == "items/FA2I"
    assert {"id", "title", "text"} <= set(obj["positives"][0])
    assert obj["metadata"]["relevant"][0] == obj["positives"][0]["id"]


def test_paraphrases_are_cached_and_bad_replies_keep_the_template(tmp_path):
    from chatretriever.methods.items.paraphrase import ParaphraseCache, paraphrase_queries
    from chatretriever.methods.items.tasks import ItemQuery

    queries = [
        ItemQuery("US2I", "Enjoys Indie games.", ("1",), ()),
        ItemQuery("AS2I", "dark star action game", ("2",), ()),
        ItemQuery("FA2I", "tags: Indie", ("3",), ()),
    ]
    calls = []

    def chat(messages):
        calls.append(messages[0]["content"])
        return "I love indie games." if "taste" in messages[0]["content"] else "line\nbreaks"

    cache = ParaphraseCache(tmp_path / "cache.jsonl")
    out = paraphrase_queries(queries, chat, cache, "llm")
    assert [q.query for q in out] == ["I love indie games.", "dark star action game", "tags: Indie"]
    assert len(calls) == 2  # FA2I is not paraphrased
    cache.save()
    again = paraphrase_queries(queries, chat, ParaphraseCache(tmp_path / "cache.jsonl"), "llm")
    assert again == out and len(calls) == 2  # every answer came from the cache


@pytest.mark.slow
def test_real_steam_queries_keep_their_constraints(shared_data):
    """On the real Steam catalog: every task yields queries; targets meet every constraint and
    negatives break one; test users are disjoint from training users."""
    from chatretriever.io.reclm import load_reclm
    from chatretriever.methods.items.build import subsample_catalog

    data = load_reclm(shared_data / "steam")
    catalog = ItemCatalog(subsample_catalog(data, 3000, seed=0))
    train, test = _contexts(catalog, data.histories, BuildConfig())
    assert len(test.histories) > 0.05 * len(data.histories)
    for task in TASKS:
        qs = generate(task, train, 20, seed=0) + generate(task, test, 10, seed=1)
        assert len(qs) >= 25, task
        for q in qs:
            assert all(catalog.satisfies_all(p, q.constraints) for p in q.positives)
            if q.constraints:
                assert not any(catalog.satisfies_all(n, q.constraints) for n in q.negatives)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train_per_task": -1}, "train_per_task must be at least 1, got -1"),
        ({"test_per_task": 0}, "test_per_task must be at least 1"),
        ({"catalog_size": 0}, "catalog_size must be at least 1"),
        ({"n_negatives": -2}, "n_negatives must be at least 0"),
        ({"tasks": ["XX"]}, "unknown tasks"),
    ],
)
def test_build_config_refuses_counts_below_one(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BuildConfig(**kwargs)


def test_a_catalog_smaller_than_the_histories_keeps_them_and_says_so(caplog):
    from chatretriever.methods.items.build import subsample_catalog

    data = domain()
    needed = {i for h in data.histories for i in h.items}
    with caplog.at_level("WARNING"):
        kept = subsample_catalog(data, 1, seed=0)
    assert {p.id for p in kept} == needed
    assert f"the histories name {len(needed)} items, every one kept" in caplog.text

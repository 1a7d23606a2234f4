from __future__ import annotations

import json

import pytest
from fixtures import QRECC_TURNS, jsonl, write

from chatretriever.errors import DataFormatError
from chatretriever.io.cast import load_cast
from chatretriever.io.conversations import read_conversations
from chatretriever.io.mtrag import iter_mtrag_corpus, load_mtrag
from chatretriever.io.sessions import read_sessions
from chatretriever.io.topiocqa import read_topiocqa
from chatretriever.io.training import (
    TrainingExample,
    TrainingPassage,
    read_training_examples,
    write_training_examples,
)
from chatretriever.retrieval.training_data.builders import (
    cast_examples,
    conversation_id,
    examples_from_qrels,
    examples_from_responses,
    first_question,
    in_holdout_fraction,
    mtrag_examples,
    qrecc_examples,
    read_chat_examples,
    read_id_list,
    read_triples,
    split_heldout,
    topiocqa_examples,
)
from chatretriever.retrieval.training_data.negatives import (
    MiningConfig,
    mine_hard_negatives,
    mine_hard_negatives_by_domain,
    mining_query,
)
from chatretriever.types import Passage, Qrel, Session, Turn


def _session(sid: str, *contents: str, response: str | None = None, **meta) -> Session:
    roles = ["user" if i % 2 == 0 else "assistant" for i in range(len(contents))]
    msgs = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    return Session.from_messages(sid, msgs, response=response, metadata=meta)


def _ex(eid: str, query: str, *positives: TrainingPassage) -> TrainingExample:
    return TrainingExample(eid, (Turn("user", query),), positives, source="t")


# ----------------------------------------------------------------------------- mining

N_DOCS = 40


def _ranked_corpus() -> list[Passage]:
    """Docs whose BM25 rank for "zeta" is their number: equal length, falling term frequency."""
    docs = [
        Passage(f"d{i:02d}", " ".join(["zeta"] * (N_DOCS - i) + ["pad"] * i)) for i in range(N_DOCS)
    ]
    docs.append(Passage("unrelated", "nothing in common here at all"))
    return docs


def _ids(ex: TrainingExample) -> list[str | None]:
    return [p.id for p in ex.negatives]


def test_mining_samples_from_rank_window_excluding_positives():
    corpus = _ranked_corpus()
    d03_text = corpus[3].text
    # d00 excluded by id, d03 excluded by (normalized) text, though given without id
    pos = (TrainingPassage(corpus[0].text, "d00"), TrainingPassage("  " + d03_text.upper()))
    cfg = MiningConfig(num_negatives=2, rank_window=(3, 5), seed=0)
    picked = set()
    for seed in range(20):
        (ex,) = mine_hard_negatives(
            [_ex("q", "zeta", *pos)], corpus, replace_seed(cfg, seed), False
        )
        assert len(ex.negatives) == 2 and ex.positives == pos
        picked |= set(_ids(ex))
    # ranking without positives: d01 d02 d04 d05 d06 ...; window ranks 3-5 = d04 d05 d06
    assert picked == {"d04", "d05", "d06"}


def replace_seed(cfg: MiningConfig, seed: int) -> MiningConfig:
    from dataclasses import replace

    return replace(cfg, seed=seed)


def test_mining_paper_window_default_and_determinism():
    corpus = _ranked_corpus()
    examples = [_ex(f"q{i}", "zeta", TrainingPassage("zeta answer", f"p{i}")) for i in range(5)]
    a = mine_hard_negatives(examples, corpus, show_progress=False)
    b = mine_hard_negatives(examples[::-1], corpus, show_progress=False)[::-1]
    assert a == b  # each draw depends on (seed, id) only, not on order
    for ex in a:
        assert len(ex.negatives) == 4  # default
        assert all(15 <= int(i[1:]) + 1 <= 30 for i in _ids(ex))  # ranks 15-30 (1-based)
        assert _ids(ex) == sorted(_ids(ex))  # kept in rank order
    assert len({tuple(_ids(ex)) for ex in a}) > 1  # different examples, different draws
    c = mine_hard_negatives(examples, corpus, MiningConfig(seed=1), show_progress=False)
    assert [_ids(x) for x in c] != [_ids(x) for x in a]


def test_mining_fills_short_window_with_nearest_ranks_and_skips_zero_scores():
    corpus = _ranked_corpus()
    cfg = MiningConfig(num_negatives=5, rank_window=(3, 5))
    (ex,) = mine_hard_negatives([_ex("q", "zeta", TrainingPassage("x"))], corpus, cfg, False)
    assert _ids(ex) == ["d02", "d03", "d04", "d05", "d06"]  # window d02-d04, then d05, d06
    cfg = MiningConfig(num_negatives=4, rank_window=(38, 45))
    (ex,) = mine_hard_negatives([_ex("q", "zeta", TrainingPassage("x"))], corpus, cfg, False)
    # only 40 docs match; "unrelated" scores 0 and is never a negative; fill from ranks above
    assert _ids(ex) == ["d36", "d37", "d38", "d39"]


def test_mining_skips_duplicate_texts_and_keeps_existing_negatives():
    corpus = _ranked_corpus()
    corpus.insert(2, Passage("dup", corpus[1].text))
    ex = TrainingExample(
        "q", (Turn("user", "zeta"),), (TrainingPassage("x"),), (TrainingPassage("old"),)
    )
    (out,) = mine_hard_negatives(
        [ex], corpus, MiningConfig(num_negatives=3, rank_window=(1, 3)), False
    )
    assert out.negatives[0] == TrainingPassage("old")
    ids = [p.id for p in out.negatives[1:]]
    assert ids[0] == "d00" and ids[1] in ("d01", "dup") and ids[2] == "d02"  # one of the twins


def test_mining_pool_of_positives_never_returns_own_positive():
    topics = ["apple", "banana", "cherry", "grape", "lemon", "mango"]
    examples = [
        _ex(f"q{i}", f"{t} fruit", TrainingPassage(f"the {t} is a fruit. fruit facts {i}"))
        for i, t in enumerate(topics)
    ]
    cfg = MiningConfig(num_negatives=2, rank_window=(1, 3))
    mined = mine_hard_negatives(examples, None, cfg, show_progress=False)
    for ex in mined:
        assert len(ex.negatives) == 2
        assert ex.positives[0] not in ex.negatives
        pool = {e.positives[0].text for e in examples}
        assert {n.text for n in ex.negatives} <= pool


def test_mining_ranks_with_the_bm25_of_the_baselines():
    nine = " ".join(f"w{i}" for i in range(9))
    corpus = [Passage("short", "zeta"), Passage("long", f"zeta zeta zeta {nine}")]
    corpus += [Passage(f"f{i}", f"filler{i} extra{i}") for i in range(4)]
    ex = _ex("q", "zeta", TrainingPassage("unrelated answer"))
    cfg = MiningConfig(num_negatives=2, rank_window=(1, 2))
    (out,) = mine_hard_negatives([ex], corpus, cfg, False)
    # Lucene BM25 by hand: N = 6, df = 2, dl = 1 and 12, avgdl = 21 / 6 = 3.5. With the
    # baselines' k1 = 0.9, b = 0.4: short 0.627 < long 0.647. (bm25s' defaults k1 = 1.5,
    # b = 0.75, which mining used before, give short 0.607 > long 0.427.)
    assert _ids(out) == ["long", "short"]
    from chatretriever.retrieval.baselines import BM25Config

    assert MiningConfig().bm25 == BM25Config(k1=0.9, b=0.4, stemmer="english", stopwords="en")
    assert BM25Config() == MiningConfig().bm25  # one definition: the baselines' default


def test_mining_query_modes():
    msgs = _session("s", "first q", "first a", "second q").turns
    assert mining_query(msgs, "last_turn") == "second q"
    assert mining_query(msgs, "user_turns") == "second q\nfirst q"
    assert mining_query(msgs, "all_turns") == "second q\nfirst a\nfirst q"
    with pytest.raises(ValueError):
        MiningConfig(query="everything")
    with pytest.raises(ValueError):
        MiningConfig(rank_window=(0, 3))
    with pytest.raises(ValueError):
        MiningConfig(rank_window=(5, 3))


# ----------------------------------------------------------------------------- hold-out


def test_holdout_fraction_is_deterministic_disjoint_and_whole_conversations():
    sessions = [_session(f"c{c}<::>{t}", "q") for c in range(300) for t in range(1, 4)]
    train, held = split_heldout(sessions, fraction=0.5, seed=3)
    train_c, held_c = {conversation_id(s) for s in train}, {conversation_id(s) for s in held}
    assert not train_c & held_c
    assert len(train_c) + len(held_c) == 300 and 100 < len(held_c) < 200
    assert len(train) + len(held) == len(sessions)
    # same decision whatever the order or the other sessions
    train2, held2 = split_heldout(sessions[::-1][:450], fraction=0.5, seed=3)
    assert {conversation_id(s) for s in held2} <= held_c
    assert {conversation_id(s) for s in train2} <= train_c
    other = {conversation_id(s) for s in split_heldout(sessions, fraction=0.5, seed=4)[1]}
    assert other != held_c


def test_holdout_explicit_ids(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# held out\nc1\n\nc3\n")
    ids = read_id_list(path)
    assert ids == {"c1", "c3"}
    sessions = [_session(f"c{c}<::>1", "q") for c in range(5)]
    sessions.append(_session("x9", "q", conversation_id="c1"))
    train, held = split_heldout(sessions, heldout_ids=ids)
    assert [s.id for s in held] == ["c1<::>1", "c3<::>1", "x9"]
    assert [s.id for s in train] == ["c0<::>1", "c2<::>1", "c4<::>1"]
    assert not in_holdout_fraction("c1", 0.0) and in_holdout_fraction("c1", 1.0)
    with pytest.raises(ValueError):
        in_holdout_fraction("c1", 1.5)


# ----------------------------------------------------------------------------- generic builders


def test_examples_from_responses_skips_unanswerable():
    sessions = [
        _session("a", "q1", response="Answer one."),
        _session("b", "q2", response="UNANSWERABLE"),
        _session("c", "q3"),
        _session("d", "q4", "r4", "q5", response="Answer five.", topic=7),
    ]
    out = examples_from_responses(
        sessions, "x", positive_id=lambda s: f"p-{s.id}", skip=["unanswerable"]
    )
    assert [e.id for e in out] == ["a", "d"]
    assert out[1].positives == (TrainingPassage("Answer five.", "p-d"),)
    assert out[1].target == "Answer five." and out[1].source == "x"
    assert out[1].metadata == {"topic": 7} and len(out[1].messages) == 3


def test_examples_from_qrels(caplog):
    sessions = [_session("t1", "q"), _session("t2", "q", response="ans"), _session("t3", "q")]
    qrels = [Qrel("t2", "d2", 1), Qrel("t2", "d1", 2), Qrel("t2", "gone", 1), Qrel("t1", "d1", 0)]
    passages = {"d1": Passage("d1", "one", "T1"), "d2": Passage("d2", "two")}
    (ex,) = examples_from_qrels(sessions, qrels, passages, "m")
    assert ex.id == "t2" and [p.id for p in ex.positives] == ["d1", "d2"] and ex.target == "ans"
    # "gone" is judged relevant but not in the passages: counted once, in one warning
    assert "m: 1 judged documents are not in the passages given" in caplog.text
    caplog.clear()
    examples_from_qrels(sessions, qrels[:2], passages, "m")
    assert "judged documents are not in the passages" not in caplog.text  # none missing


def test_read_chat_examples(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [
        {"id": "s1", "messages": [{"role": "user", "content": "q"}], "response": "r1"},
        {
            "id": "s2",
            "messages": [
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b = read_chat_examples(path)
    assert a.target == "r1" and a.positives == (TrainingPassage("r1"),)
    assert b.target == "a2" and [t.content for t in b.messages] == ["q1", "a1", "q2"]
    # a line without a response (as `data convert` writes an unanswered turn) is skipped ...
    unanswered = {**rows[0], "id": "s3", "response": None}
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(unanswered))
    assert [ex.id for ex in read_chat_examples(path)] == ["s1"]
    # ... but a file in which no line has one is an error naming the first
    path.write_text(json.dumps(unanswered) + "\n" + json.dumps({**unanswered, "response": " "}))
    with pytest.raises(DataFormatError, match="no line has one") as err:
        read_chat_examples(path)
    assert (err.value.line, err.value.field) == (1, "response")


def test_read_triples(tmp_path):
    path = tmp_path / "triples.train.tsv"
    path.write_text("what is bm25?\tBM25 is a ranking function.\tA fox.\nwhy?\tBecause.\n")
    a, b = read_triples(path)
    assert a.id == "triples-1" and a.messages == (Turn("user", "what is bm25?"),)
    assert a.positives == (TrainingPassage("BM25 is a ranking function."),)
    assert a.negatives == (TrainingPassage("A fox."),) and a.target is None
    assert b.negatives == () and b.id == "triples-2"
    path.write_text("q\tp\tn\nq\t\tn\n")
    with pytest.raises(DataFormatError) as err:
        read_triples(path)
    assert (err.value.line, err.value.field) == (2, "positive")
    path.write_text("q\tp\nonly one column\n")
    with pytest.raises(DataFormatError, match=r"triples.train.tsv:2: expected 2 or 3") as err:
        read_triples(path)
    assert err.value.line == 2


def test_read_chat_examples_errors_name_the_line_and_field(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"id": "s1", "messages": [{"role": "user", "content": "q"}], "response": "r"}
    bad = {
        "id": "s2",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}],
    }
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError) as err:
        read_chat_examples(path)
    assert (err.value.line, err.value.field) == (2, "messages[1].content")
    path.write_text(json.dumps({**good, "response": " "}) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError) as err:
        read_chat_examples(path)
    assert (err.value.line, err.value.field) == (3, "messages[1].content")


# ----------------------------------------------------------------------------- dataset builders
# Inline fixtures shaped like the real files in ../shared/data, read through the real loaders.


def _mtrag_task(conv: str, turn: int, collection: str, contexts: list[str], answerability: str):
    history = []
    for i in range(1, turn):
        history += [
            {"speaker": "user", "text": f"{conv} question {i} about zeta", "metadata": {}},
            {"speaker": "agent", "text": f"{conv} answer {i}", "metadata": {}},
        ]
    return {
        "conversation_id": conv,
        "task_id": f"{conv}<::>{turn}",
        "task_type": "rag",
        "turn": str(turn),
        "dataset": "MT-RAG 2.0",
        "contexts": [{"document_id": d, "text": f"\ntext of {d}"} for d in contexts],
        "input": [*history, {"speaker": "user", "text": f"{conv} zeta question?", "metadata": {}}],
        "targets": [{"speaker": "agent", "text": f"reference answer {conv}", "metadata": {}}],
        "answerability": [answerability],
        "Question Type": ["Factoid"],
        "Multi-Turn": ["Follow-up"],
        "Collection": collection,
    }


@pytest.fixture
def mtrag_root(tmp_path):
    root = tmp_path / "mtrag"
    tasks = [
        _mtrag_task("c1", 3, "fiqa", ["f1", "f2"], "ANSWERABLE"),
        _mtrag_task("c2", 2, "govt", ["g1"], "UNDERSPECIFIED"),  # contexts, no qrels
        _mtrag_task("c3", 1, "clapnq", [], "UNANSWERABLE"),  # nothing: no example
    ]
    tasks += [_mtrag_task(f"k{i}", 2, "fiqa", [f"f{i + 3}"], "ANSWERABLE") for i in range(20)]
    write(root / "mtrag-un" / "reference.jsonl", jsonl(tasks))
    qrels = "query-id\tcorpus-id\tscore\n" + "c1<::>3\tf2\t1\nc1<::>3\tf1\t1\n"
    qrels += "".join(f"k{i}<::>2\tf{i + 3}\t1\n" for i in range(20))
    write(root / "mtrag-un" / "qrels" / "fiqa.tsv", qrels)
    write(root / "mtrag-un" / "qrels" / "govt.tsv", "query-id\tcorpus-id\tscore\n")
    corpus = [
        {
            "_id": f"f{i}",
            "title": f"F{i}",
            "text": f"zeta fiqa passage {i} " + "pad " * i,
            "domain": "fiqa",
        }
        for i in range(1, 40)
    ]
    corpus += [
        {"_id": f"g{i}", "title": "", "text": f"govt zeta passage {i}", "domain": "govt"}
        for i in range(1, 7)
    ]
    write(root / "corpus.jsonl.gz", jsonl(corpus))
    return root


def test_mtrag_examples(mtrag_root):
    data = load_mtrag(mtrag_root)
    passages = {p.id: p for p in iter_mtrag_corpus(data.corpus_path)}
    examples = {e.id: e for e in mtrag_examples(data.sessions, data.qrels, passages)}
    assert "c3<::>1" not in examples and len(examples) == 22
    c1 = examples["c1<::>3"]
    assert [p.id for p in c1.positives] == ["f1", "f2"]
    assert c1.positives[0].text == passages["f1"].text and c1.positives[0].title == "F1"
    assert c1.target == "reference answer c1" and c1.source == "mtrag"
    assert [t.role for t in c1.messages] == ["user", "assistant"] * 2 + ["user"]
    assert c1.metadata["conversation_id"] == "c1"
    assert [p.id for p in examples["c2<::>2"].positives] == ["g1"]  # from its contexts
    no_ctx = mtrag_examples(data.sessions, data.qrels, passages, use_contexts=False)
    assert "c2<::>2" not in {e.id for e in no_ctx}


def test_mining_by_domain(mtrag_root):
    data = load_mtrag(mtrag_root)
    corpus = list(iter_mtrag_corpus(data.corpus_path))
    examples = mtrag_examples(data.sessions, data.qrels, {p.id: p for p in corpus})
    cfg = MiningConfig(num_negatives=3, rank_window=(1, 5))
    mined = mine_hard_negatives_by_domain(examples, corpus, cfg, show_progress=False)
    assert [e.id for e in mined] == [e.id for e in examples]
    govt = next(e for e in mined if e.id == "c2<::>2")
    assert len(govt.negatives) == 3 and all(
        n.id in {"g2", "g3", "g4", "g5", "g6"} for n in govt.negatives
    )
    assert all(n.id.startswith("f") for e in mined if e is not govt for n in e.negatives)
    only_fiqa = [p for p in corpus if p.metadata["domain"] == "fiqa"]
    (govt,) = [
        e
        for e in mine_hard_negatives_by_domain(examples, only_fiqa, cfg, False)
        if e.id == "c2<::>2"
    ]
    assert govt.negatives == ()  # no passages of its domain: left without negatives


def test_topiocqa_examples(tmp_path):
    turns = [
        {
            "Context": [],
            "Conversation_no": 1,
            "Turn_no": 1,
            "Question": "who is x?",
            "is_nq": True,
            "Answer": "X is a painter.",
            "Topic": "X",
            "Topic_section": "Intro",
        },
        {
            "Context": ["who is x?", "X is a painter."],
            "Conversation_no": 1,
            "Turn_no": 2,
            "Question": "where was he born?",
            "is_nq": False,
            "Answer": "UNANSWERABLE",
            "Topic": "X",
            "Topic_section": "Intro",
        },
        {
            "Context": ["who is x?", "X is a painter."],
            "Conversation_no": 1,
            "Turn_no": 3,
            "Question": "what did he paint?",
            "is_nq": False,
            "Answer": "Landscapes.",
            "Topic": "X",
            "Topic_section": "Works",
        },
    ]
    path = write(tmp_path / "topiocqa_train.json.gz", json.dumps(turns))
    a, b = topiocqa_examples(read_topiocqa(path))
    assert (a.id, b.id) == ("1_1", "1_3")
    assert b.positives == (TrainingPassage("Landscapes."),) and b.target == "Landscapes."
    assert [t.content for t in b.messages] == ["who is x?", "X is a painter.", "what did he paint?"]
    assert conversation_id(b) == "1" and b.source == "topiocqa"


def test_qrecc_rewrites_and_examples(tmp_path):
    turns = QRECC_TURNS
    path = write(tmp_path / "qrecc_test.json", json.dumps(turns))
    sessions = read_conversations(path)  # told from the file: QReCC, read by TopiOCQA's reader
    assert [(s.id, s.rewrite) for s in sessions] == [("74_1", "what is x"), ("74_2", "is x big")]
    assert sessions[1].metadata["answer_url"] == "" and "topic" not in sessions[1].metadata
    (ex,) = qrecc_examples(sessions)  # the unanswered turn is skipped
    assert ex.id == "74_1" and ex.source == "qrecc" and ex.target == "A thing."
    bad = write(tmp_path / "bad.json", json.dumps([{**turns[0], "Rewrite": 3}]))
    with pytest.raises(DataFormatError, match=r"field '\[0\].Rewrite': expected str"):
        read_conversations(bad)


_CAST_2021 = [
    {
        "number": 106,
        "turn": [
            {
                "number": 1,
                "raw_utterance": "What are the types of breast cancer?",
                "passage": "Ductal carcinoma is the most common type.",
                "manual_rewritten_utterance": "What are the types of breast cancer?",
                "canonical_result_id": "MARCO_D59865",
                "passage_id": 7,
                "automatic_rewritten_utterance": "types of breast cancer",
            },
            {
                "number": 2,
                "raw_utterance": "How likely is it to spread?",
                "passage": "Between 20% and 40% develop invasive cancer.",
                "manual_rewritten_utterance": "How likely is breast cancer to spread?",
                "canonical_result_id": "MARCO_D1",
                "passage_id": 2,
                "automatic_rewritten_utterance": "breast cancer spread",
            },
        ],
    },
]
_CAST_2022 = [
    {
        "number": 132,
        "turn": [
            {
                "number": "1-1",
                "utterance": "What was COP26 about?",
                "manual_rewritten_utterance": "What was COP26 about?",
                "response": "COP26 is a UN summit about climate change.",
                "provenance": ["MARCO_26_1-1", "MARCO_33_2-1"],
            },
            {
                "number": "1-2",
                "utterance": "Who attended?",
                "manual_rewritten_utterance": "Who attended COP26?",
            },  # no response: skipped
        ],
    },
]


@pytest.fixture
def cast_root(tmp_path):
    root = tmp_path / "trec-cast"
    write(root / "2021" / "2021_manual_evaluation_topics_v1.0.json", json.dumps(_CAST_2021))
    write(root / "2021" / "trec-cast-qrels-docs.2021.qrel", "106_2 0 MARCO_D1 2\n")
    name = "2022_evaluation_topics_flattened_duplicated_v1.0.json"
    write(root / "2022" / name, json.dumps(_CAST_2022))
    write(root / "2022" / "cast2022.qrel", "")
    return root


def test_cast_examples(cast_root):
    ex21 = cast_examples(load_cast(cast_root, 2021).sessions)
    ex22 = cast_examples(load_cast(cast_root, 2022).sessions)
    assert [e.id for e in ex21] == ["106_1", "106_2"] and [e.id for e in ex22] == ["132_1-1"]
    second = ex21[1]
    assert second.positives == (
        TrainingPassage("Between 20% and 40% develop invasive cancer.", "MARCO_D1-2"),
    )
    assert second.target == second.positives[0].text
    # the earlier canonical response is part of the session, as an assistant turn
    assert second.messages[1] == Turn("assistant", "Ductal carcinoma is the most common type.")
    assert ex22[0].positives[0].id is None and conversation_id(ex22[0]) == "132"


# ----------------------------------------------------------------------------- CLI


def _cli(*argv: str) -> int:
    import argparse

    from chatretriever.cli import build

    parser = argparse.ArgumentParser()
    build.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["build-train", *argv, "--no-progress"])
    return args.func(args)


def test_cli_mtrag_holdout_is_disjoint(mtrag_root, tmp_path, capsys):
    out, ids, evals = tmp_path / "train.jsonl", tmp_path / "held.txt", tmp_path / "eval.jsonl"
    argv = ["mtrag", str(mtrag_root), "--out", str(out), "--holdout-fraction", "0.5"]
    argv += [
        "--heldout-out",
        str(ids),
        "--eval-sessions-out",
        str(evals),
        "--rank-window",
        "1",
        "3",
    ]
    assert _cli(*argv) == 0
    summary = json.loads(capsys.readouterr().out)
    examples = read_training_examples(out)
    held = read_id_list(ids)
    eval_sessions = read_sessions(evals)
    train_convs = {conversation_id(e) for e in examples}
    assert held and train_convs and not held & train_convs
    assert {conversation_id(s) for s in eval_sessions} == held
    assert summary["examples"] == len(examples) and summary["heldout_conversations"] == len(held)
    # every task is on exactly one side (c3 has no positives, so it may be on neither in train)
    all_convs = {"c1", "c2", "c3"} | {f"k{i}" for i in range(20)}
    assert train_convs | held <= all_convs and all_convs - {"c3"} <= train_convs | held
    for ex in examples:  # mined within the example's own domain
        assert len(ex.negatives) == 4
        assert {n.id[0] for n in ex.negatives} == {ex.metadata["domain"][0]}
        assert not {p.id for p in ex.positives} & {n.id for n in ex.negatives}
    meta = json.loads((tmp_path / "train.jsonl.meta.json").read_text())
    assert meta["mining"]["rank_window"] == [1, 3] and meta["holdout"]["fraction"] == 0.5
    # explicit ids: the same file held out again gives the same split
    out2 = tmp_path / "train2.jsonl"
    argv2 = ["mtrag", str(mtrag_root), "--out", str(out2), "--holdout-ids", str(ids)]
    assert _cli(*argv2, "--negatives", "0") == 0
    assert {conversation_id(e) for e in read_training_examples(out2)} == train_convs
    # ids that name no conversation (task ids here) would hold nothing out: refused
    tasks = write(tmp_path / "task_ids.txt", "c1<::>3\nc2<::>5\n")
    argv3 = ["mtrag", str(mtrag_root), "--out", str(tmp_path / "t3.jsonl"), "--negatives", "0"]
    with pytest.raises(DataFormatError, match="none of its 2 ids names a conversation"):
        _cli(*argv3, "--holdout-ids", str(tasks))
    assert not (tmp_path / "t3.jsonl").exists()
    with pytest.raises(ValueError, match="--positives answers: only mtrag, ikat and dstc11"):
        _cli("topiocqa", str(ids), "--out", str(tmp_path / "t4.jsonl"), "--positives", "answers")


def test_cli_cast_triples_sessions(cast_root, tmp_path, capsys):
    out = tmp_path / "cast.jsonl"
    assert _cli("cast", str(cast_root), "--out", str(out), "--negatives", "2") == 0
    examples = read_training_examples(out)
    assert [e.id for e in examples] == ["106_1", "106_2", "132_1-1"]
    pool = {e.positives[0] for e in examples}
    for ex in examples:  # mined from the pool of the other positives sharing a word with it
        assert len(ex.negatives) <= 2 and set(ex.negatives) <= pool - {ex.positives[0]}
    assert examples[0].negatives == examples[1].positives  # "cancer" is their common word
    triples = write(tmp_path / "t.tsv", "zeta one\tzeta pos one\tneg\nzeta two\tzeta pos two\n")
    out = tmp_path / "t.jsonl"
    assert _cli("triples", str(triples), "--out", str(out), "--rank-window", "1", "2") == 0
    a, b = read_training_examples(out)
    assert a.negatives == (TrainingPassage("neg"), TrainingPassage("zeta pos two"))
    assert b.negatives == (TrainingPassage("zeta pos one"),)
    chats = write(tmp_path / "c.jsonl", json.dumps({"id": "s", "messages": [{"role": "user"}]}))
    with pytest.raises(DataFormatError) as err:
        _cli("sessions", str(chats), "--out", str(tmp_path / "s.jsonl"))
    assert err.value.line == 1 and err.value.field == "messages[0]"
    with pytest.raises(ValueError, match="one directory"):
        _cli("mtrag", "a", "b", "--out", str(tmp_path / "x.jsonl"))


# ----------------------------------------------------------------------------- real data


def _check_real(examples, min_count: int) -> None:
    assert len(examples) >= min_count
    for ex in examples:
        assert ex.messages[-1].role == "user" and ex.positives
        pos_ids = {p.id for p in ex.positives if p.id}
        pos_texts = {" ".join(p.text.split()).casefold() for p in ex.positives}
        assert not pos_ids & {n.id for n in ex.negatives}
        assert not pos_texts & {" ".join(n.text.split()).casefold() for n in ex.negatives}


@pytest.mark.slow
def test_real_mtrag(shared_data, tmp_path):
    data = load_mtrag(shared_data / "mtrag")
    corpus = list(iter_mtrag_corpus(data.corpus_path))
    examples = mtrag_examples(data.sessions, data.qrels, {p.id: p for p in corpus})
    assert len(examples) >= 300  # 332 judged tasks + underspecified ones with contexts
    train, held = split_heldout(examples, fraction=0.5, key=first_question)
    assert not {first_question(e) for e in train} & {first_question(e) for e in held}
    mined = mine_hard_negatives_by_domain(train, corpus, show_progress=False)
    _check_real(mined, 100)
    domain = {p.id: p.metadata["domain"] for p in corpus}
    assert all(domain[n.id] == e.metadata["domain"] for e in mined for n in e.negatives)
    assert sum(len(e.negatives) == 4 for e in mined) >= 0.95 * len(mined)
    write_training_examples(tmp_path / "m.jsonl", mined)
    assert read_training_examples(tmp_path / "m.jsonl") == mined


@pytest.mark.slow
def test_real_topiocqa_and_cast(shared_data):
    sessions = read_topiocqa(shared_data / "topiocqa" / "topiocqa_dev.json.gz")[:400]
    examples = mine_hard_negatives(topiocqa_examples(sessions), show_progress=False)
    _check_real(examples, 300)
    cast = [s for y in (2021, 2022) for s in load_cast(shared_data / "trec-cast", y).sessions]
    examples = mine_hard_negatives(cast_examples(cast), show_progress=False)
    _check_real(examples, 400)
    assert all(len(e.negatives) == 4 for e in examples)

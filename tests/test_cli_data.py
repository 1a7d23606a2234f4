"""`chatretriever data stats`: format guessing, counts, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures import QRECC_TURNS, jsonl, write

from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.io.stats import FORMATS, dataset_stats, guess_format

MTRAG_TASK = {
    "conversation_id": "c1",
    "task_id": "c1<::>2",
    "turn": "2",
    "input": [
        {"speaker": "user", "text": "a?"},
        {"speaker": "agent", "text": "b."},
        {"speaker": "user", "text": "c?"},
    ],
    "targets": [{"speaker": "agent", "text": "d."}],
    "contexts": [],
    "answerability": ["ANSWERABLE"],
    "Question Type": ["Factoid"],
    "Multi-Turn": ["Follow-up"],
    "Collection": "govt",
}

# name -> (file text, expected format, counts that must appear)
FIXTURES = {
    "corpus.jsonl.gz": (
        jsonl(
            [
                {"_id": "a", "title": "A", "text": "one two", "domain": "fiqa"},
                {"_id": "b", "title": "", "text": "three", "domain": "fiqa"},
                {"_id": "c", "title": "", "text": "four", "domain": "govt"},
            ]
        ),
        "beir-corpus",
        {"passages": 3, "with title": 1, "domains": {"fiqa": 2, "govt": 1}},
    ),
    # BEIR queries share the corpus's keys: no title, and turns marked (MTRAG's retrieval tasks)
    "govt_lastturn.jsonl": (
        jsonl(
            [
                {"_id": "t1", "text": "|user|: a?\n|agent|: b.\n|user|: c?"},
                {"_id": "t2", "text": "d?"},
            ]
        ),
        "beir-queries",
        {"queries": 2, "with earlier turns": 1, "turns": 4, "max turns": 3},
    ),
    "sessions.jsonl": (
        jsonl([{"id": "q", "messages": [{"role": "user", "content": "x"}], "rewrite": "x"}]),
        "sessions",
        {"sessions": 1, "turns": 1, "with rewrite": 1, "with response": 0},
    ),
    "qrels.txt": (
        "q1 0 d1 2\nq1 0 d2 0\nq2 0 d1 1\n",
        "trec-qrels",
        {
            "judgments": 3,
            "queries": 2,
            "documents": 2,
            "relevant (grade > 0)": 2,  # the grade-0 judgment is not relevant
            "grades": {"0": 1, "1": 1, "2": 1},
        },
    ),
    "fiqa.tsv": (
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td1\t1\n",
        "beir-qrels",
        {"judgments": 2, "queries": 2, "documents": 1, "relevant (grade > 0)": 2},
    ),
    "run.trec": (
        "q1 Q0 d1 1 0.9 bm25\nq1 Q0 d2 2 0.5 bm25\nq2 Q0 d1 1 0.7 bm25\n",
        "trec-run",
        {"queries": 2, "results": 3, "max depth": 2, "tag": "bm25"},
    ),
    "reference.jsonl": (
        jsonl([MTRAG_TASK]),
        "mtrag",
        {"tasks": 1, "conversations": 1, "messages": 3, "domains": {"govt": 1}},
    ),
    "topics.json": (
        json.dumps(
            [
                {
                    "number": 7,
                    "turn": [
                        {"number": 1, "raw_utterance": "a?", "manual_rewritten_utterance": "a?"},
                        {"number": 2, "raw_utterance": "b?"},
                        {"number": 3, "raw_utterance": "c?", "automatic_rewritten_utterance": "c?"},
                    ],
                }
            ],
            indent=2,
        ),
        "cast-topics",
        {
            "topics": 1,
            "turns": 3,
            "with manual rewrite": 1,
            "with automatic rewrite": 1,
            "with response": 0,
        },
    ),
    "evaluation_topics_v1.0.txt": (  # CAsT 2019 plain-text topics
        "Number: 31\nTitle: cancer\nDescription: compare\n1\tWhat is it?\n9 \tIs it treatable?\n",
        "cast-topics-txt",
        {"topics": 1, "turns": 2, "with manual rewrite": 0},
    ),
    "resolved.tsv": ("qid\tquery\n7_1\ta?\n7_2\tb?\n", "queries-tsv", {"queries": 2}),
    "2024_test_topics.json": (  # iKAT 2024: topics numbered with integers
        json.dumps(
            [
                {
                    "number": 0,
                    "title": "Egypt",
                    "ptkb": {"1": "I am from San Francisco."},
                    "turns": [
                        {
                            "turn_id": 1,
                            "utterance": "When should I go?",
                            "resolved_utterance": "When should I go to Egypt?",
                            "response": "In winter.",
                            "ptkb_provenance": [],
                            "response_provenance": ["cw-1:0", "cw-2:3"],
                        },
                        {
                            "turn_id": 2,
                            "utterance": "Do I need a visa?",
                            "resolved_utterance": "Do I need a visa for Egypt?",
                            "response": "Yes.",
                            "ptkb_provenance": [1],
                            "response_provenance": ["cw-1:0"],
                        },
                    ],
                }
            ],
            indent=4,
        ),
        "ikat-topics",
        {"topics": 1, "turns": 2, "with rewrite": 2, "citing passages": 2, "cited passages": 2},
    ),
    "logs.json": (  # DSTC11 track 5 dialogue contexts (no labels.json beside them here)
        json.dumps(
            [
                [{"speaker": "U", "text": "A hotel in the north?"}],
                [
                    {"speaker": "U", "text": "A hotel in the north?"},
                    {"speaker": "S", "text": "Hobsons House."},
                    {"speaker": "U", "text": "Is it clean?"},
                ],
            ]
        ),
        "dstc11-logs",
        {"contexts": 2, "dialogues": 1, "turns": 4},
    ),
    "topiocqa_dev.json.gz": (
        json.dumps(
            [
                {
                    "Conversation_no": 1,
                    "Turn_no": 1,
                    "Question": "q",
                    "Answer": "a",
                    "Context": [],
                    "Topic": "T",
                    "Topic_section": "I",
                    "is_nq": True,
                },
                {
                    "Conversation_no": 1,
                    "Turn_no": 2,
                    "Question": "q2",
                    "Answer": "a2",
                    "Context": ["q", "a"],
                    "Topic": "T",
                    "Topic_section": "I",
                    "is_nq": False,
                },
            ],
            indent=4,
        ),
        "topiocqa",
        {"conversations": 1, "turns": 2, "topics": 1},
    ),
    "orquac_test.txt": (
        jsonl(
            [
                {"qid": "C_1_q#0", "question": "q?", "rewrite": "q?", "history": []},
                {
                    "qid": "C_1_q#1",
                    "question": "r?",
                    "history": [{"question": "q?", "answer": {"text": "a."}}],
                    "answer": {"text": "b."},
                },
            ]
        ),
        "orquac",
        {"conversations": 1, "questions": 2, "with rewrite": 1, "with answer": 1},
    ),
    "canard_test.json": (
        json.dumps(
            [
                {
                    "History": ["T", "S"],
                    "QuAC_dialog_id": "C_1",
                    "Question": "q?",
                    "Question_no": 1,
                    "Rewrite": "q?",
                }
            ],
            indent=4,
        ),
        "canard",
        {"conversations": 1, "questions": 1, "with rewrite": 1},
    ),
    "multidoc2dial_dial_validation.json": (
        json.dumps(
            {
                "dial_data": {
                    "dmv": [
                        {
                            "dial_id": "d",
                            "turns": [
                                {"turn_id": 1, "role": "user", "utterance": "q?"},
                                {
                                    "turn_id": 2,
                                    "role": "agent",
                                    "utterance": "a.",
                                    "references": [],
                                },
                            ],
                        }
                    ]
                }
            },
            indent=2,
        ),
        "doc2dial",
        {"dialogues": 1, "answered turns": 1, "grounded": 0},
    ),
    "wow_test_random_split.json": (
        json.dumps(
            [
                {
                    "chosen_topic": "T",
                    "dialog": [
                        {"speaker": "0_Apprentice", "text": "q?"},
                        {"speaker": "1_Wizard", "text": "a.", "checked_sentence": {"k": "s."}},
                    ],
                }
            ]
        ),
        "wow",
        {"dialogues": 1, "answered turns": 1, "grounded": 1},
    ),
    # QReCC (apple/ml-qrecc): TopiOCQA's layout plus the human rewrite, no topics
    "qrecc_test.json": (
        json.dumps(QRECC_TURNS),
        "qrecc",
        {"conversations": 1, "questions": 2, "with rewrite": 2, "with answer": 1},
    ),
    "ESConv.json": (
        json.dumps(
            [
                {
                    "emotion_type": "anger",
                    "problem_type": "p",
                    "situation": "s",
                    "dialog": [
                        {"speaker": "speaker", "annotation": {}, "content": "hi"},
                        {
                            "speaker": "listener",
                            "annotation": {"strategy": "Questions"},
                            "content": "why?",
                        },
                        {
                            "speaker": "listener",
                            "annotation": {"strategy": "Question"},
                            "content": "tell me",
                        },
                    ],
                }
            ],
            indent=1,
        ),
        "esconv",
        {
            "dialogs": 1,
            "seeker turns": 1,
            "supporter turns": 2,
            "labelled supporter turns": 2,
            "strategies": {"Question": 2},
            "raw labels": 2,
        },
    ),
    "multiesc_valid.txt": (
        jsonl(
            [
                {
                    "situation": "s",
                    "dialog": [
                        {"text": "hi", "speaker": "usr"},
                        {"text": "hello", "speaker": "sys", "strategy": "Greeting"},
                    ],
                }
            ]
        ),
        "multiesc",
        {"dialogs": 1, "supporter turns": 1, "strategies": {"Greeting": 1}},
    ),
    "devWithStrategy_short.tsv": (
        "0.0 0 0 hi EOS 1.0 1 1 [Questions] why?\n",
        "esconv-tsv",
        {"examples": 1, "strategies": {"Question": 1}},
    ),
    "strategy.json": ('[\n  "[Question]",\n  "[Others]"\n]\n', "strategy-list", {"strategies": 2}),
    "metadata.jsonl.gz": (
        jsonl([{"item_id": "10", "title": "A", "tags": ["x"]}, {"item_id": "11", "title": "B"}]),
        "reclm-items",
        {"items": 2, "non-empty fields": {"item_id": 2, "tags": 1}},
    ),
    "sequential_data.txt": (
        "1 1 2 1\n2 2 1\n",
        "reclm-sequences",
        {"users": 2, "interactions": 5, "distinct items": 2, "max history": 3},
    ),
}


@pytest.fixture
def fixture_files(tmp_path):
    return {name: write(tmp_path / name, text) for name, (text, _, _) in FIXTURES.items()}


def test_every_guessable_format_has_its_stats():
    from chatretriever.io.formats import FORMAT_NAMES

    assert sorted(FORMATS) == sorted(FORMAT_NAMES)


def test_every_format_has_a_fixture():
    assert sorted(fmt for _, fmt, _ in FIXTURES.values()) == sorted(FORMATS)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_guess_format_and_stats(fixture_files, name):
    _, fmt, counts = FIXTURES[name]
    assert guess_format(fixture_files[name]) == fmt
    stats = dataset_stats(fixture_files[name])
    assert stats["format"] == fmt and stats["path"] == str(fixture_files[name])
    for key, value in counts.items():
        assert stats[key] == value, key


def test_guess_format_edge_cases(tmp_path):
    assert guess_format(write(tmp_path / "cast2022.qrel", "")) == "trec-qrels"
    assert dataset_stats(tmp_path / "cast2022.qrel")["judgments"] == 0
    with pytest.raises(DataFormatError, match="cannot tell the format"):
        guess_format(write(tmp_path / "notes.txt", "just some words\n"))
    with pytest.raises(DataFormatError, match="cannot tell the format"):
        guess_format(write(tmp_path / "empty.jsonl", ""))
    with pytest.raises(DataFormatError, match="is a directory"):
        guess_format(tmp_path)
    with pytest.raises(ValueError, match="unknown format"):
        dataset_stats(tmp_path / "cast2022.qrel", fmt="parquet")
    # {"_id", "text"} lines: queries by their name or marked turns, else (or with a title) passages
    plain = jsonl([{"_id": "q1", "text": "what is bm25"}])
    assert guess_format(write(tmp_path / "test_queries.jsonl", plain)) == "beir-queries"
    assert guess_format(write(tmp_path / "docs.jsonl", plain)) == "beir-corpus"
    titled = jsonl([{"_id": "d", "title": "T", "text": "|user|: x"}])
    assert guess_format(write(tmp_path / "queries.jsonl", titled)) == "beir-corpus"
    assert guess_format(write(tmp_path / "query_logs_corpus.jsonl", plain)) == "beir-corpus"
    assert guess_format(write(tmp_path / "subquery.jsonl", plain)) == "beir-corpus"
    # tab-separated corpora: named by a header (DPR), a file name, or long texts (MS MARCO)
    dpr = "id\ttext\ttitle\n1\tAaron was a prophet.\tAaron\n"
    assert guess_format(write(tmp_path / "psgs_w100.tsv", dpr)) == "beir-corpus"
    assert guess_format(write(tmp_path / "collection.tsv", "0\tThe cheetah.\n")) == "beir-corpus"
    long = "7\t" + "word " * 60 + "\n"
    assert guess_format(write(tmp_path / "x.tsv", long)) == "beir-corpus"
    assert guess_format(write(tmp_path / "x.tsv", "q1\twhat is bm25\n")) == "queries-tsv"


def test_cli_prints_a_table(fixture_files, capsys):
    assert main(["data", "stats", str(fixture_files["corpus.jsonl.gz"])]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[-1] for line in out if line.strip()}
    assert rows["format"] == "beir-corpus" and rows["passages"] == "3"
    assert "domains" in rows and rows["fiqa"] == "2" and rows["govt"] == "1"
    assert any(line.startswith("  fiqa") for line in out)  # nested counts are indented


def test_cli_format_option_overrides_guessing(fixture_files, capsys):
    # a 3-column TSV read as a run would fail; forcing beir-qrels reads it
    path = fixture_files["fiqa.tsv"]
    assert main(["data", "stats", str(path), "--format", "beir-qrels", "--no-progress"]) == 0
    assert "judgments" in capsys.readouterr().out
    assert main(["data", "stats", str(path), "--format", "trec-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # what it holds, not "6 columns, got 3"
    assert err == [f"error: {path}: holds beir-qrels data, not a run (`evaluate RUN QRELS` "
                   "takes it second)"]  # fmt: skip


@pytest.mark.parametrize(
    "name, corrupt, where",
    [
        (
            "corpus.jsonl.gz",
            lambda t: t.replace('"text": "three"', '"body": "three"'),
            ":2: field 'text': missing field",
        ),
        ("reference.jsonl", lambda t: t + t, ":2: field 'task_id': duplicate id"),
        ("qrels.txt", lambda t: t + "q3 0 d9\n", ":4: expected 4 columns, got 3"),
        ("run.trec", lambda t: t.replace("0.5", "x"), ":2: field 'score'"),
        ("sequential_data.txt", lambda t: t + "3 1 oops\n", ":3: field 'item[2]'"),
        ("multiesc_valid.txt", lambda t: t + "{not json\n", ":2: malformed JSON"),
    ],
)
def test_cli_corrupted_copy_exits_2_with_one_line(
    fixture_files, tmp_path, capsys, name, corrupt, where
):
    bad = tmp_path / "bad" / name
    bad.parent.mkdir()
    write(bad, corrupt(FIXTURES[name][0]))
    assert main(["data", "stats", str(bad)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {bad}{where}"), lines[0]
    assert captured.out == ""


def test_cli_missing_file(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.jsonl'}: file not found"


# --- the real files (slow) ---------------------------------------------------------------------

REAL = [
    (
        "mtrag/corpus.jsonl.gz",
        "beir-corpus",
        {
            "passages": 38_104,
            "domains": {"clapnq": 10_761, "cloud": 11_917, "fiqa": 14_122, "govt": 1_304},
        },
    ),
    ("mtrag/mtrag-un/reference.jsonl", "mtrag", {"tasks": 507}),
    ("mtrag/mtrag-un/qrels/govt.tsv", "beir-qrels", {"judgments": 261, "queries": 105}),
    ("topiocqa/topiocqa_dev.json.gz", "topiocqa", {"conversations": 205, "turns": 2_514}),
    (
        "esconv/FailedESConv.json",
        "esconv",
        {"dialogs": 196, "supporter turns": 2_377, "labelled supporter turns": 2_377},
    ),
    ("esconv/multiesc_valid.txt", "multiesc", {"dialogs": 195, "supporter turns": 2_257}),
    ("esconv/devWithStrategy_short.tsv", "esconv-tsv", {"examples": 2_985}),
    ("esconv/strategy.json", "strategy-list", {"strategies": 8}),
    ("steam/metadata.jsonl.gz", "reclm-items", {"items": 32_131}),
    ("ikat-2023/2023_test_topics.json", "ikat-topics", {"topics": 25, "turns": 332}),
    ("ikat-2023/2023_train_topics.json", "ikat-topics", {"topics": 11}),
    (
        "dstc11-track5/val/logs.json",
        "dstc11-logs",
        {"contexts": 4_173, "knowledge-seeking": 2_129},
    ),
    ("steam/sequential_data.txt", "reclm-sequences", {"users": 6_684}),
    ("trec-cast/2019/data/2019qrels.txt", "trec-qrels", {"queries": 173}),
    (
        "trec-cast/2021/2021_manual_evaluation_topics_v1.0.json",
        "cast-topics",
        {"topics": 26, "turns": 239, "with response": 239},
    ),
    (
        "trec-cast/2022/2022_evaluation_topics_flattened_duplicated_v1.0.json",
        "cast-topics",
        {"turns": 205},
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("rel, fmt, counts", REAL, ids=[r[0] for r in REAL])
def test_real_file_stats(shared_data, rel, fmt, counts):
    stats = dataset_stats(shared_data / rel)
    assert stats["format"] == fmt
    for key, value in counts.items():
        assert stats[key] == value, key


@pytest.mark.slow
def test_real_mtrag_qrels_total(shared_data):
    qrels = [dataset_stats(p) for p in sorted((shared_data / "mtrag/mtrag-un/qrels").glob("*.tsv"))]
    assert sum(s["judgments"] for s in qrels) == 851
    assert sum(s["queries"] for s in qrels) == 332  # each task is judged in one domain only


@pytest.mark.slow
def test_real_cli_and_corrupted_copy(shared_data, tmp_path, capsys):
    src = shared_data / "steam" / "sequential_data.txt"
    assert main(["data", "stats", str(src), "--no-progress"]) == 0
    assert "6,684" in capsys.readouterr().out
    bad = tmp_path / "sequential_data.txt"
    shutil.copy(src, bad)
    lines = bad.read_text().splitlines()
    user, _, *rest = lines[99].split()
    lines[99] = " ".join([user, "x", *rest])  # line 100: the first item is not a row number
    bad.write_text("\n".join(lines) + "\n")
    assert main(["data", "stats", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:100: field 'item[1]'")

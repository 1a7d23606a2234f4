"""Conversation files as published, read as sessions: iKAT 2023/2024/2025 topics, DSTC11 logs
(with or without labels), MTRAG tasks; `data convert`; `search --sessions` on them (inline data)."""

from __future__ import annotations

import json

import pytest
from fixtures import DSTC11_LABELS, DSTC11_LOGS, jsonl, write

from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.io.conversations import SESSION_FORMATS, read_conversations
from chatretriever.io.dstc11 import load_dstc11
from chatretriever.io.ikat import load_ikat
from chatretriever.io.sessions import read_sessions
from chatretriever.io.trec import read_run

# iKAT 2025 renamed the turn list, the question, the citations and the PTKB provenance
IKAT_2025 = [
    {
        "number": "1-1",
        "title": "Acid reflux",
        "ptkb": ["I eat dinner late.", "I like fruit."],
        "responses": [
            {
                "turn_id": 1,
                "user_utterance": "Foods good for reflux?",
                "resolved_utterance": "Foods good for acid reflux?",
                "response": "Bananas and melons.",
                "relevant_ptkbs": [2],
                "citations": ["cw-7:1"],
            },
            {
                "turn_id": 2,
                "user_utterance": "And to avoid?",
                "resolved_utterance": "Which foods should I avoid with acid reflux?",
                "response": "Citrus and late dinners.",
                "relevant_ptkbs": [1],
                "citations": [],
            },
        ],
    }
]


def _ikat_2023(number="9-1"):
    return [
        {
            "number": number,
            "title": "Universities",
            "ptkb": {"1": "I live in Delft."},
            "turns": [
                {
                    "turn_id": 1,
                    "utterance": "Best university here?",
                    "resolved_utterance": "Best university in Delft?",
                    "response": "TU Delft.",
                    "ptkb_provenance": [1],
                    "response_provenance": ["cw-1:2"],
                }
            ],
        }
    ]


def test_ikat_2025_schema_reads_like_2023(tmp_path):
    path = write(tmp_path / "2025_test_topics.json", json.dumps(IKAT_2025))
    first, second = read_conversations(path)
    assert (first.id, second.id) == ("1-1_1", "1-1_2")
    assert [(t.role, t.content) for t in second.turns] == [
        ("user", "Foods good for reflux?"),
        ("assistant", "Bananas and melons."),
        ("user", "And to avoid?"),
    ]
    assert second.rewrite == "Which foods should I avoid with acid reflux?"
    assert first.metadata["passage_ids"] == ["cw-7:1"] and second.metadata["passage_ids"] == []
    assert first.metadata["ptkb_provenance"] == [2]
    assert first.metadata["ptkb"] == {"1": "I eat dinner late.", "2": "I like fruit."}
    bad = json.loads(json.dumps(IKAT_2025))
    bad[0]["responses"][1]["user_utterance"] = 5
    write(path, json.dumps(bad))
    with pytest.raises(DataFormatError, match=r"'\[0\]\.responses\[1\]\.user_utterance'.*got int"):
        read_conversations(path)


def test_ikat_2024_integer_topic_numbers(tmp_path):
    topics = _ikat_2023(number=0)
    (s,) = read_conversations(write(tmp_path / "2024_test_topics.json", json.dumps(topics)))
    assert s.id == "0_1" and s.metadata["conversation"] == "0"
    assert s.metadata["ptkb"] == {"1": "I live in Delft."}
    topics[0]["ptkb"] = "I live in Delft."
    with pytest.raises(DataFormatError, match=r"field '\[0\]\.ptkb': expected the statements"):
        read_conversations(write(tmp_path / "2024_test_topics.json", json.dumps(topics)))
    topics[0]["ptkb"] = {"1": "I live in Delft."}
    topics[0]["number"] = 1.5
    write(tmp_path / "2024_test_topics.json", json.dumps(topics))
    with pytest.raises(
        DataFormatError, match=r"field '\[0\]\.number': expected str or int \(got float\)"
    ):
        read_conversations(tmp_path / "2024_test_topics.json")


def test_load_ikat_reads_the_years_and_splits_present(tmp_path):
    psg = jsonl([{"doc_id": "cw-1", "passage_id": 2, "passage_text": "TU Delft ranks first."}])
    write(tmp_path / "2023_train_topics.json", json.dumps(_ikat_2023()))
    write(tmp_path / "2023_train_topics_psg_text.jsonl", psg)
    write(tmp_path / "2025_test_topics.json", json.dumps(IKAT_2025))
    write(tmp_path / "2025_test_topics_psg_text.jsonl", jsonl([]))
    both = load_ikat(tmp_path, years=[2023, 2025])  # 2023 has no test, 2025 no train
    assert [s.id for s in both.sessions] == ["9-1_1", "1-1_1", "1-1_2"]
    assert list(both.passages) == ["cw-1:2"]
    assert [s.id for s in load_ikat(tmp_path).sessions] == ["9-1_1"]  # default: 2023
    with pytest.raises(FileNotFoundError, match=r"no iKAT test topics \(2023_test_topics.json\)"):
        load_ikat(tmp_path, ["test"])
    (tmp_path / "2025_test_topics_psg_text.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="psg_text.jsonl: missing.*--positives answers"):
        load_ikat(tmp_path, ["test"], years=[2025])
    # 2024 and 2025 published no passage texts: the responses can still be positives
    answers_only = load_ikat(tmp_path, ["test"], years=[2025], need_passages=False)
    assert [s.id for s in answers_only.sessions] == ["1-1_1", "1-1_2"]
    assert answers_only.passages == {}
    write(tmp_path / "2024_test_topics.json", json.dumps(_ikat_2023()))  # 9-1_1 again
    write(tmp_path / "2024_test_topics_psg_text.jsonl", psg)
    with pytest.raises(DataFormatError, match=r"turn '9-1_1' is also in .*2023_train"):
        load_ikat(tmp_path, years=[2023, 2024])


def test_build_train_ikat_2025_on_its_responses(tmp_path, capsys):
    topics = json.loads(json.dumps(IKAT_2025))
    topics[0]["responses"].append({**topics[0]["responses"][1], "turn_id": 3, "citations": []})
    topics[0]["responses"][1].update(citations=["cw-9:4"], response="Citrus worsens reflux.")
    write(tmp_path / "2025_test_topics.json", json.dumps(topics))
    out = tmp_path / "train.jsonl"
    argv = ["build-train", "ikat", str(tmp_path), "--years", "2025", "--out", str(out)]
    assert main([*argv, "--negatives", "1", "--no-progress"]) == 2
    assert "--positives answers" in capsys.readouterr().err
    assert main([*argv, "--negatives", "1", "--no-progress", "--positives", "answers"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["positives"][0]["text"]) for r in rows] == [
        ("1-1_1", "Bananas and melons."),
        ("1-1_2", "Citrus worsens reflux."),
    ]
    # turn 3 cites nothing: skipped as with passages; negatives mined among the other positives
    assert rows[0]["negatives"][0]["text"] == "Citrus worsens reflux."


LOGS, LABELS = DSTC11_LOGS, DSTC11_LABELS


def test_dstc11_logs_with_and_without_labels(tmp_path):
    logs = write(tmp_path / "test" / "logs.json", json.dumps(LOGS))
    a, b = read_conversations(logs)
    assert (a.id, b.id) == ("test-0", "test-1")  # the split is the directory's name
    assert b.response is None and "target" not in b.metadata
    assert a.metadata["conversation"] == b.metadata["conversation"]
    write(tmp_path / "test" / "labels.json", json.dumps(LABELS))
    a, b = read_conversations(logs)
    assert b.metadata["snippet_ids"] == ["hotel:20:review:9:4"] and a.metadata["target"] is False
    assert b.response == "Guests found the bathrooms spotless."
    write(tmp_path / "test" / "labels.json", json.dumps(LABELS[:1]))
    with pytest.raises(DataFormatError, match="labels.json.*one label per context"):
        read_conversations(logs)


# DSTC9 track 1 / DSTC10 track 2: knowledge `docs` (title, body), domain-wide entity "*" without
# a name, label references without doc_type (alexa/alexa-with-dstc9-track1-dataset data/README.md)
DSTC9_KNOWLEDGE = {
    "hotel": {"3": {"name": "Alpha Inn", "docs": {"0": {"title": "Pets?", "body": "No pets."}}}},
    "taxi": {"*": {"docs": {"1": {"title": "Can I pay by card?", "body": "Yes, all taxis."}}}},
}
DSTC9_LOGS = [
    [{"speaker": "U", "text": "I need a taxi."}],
    [
        {"speaker": "U", "text": "I need a taxi."},
        {"speaker": "S", "text": "Where to?"},
        {"speaker": "U", "text": "Can I pay by card?"},
    ],
]
DSTC9_LABELS = [
    {"target": False},
    {
        "target": True,
        "knowledge": [{"domain": "taxi", "entity_id": "*", "doc_id": 1}],
        "response": "Yes, every taxi takes cards.",
    },
]


def test_dstc9_and_dstc10_files_read_like_dstc11(tmp_path):
    write(tmp_path / "knowledge.json", json.dumps(DSTC9_KNOWLEDGE))
    logs = write(tmp_path / "val" / "logs.json", json.dumps(DSTC9_LOGS))
    write(tmp_path / "val" / "labels.json", json.dumps(DSTC9_LABELS))
    _, b = read_conversations(logs)
    assert b.metadata["snippet_ids"] == ["taxi:*:faq:1"] and b.response.startswith("Yes, every")
    data = load_dstc11(tmp_path, "val")
    snippet = data.snippets["taxi:*:faq:1"]
    assert (snippet.title, snippet.text) == ("taxi", "Can I pay by card? Yes, all taxis.")
    assert data.snippets["hotel:3:faq:0"].title == "Alpha Inn"
    out = tmp_path / "train.jsonl"
    argv = ["build-train", "dstc11", str(tmp_path), "--out", str(out), "--negatives", "1"]
    assert main([*argv, "--no-progress"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["positives"][0]["id"] == "taxi:*:faq:1"
    bad = {"hotel": {"3": {"name": "Alpha Inn", "docs": {"0": {"title": "Pets?"}}}}}
    write(tmp_path / "knowledge.json", json.dumps(bad))
    with pytest.raises(DataFormatError, match=r"field 'hotel.3.docs.0': expected title and body"):
        load_dstc11(tmp_path, "val")


def test_queries_files_are_sessions_with_marked_turns_split(tmp_path):
    # MTRAG's retrieval tasks: BEIR queries whose text marks the turns
    rows = [
        {"_id": "c<::>1", "text": "|user|: What are sheltered rooms for?"},
        {"_id": "c<::>2", "text": "|user|: What are sheltered\nrooms for?\n|user|: What to keep?"},
        {"_id": "c<::>3", "text": "|user|: a?\n|agent|: b.\n|user|: c?"},
        {"_id": "plain", "text": "  just a question  "},
    ]
    one, two, three, plain = read_conversations(write(tmp_path / "q.jsonl", jsonl(rows)))
    assert one.id == "c<::>1" and [t.content for t in one.turns] == [
        "What are sheltered rooms for?"
    ]
    assert [t.content for t in two.turns] == ["What are sheltered\nrooms for?", "What to keep?"]
    assert [t.role for t in three.turns] == ["user", "assistant", "user"]
    assert plain.turns[0].content == "just a question"
    tsv = read_conversations(write(tmp_path / "queries.tsv", "q1\tred wine\nq2\t|user|: x\n"))
    assert [(s.id, s.turns[-1].content) for s in tsv] == [("q1", "red wine"), ("q2", "x")]
    headed = write(tmp_path / "queries.tsv", "query_id\tquery\nq1\tred wine\n")  # a header
    assert [s.id for s in read_conversations(headed)] == ["q1"]
    long = write(tmp_path / "conv.tsv", "q1\t|user|: " + "word " * 50 + "\n")  # corpus-like
    assert [s.id for s in read_conversations(long)] == ["q1"]
    for bad, match in (
        ({"_id": "e", "text": " "}, ":2: field 'text': empty query text"),
        ({"_id": "e", "text": "|user|: a\n|agent|: b"}, ":2: field 'text': the last marked"),
        ({"_id": "plain", "text": "again"}, ":2: field '_id': duplicate id 'plain'"),
    ):
        path = write(tmp_path / "bad.jsonl", jsonl([rows[-1], bad]))
        with pytest.raises(DataFormatError, match=match):
            read_conversations(path)
    with pytest.raises(DataFormatError, match=r"queries.tsv:2: expected 'id<TAB>text'"):
        read_conversations(write(tmp_path / "queries.tsv", "q1\tx\nno tab here\n"), "queries-tsv")


def test_read_conversations_refuses_what_is_not_a_conversation(tmp_path):
    corpus = write(tmp_path / "corpus.jsonl", jsonl([{"_id": "d1", "title": "D", "text": "x"}]))
    with pytest.raises(DataFormatError, match="holds beir-corpus, not conversations"):
        read_conversations(corpus)
    with pytest.raises(ValueError, match="unknown sessions format 'csv'"):
        read_conversations(corpus, "csv")
    with pytest.raises(DataFormatError, match="cannot tell its conversation format; name it"):
        read_conversations(write(tmp_path / "notes.txt", "some words\n"))
    # JSON lines that match no format: the sessions reader names what is wrong, where
    for text, match in (
        ("", "empty.jsonl: holds no sessions"),
        ('{"id": "a", "messages": [\n', "empty.jsonl:1: malformed JSON"),
        ('{"id": "a", "msgs": []}\n', "empty.jsonl:1: field 'messages'"),
    ):
        with pytest.raises(DataFormatError, match=match):
            read_conversations(write(tmp_path / "empty.jsonl", text))
    # valid files of formats not known: said so, not "malformed JSON" or a missing sessions field
    coqa = json.dumps({"version": "1.0", "data": [{"story": "s", "questions": []}]}, indent=2)
    quac = json.dumps({"data": [{"paragraphs": []}], "version": "0.2"})
    for name, text, match in (
        ("coqa.json", coqa, "a JSON document in none of the conversation formats known"),
        ("quac.json", quac, r"cannot tell its conversation format \(first line's keys: data, ver"),
    ):
        with pytest.raises(DataFormatError, match=match + ".*; name it"):
            read_conversations(write(tmp_path / name, text))
    assert "sessions" in SESSION_FORMATS and "beir-corpus" not in SESSION_FORMATS


MTRAG_TASKS = [
    {
        "conversation_id": "c1",
        "task_id": f"c1<::>{turn}",
        "turn": str(turn),
        "input": inputs,
        "targets": [{"speaker": "agent", "text": "ok."}],
        "contexts": [],
        "answerability": ["ANSWERABLE"],
        "Question Type": ["Factoid"],
        "Multi-Turn": ["Follow-up"],
        "Collection": "govt",
    }
    for turn, inputs in (
        (1, [{"speaker": "user", "text": "How do volcanoes erupt?"}]),
        (
            2,
            [
                {"speaker": "user", "text": "How do volcanoes erupt?"},
                {"speaker": "agent", "text": "Magma rises."},
                {"speaker": "user", "text": "What about penguins on ice?"},
            ],
        ),
    )
]
CORPUS = [
    {"_id": "d1", "title": "Volcano", "text": "volcanoes erupt when magma rises"},
    {"_id": "d2", "title": "Penguin", "text": "penguins live on the ice of antarctica"},
    {"_id": "d3", "title": "Violin", "text": "a violin is played with a bow"},
]


def test_convert_writes_sessions_jsonl_and_keeps_the_old_file_on_error(tmp_path, capsys):
    src = write(tmp_path / "2025_test_topics.json", json.dumps(IKAT_2025))
    out = tmp_path / "sessions.jsonl"
    assert main(["data", "convert", str(src), "--out", str(out)]) == 0
    assert "2 sessions ->" in capsys.readouterr().err
    assert read_sessions(out) == read_conversations(src)
    made = json.loads((tmp_path / "sessions.jsonl.settings.json").read_text())
    assert (made["path"], made["format"], made["sessions"]) == (str(src), None, 2)
    before = out.read_text()
    corpus = write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
    assert main(["data", "convert", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not conversations" in err[0]
    assert out.read_text() == before


def test_search_reads_a_published_dataset_file(tmp_path, capsys):
    pytest.importorskip("bm25s")
    tasks = write(tmp_path / "reference.jsonl", jsonl(MTRAG_TASKS))
    corpus = write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
    out = tmp_path / "run.trec"
    argv = ["search", "--bm25", str(corpus), "--sessions", str(tasks), "--out", str(out)]
    assert main([*argv, "--formulation", "last_turn", "--k", "1"]) == 0
    assert {q: next(iter(d)) for q, d in read_run(out).scores.items()} == {
        "c1<::>1": "d1",
        "c1<::>2": "d2",
    }
    capsys.readouterr()
    assert main([*argv, "--sessions-format", "ikat-topics"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tasks}")


def test_search_takes_rewrites_from_a_metadata_field(tmp_path, capsys):
    pytest.importorskip("bm25s")
    rows = [  # CAsT 2020/2021 keep the organisers' automatic rewrites as automatic_rewrite
        {
            "id": "t_2",
            "messages": [{"role": "user", "content": "and the other one?"}],
            "rewrite": "how is a violin played",
            "metadata": {"automatic_rewrite": "where do penguins live", "topic": "t"},
        },
        {"id": "t_3", "messages": [{"role": "user", "content": "volcanoes?"}]},
    ]
    sessions = write(tmp_path / "s.jsonl", jsonl(rows))
    corpus = write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
    out = tmp_path / "run.trec"
    argv = ["search", "--bm25", str(corpus), "--sessions", str(sessions), "--out", str(out)]
    argv += ["--formulation", "rewrite", "--missing-rewrite", "last_turn", "--k", "1"]
    assert main(argv) == 0
    assert next(iter(read_run(out).scores["t_2"])) == "d3"  # the session's own rewrite
    assert main([*argv, "--rewrite-field", "automatic_rewrite"]) == 0
    run = read_run(out).scores
    assert next(iter(run["t_2"])) == "d2" and next(iter(run["t_3"])) == "d1"  # no rewrite there
    capsys.readouterr()
    assert main([*argv, "--rewrite-field", "manual"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no session has a text in metadata field 'manual'" in err
    assert err.endswith("text fields there: automatic_rewrite, topic")


# OR-QuAC (prdwb/orconvqa-release preprocessed/*.txt) and CANARD, both grown from QuAC
ORQUAC = [
    {
        "qid": "C_ab_1_q#0",
        "question": "What was Zappa's first band?",
        "rewrite": "What was Zappa's first band?",
        "history": [],
        "answer": {"text": "The Mothers of Invention", "answer_start": 0},
    },
    {
        "qid": "C_ab_1_q#1",
        "question": "When was it founded?",
        "rewrite": "When was The Mothers of Invention founded?",
        "history": [
            {"question": "What was Zappa's first band?", "answer": {"text": "The Mothers"}},
        ],
        "answer": {"text": "CANNOTANSWER"},
    },
]
CANARD = [
    {
        "History": ["Frank Zappa", "Disbandment", "What group disbanded", "The Mothers"],
        "QuAC_dialog_id": "C_ab_1",
        "Question": "When did they disband?",
        "Question_no": 2,
        "Rewrite": "When did the Mothers of Invention disband?",
    }
]


def test_orquac_and_canard(tmp_path):
    first, second = read_conversations(write(tmp_path / "test.txt", jsonl(ORQUAC)))
    assert (first.id, first.response) == ("C_ab_1_q#0", "The Mothers of Invention")
    assert [t.content for t in second.turns] == [
        "What was Zappa's first band?",
        "The Mothers",
        "When was it founded?",
    ]
    assert second.rewrite.endswith("Invention founded?") and second.response is None
    assert first.metadata["conversation"] == second.metadata["conversation"] == "C_ab_1"
    (c,) = read_conversations(write(tmp_path / "test.json", json.dumps(CANARD)))
    assert c.id == "C_ab_1_q#1" and c.metadata["title"] == "Frank Zappa"  # OR-QuAC's qid
    assert [t.role for t in c.turns] == ["user", "assistant", "user"]
    assert c.rewrite == "When did the Mothers of Invention disband?"
    for path, match in (
        (write(tmp_path / "a.txt", jsonl([{**ORQUAC[0], "history": "none"}])), "'history'"),
        (write(tmp_path / "b.txt", jsonl([ORQUAC[0], ORQUAC[0]])), r":2: .*duplicate qid"),
        (write(tmp_path / "c.json", json.dumps([{**CANARD[0], "History": ["t"]}])), "History"),
        (write(tmp_path / "d.json", json.dumps([{**CANARD[0], "Question_no": 0}])), "Question_no"),
        (
            write(tmp_path / "e.json", json.dumps([CANARD[0], {**CANARD[0], "Rewrite": None}])),
            r"field '\[1\]\.Rewrite': expected a non-empty string",
        ),
        (write(tmp_path / "f.txt", jsonl([{**ORQUAC[0], "question": " "}])), "empty question"),
    ):
        with pytest.raises(DataFormatError, match=match):
            read_conversations(path)


# MultiDoc2Dial (IBM/multidoc2dial) and Wizard of Wikipedia: document-grounded dialogues
MDD = {
    "dial_data": {
        "dmv": [
            {
                "dial_id": "d1",
                "turns": [
                    {
                        "turn_id": 1,
                        "role": "user",
                        "utterance": "How do I renew?",
                        "references": [],
                    },
                    {
                        "turn_id": 2,
                        "role": "agent",
                        "utterance": "Visit the DMV.",
                        "references": [{"doc_id": "Renew#1_0", "id_sp": "4"}],
                    },
                    {"turn_id": 3, "role": "user", "utterance": "Cost?", "references": []},
                    {"turn_id": 4, "role": "user", "utterance": "Anyone?", "references": []},
                    {
                        "turn_id": 5,
                        "role": "agent",
                        "utterance": "35 dollars.",
                        "references": [
                            {"doc_id": "Fees#1_0", "id_sp": "2"},
                            {"doc_id": "Fees#1_0", "id_sp": "3"},
                        ],
                    },
                ],
            }
        ]
    }
}
WOW = [
    {
        "chosen_topic": "Cheetah",
        "dialog": [
            {"speaker": "1_Wizard", "text": "Hi! Cheetahs are fast.", "checked_sentence": {}},
            {"speaker": "0_Apprentice", "text": "How fast?"},
            {
                "speaker": "1_Wizard",
                "text": "110 km/h!",
                "checked_sentence": {"chosen_Cheetah_0": "It reaches 110 km/h."},
                "checked_passage": {"chosen_Cheetah": "Cheetah"},
            },
            {"speaker": "0_Apprentice", "text": "Wow."},
            {
                "speaker": "1_Wizard",
                "text": "Yes!",
                "checked_sentence": {"no_passages_used": "no_passages_used"},
            },
        ],
    }
]


def test_doc2dial_and_wizard_of_wikipedia(tmp_path):
    first, second = read_conversations(
        write(tmp_path / "multidoc2dial_dial_validation.json", json.dumps(MDD, indent=2))
    )
    assert (first.id, first.response, first.metadata["doc_ids"]) == (
        "d1_1",
        "Visit the DMV.",
        ["Renew#1_0"],
    )
    # turn 3 is not answered by the next turn: only turn 4's session, with turn 3 in its history
    assert second.id == "d1_4" and [t.content for t in second.turns][-2:] == ["Cost?", "Anyone?"]
    assert second.metadata["doc_ids"] == ["Fees#1_0"]
    assert second.metadata["spans"] == ["Fees#1_0#2", "Fees#1_0#3"]
    nested = {"dial_data": {"dmv": {"Renew#1_0": MDD["dial_data"]["dmv"]}}}  # Doc2Dial's nesting
    assert read_conversations(write(tmp_path / "d.json", json.dumps(nested))) == [first, second]
    # Doc2Dial proper: the dialogue names its document, a reference only its span (sp_id)
    d2d = json.loads(json.dumps(nested))
    dialogue = d2d["dial_data"]["dmv"]["Renew#1_0"][0]
    for turn in dialogue["turns"]:
        turn["references"] = [{"sp_id": r["id_sp"], "label": "x"} for r in turn["references"]]
    a, b = read_conversations(write(tmp_path / "d2d.json", json.dumps(d2d)))
    assert a.metadata["doc_ids"] == b.metadata["doc_ids"] == ["Renew#1_0"]  # the nesting key
    assert b.metadata["spans"] == ["Renew#1_0#2", "Renew#1_0#3"]
    dialogue["doc_id"] = "Fees#1_0"  # a dialogue's own doc_id wins
    (_, b) = read_conversations(write(tmp_path / "d2d.json", json.dumps(d2d)))
    assert b.metadata["doc_ids"] == ["Fees#1_0"]
    a, b = read_conversations(write(tmp_path / "test_random_split.json", json.dumps(WOW)))
    assert (a.id, a.response, a.metadata["checked_sentence"]) == (
        "0_2",
        "110 km/h!",
        ["It reaches 110 km/h."],
    )
    assert [t.role for t in a.turns] == ["assistant", "user"]  # the wizard's opener is history
    assert b.id == "0_4" and b.metadata["checked_sentence"] == []  # no knowledge used
    bad = json.loads(json.dumps(WOW))
    bad[0]["dialog"][1]["speaker"] = "Student"
    with pytest.raises(DataFormatError, match=r"'\[0\]\.dialog\[1\]': expected a speaker"):
        read_conversations(write(tmp_path / "test_random_split.json", json.dumps(bad)), "wow")

"""Test collections from datasets' own knowledge: `data corpus` and `data qrels` (io.grounding)."""

from __future__ import annotations

import json

import pytest
from fixtures import DSTC11_LABELS, DSTC11_LOGS, write

from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.io.corpus import read_corpus
from chatretriever.io.grounded_dialogs import passage_id, read_doc2dial, read_doc2dial_docs
from chatretriever.io.grounding import grounding_qrels, knowledge_format, read_knowledge
from chatretriever.io.trec import read_qrels
from chatretriever.types import Qrel, Session, Turn

KNOWLEDGE = {  # DSTC11 track 5 knowledge.json: one hotel, a review and an FAQ
    "hotel": {
        "20": {
            "name": "HOBSONS HOUSE",
            "reviews": {"9": {"sentences": {"4": "The bathrooms were spotless.", "5": "Noisy."}}},
            "faqs": {"1": {"question": "Is there parking?", "answer": "Yes, free parking."}},
        }
    }
}

# MultiDoc2Dial's documents (IBM/multidoc2dial README): doc ids hold spaces and '#'; each span
# names the section (`id_sec`) that holds it
DOCS = {
    "doc_data": {
        "dmv": {
            "Renew your license#1_0": {
                "doc_id": "Renew your license#1_0",
                "title": "Renew your license",
                "doc_text": "Renewing. Visit the DMV. Bring your old license. Fees. It costs $35.",
                "spans": {
                    "1": {"id_sec": "t_0", "text_sec": "Renewing", "title": "Renewing"},
                    "2": {"id_sec": "p_1", "text_sec": "Visit the DMV. ", "start_sec": 10},
                    "3": {"id_sec": "p_1", "text_sec": "Visit the DMV. ", "start_sec": 10},
                    "4": {"id_sec": "p_2", "text_sec": "It costs $35.", "start_sec": 40},
                },
            }
        }
    }
}
DIALOGUES = {
    "dial_data": {
        "dmv": [
            {
                "dial_id": "d1",
                "turns": [
                    {"turn_id": 1, "role": "user", "utterance": "How do I renew?"},
                    {
                        "turn_id": 2,
                        "role": "agent",
                        "utterance": "Visit the DMV.",
                        "references": [{"doc_id": "Renew your license#1_0", "id_sp": "3"}],
                    },
                    {"turn_id": 3, "role": "user", "utterance": "What does it cost?"},
                    {
                        "turn_id": 4,
                        "role": "agent",
                        "utterance": "35 dollars.",
                        "references": [{"doc_id": "Renew your license#1_0", "id_sp": "4"}],
                    },
                ],
            }
        ]
    }
}


def test_knowledge_formats_are_told_apart(tmp_path):
    k = write(tmp_path / "knowledge.json", json.dumps(KNOWLEDGE, indent=2))
    docs = write(tmp_path / "mdd_doc.json", json.dumps(DOCS))
    psg = write(
        tmp_path / "t_psg_text.jsonl",
        '{"doc_id": "cw-1", "passage_id": 2, "passage_text": "a b"}\n',
    )
    beir = write(tmp_path / "c.jsonl", '{"_id": "p1", "title": "reviews", "text": "faqs"}\n')
    assert [knowledge_format(p) for p in (k, docs, psg, beir)] == [
        "dstc-knowledge",
        "doc2dial-docs",
        "ikat-passages",
        "corpus",
    ]
    assert [p.id for p in read_knowledge(k)] == [
        "hotel:20:review:9:4",
        "hotel:20:review:9:5",
        "hotel:20:faq:1",
    ]
    assert [(p.id, p.text) for p in read_knowledge(psg)] == [("cw-1:2", "a b")]
    assert [p.id for p in read_knowledge(beir)] == ["p1"]


def test_doc2dial_documents_by_section_and_by_document(tmp_path):
    path = write(tmp_path / "mdd_doc.json", json.dumps(DOCS))
    sections = read_doc2dial_docs(path)
    base = "Renew_your_license#1_0"  # whitespace replaced: TREC files cannot hold it
    assert [(p.id, p.text) for p in sections] == [
        (f"{base}#t_0", "Renewing"),
        (f"{base}#p_1", "Visit the DMV."),
        (f"{base}#p_2", "It costs $35."),
    ]
    assert sections[1].title == "Renew your license" and sections[1].metadata["spans"] == ["2", "3"]
    assert sections[1].metadata["doc_id"] == "Renew your license#1_0"
    (whole,) = read_doc2dial_docs(path, "document")
    assert whole.id == base == passage_id("Renew your license#1_0")
    assert whole.text.startswith("Renewing. Visit")
    with pytest.raises(ValueError, match="granularity must be one of"):
        read_doc2dial_docs(path, "paragraph")
    bad = json.loads(json.dumps(DOCS))
    del bad["doc_data"]["dmv"]["Renew your license#1_0"]["spans"]["4"]["id_sec"]
    with pytest.raises(DataFormatError, match=r"spans\.4.*expected id_sec and text_sec"):
        read_doc2dial_docs(write(tmp_path / "bad.json", json.dumps(bad)))


def test_doc2dial_qrels_at_sections_or_documents(tmp_path):
    sessions = read_doc2dial(write(tmp_path / "mdd_dial.json", json.dumps(DIALOGUES)))
    sections = read_doc2dial_docs(write(tmp_path / "mdd_doc.json", json.dumps(DOCS)))
    base = "Renew_your_license#1_0"
    assert grounding_qrels(sessions, sections) == [
        Qrel("d1_1", f"{base}#p_1", 1),
        Qrel("d1_3", f"{base}#p_2", 1),
    ]
    assert grounding_qrels(sessions) == [Qrel("d1_1", base, 1), Qrel("d1_3", base, 1)]
    other = [s for s in sections if s.id != f"{base}#p_2"]  # a release without that section
    with pytest.raises(ValueError, match=r"'d1_3' is grounded in span .*#4"):
        grounding_qrels(sessions, other)


def test_qrels_from_each_reader_key():
    def session(sid: str, **meta) -> Session:
        return Session(sid, (Turn("user", "q"),), metadata=meta)

    sessions = [
        session("dstc", snippet_ids=["hotel:1:faq:2", "hotel:1:faq:2"], target=True),
        session("ikat", passage_ids=["cw-1:2"]),
        session("mtrag", context_ids=["m-1"]),
        session("cast", provenance=["MARCO_1", "MARCO_50_2268879788 -3"]),  # as CAsT 2022 has it
        session("chit-chat", snippet_ids=[], target=False),
    ]
    assert grounding_qrels(sessions) == [
        Qrel("dstc", "hotel:1:faq:2", 1),  # a passage cited twice is judged once
        Qrel("ikat", "cw-1:2", 1),
        Qrel("mtrag", "m-1", 1),
        Qrel("cast", "MARCO_1", 1),
        Qrel("cast", "MARCO_50_2268879788-3", 1),  # TREC files cannot hold the space
    ]


def test_underspecified_mtrag_tasks_are_judged_with_a_warning(caplog):
    def session(sid: str, label: str) -> Session:
        meta = {"context_ids": [f"p-{sid}"], "answerability": label}
        return Session(sid, (Turn("user", "q"),), metadata=meta)

    plain, vague = session("m1", "ANSWERABLE"), session("m2", "UNDERSPECIFIED")
    with caplog.at_level("WARNING"):
        assert len(grounding_qrels([plain])) == 1
    assert "UNDERSPECIFIED" not in caplog.text
    with caplog.at_level("WARNING"):
        assert len(grounding_qrels([plain, vague])) == 2
    assert "1 judged sessions are marked UNDERSPECIFIED (first: 'm2')" in caplog.text


def test_cli_dstc11_corpus_qrels_search_and_evaluate(tmp_path, capsys):
    pytest.importorskip("bm25s")
    write(tmp_path / "knowledge.json", json.dumps(KNOWLEDGE))
    logs = write(tmp_path / "val" / "logs.json", json.dumps(DSTC11_LOGS))
    write(tmp_path / "val" / "labels.json", json.dumps(DSTC11_LABELS))
    corpus, qrels, run = tmp_path / "k.jsonl", tmp_path / "q.txt", tmp_path / "r.trec"
    assert main(["data", "corpus", str(tmp_path / "knowledge.json"), "--out", str(corpus)]) == 0
    assert [p.id for p in read_corpus(corpus)][0] == "hotel:20:review:9:4"
    assert "--granularity" not in capsys.readouterr().err
    argv = ["data", "corpus", str(tmp_path / "knowledge.json"), "--granularity", "document"]
    assert main([*argv, "--out", str(corpus)]) == 0  # DSTC has one granularity: said, not silent
    assert "--granularity applies to Doc2Dial documents only" in capsys.readouterr().err
    assert main(["data", "qrels", str(logs), "--out", str(qrels)]) == 0
    assert "1 judgments of 1 of 2 sessions" in capsys.readouterr().err  # chit-chat: none
    assert read_qrels(qrels) == [Qrel("val-1", "hotel:20:review:9:4", 1)]
    made = json.loads((tmp_path / "k.jsonl.settings.json").read_text())  # how each was made
    assert (made["path"], made["format"], made["passages"]) == (
        str(tmp_path / "knowledge.json"), "dstc-knowledge", 3)  # fmt: skip
    assert made["granularity"] is None  # given, but DSTC has one: recorded as not applied
    made = json.loads((tmp_path / "q.txt.settings.json").read_text())
    assert (made["judgments"], made["judged_sessions"], made["sessions"]) == (1, 1, 2)
    argv = ["search", "--bm25", str(corpus), "--sessions", str(logs), "--out", str(run)]
    assert main([*argv, "--formulation", "last_turn"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), str(qrels), "--measures", "MRR@10"]) == 0
    assert "MRR@10\tall\t1.0000" in capsys.readouterr().out  # "bathrooms" finds its review


def test_cli_refusals_name_the_file(tmp_path, capsys):
    logs = write(tmp_path / "logs.json", json.dumps(DSTC11_LOGS))  # no labels.json beside it
    assert main(["data", "qrels", str(logs), "--out", str(tmp_path / "q.txt")]) == 2
    assert "no session records the passages it is grounded in" in capsys.readouterr().err
    assert not (tmp_path / "q.txt").exists()
    bad = write(tmp_path / "bad_doc.json", '{"doc_data": {"dmv": {"x": {"title": "t"}}}}')
    assert main(["data", "corpus", str(bad), "--out", str(tmp_path / "c.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad_doc.json" in err and "doc_data.dmv.x" in err and "Traceback" not in err
    assert not (tmp_path / "c.jsonl").exists()
    # a conversation file given as knowledge: what it holds, not "malformed JSON" on line 1
    assert main(["data", "corpus", str(logs), "--out", str(tmp_path / "c.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "holds dstc11-logs data, not knowledge" in err and "malformed" not in err
    assert not (tmp_path / "c.jsonl").exists()

"""Builders of round 2: iKAT and DSTC11 loaders and examples, synthetic pairs, answers as
positives, teacher scores from the CLI (inline data, fake generator and fake encoder)."""

from __future__ import annotations

import json

import pytest
from fakes import HashEncoder
from fixtures import DSTC11_LABELS, DSTC11_LOGS, jsonl, write

from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.io.dstc11 import load_dstc11
from chatretriever.io.ikat import load_ikat
from chatretriever.io.training import read_training_examples
from chatretriever.retrieval.training_data.builders import dstc11_examples, ikat_examples
from chatretriever.types import Passage

IKAT = [
    {
        "number": "1-1",
        "title": "Universities",
        "ptkb": {"1": "I live in the Netherlands."},
        "turns": [
            {
                "turn_id": 1,
                "utterance": "Can you help me find a university?",
                "resolved_utterance": "Can you help me find a university?",
                "response": "Do you want to study computer science?",
                "ptkb_provenance": [],
                "response_provenance": [],
            },
            {
                "turn_id": 2,
                "utterance": "Which ones are best here?",
                "resolved_utterance": "Which universities are best in the Netherlands?",
                "response": "Delft and Eindhoven rank highest.",
                "ptkb_provenance": [1],
                "response_provenance": ["cw-1:2", "cw-9:1"],
            },
        ],
    }
]
IKAT_PSG = [{"doc_id": "cw-1", "passage_id": "2", "passage_text": " Delft ranks first\n in NL "}]


def _ikat_dir(tmp_path, topics=IKAT):
    d = tmp_path / "ikat"
    write(d / "2023_train_topics.json", json.dumps(topics))
    write(d / "2023_train_topics_psg_text.jsonl", jsonl(IKAT_PSG))
    return d


def test_ikat_turns_become_sessions_with_rewrites_and_cited_passages(tmp_path):
    data = load_ikat(_ikat_dir(tmp_path), ["train"])
    first, second = data.sessions
    assert (
        second.id == "1-1_2" and second.rewrite == "Which universities are best in the Netherlands?"
    )
    assert [(t.role, t.content) for t in second.turns] == [
        ("user", "Can you help me find a university?"),
        ("assistant", "Do you want to study computer science?"),
        ("user", "Which ones are best here?"),
    ]
    assert second.metadata["conversation"] == "1-1"
    assert data.passages["cw-1:2"].text == "Delft ranks first in NL"
    (ex,) = ikat_examples(data.sessions, data.passages)  # turn 1 cites nothing; cw-9:1 unknown
    assert ex.id == "1-1_2" and [p.id for p in ex.positives] == ["cw-1:2"]
    assert ex.target == "Delft and Eindhoven rank highest."
    assert ex.metadata["rewrite"] == second.rewrite  # the teacher's query
    (ans,) = ikat_examples(data.sessions, data.passages, positives="answers")
    assert ans.positives[0].text == "Delft and Eindhoven rank highest."


def test_ikat_errors_name_the_file_and_field(tmp_path):
    bad = json.loads(json.dumps(IKAT))
    bad[0]["turns"][1]["resolved_utterance"] = None
    with pytest.raises(DataFormatError, match=r"2023_train_topics.json.*\[0\]\.turns\[1\]"):
        load_ikat(_ikat_dir(tmp_path, bad), ["train"])


KNOWLEDGE = {
    "hotel": {
        "20": {
            "name": "Hobsons House",
            "reviews": {"9": {"sentences": {"4": "The bathrooms were spotless."}}},
            "faqs": {"0": {"question": "Is there wifi?", "answer": "Yes, free wifi."}},
        }
    }
}
LOGS, LABELS = DSTC11_LOGS, DSTC11_LABELS


def _dstc_dir(tmp_path, labels=LABELS):
    d = tmp_path / "dstc"
    write(d / "knowledge.json", json.dumps(KNOWLEDGE))
    write(d / "val" / "logs.json", json.dumps(LOGS))
    write(d / "val" / "labels.json", json.dumps(labels))
    return d


def test_dstc11_snippets_sessions_and_examples(tmp_path):
    data = load_dstc11(_dstc_dir(tmp_path))
    assert data.snippets["hotel:20:review:9:4"].title == "Hobsons House"
    assert data.snippets["hotel:20:faq:0"].text == "Is there wifi? Yes, free wifi."
    a, b = data.sessions
    assert a.metadata["conversation"] == b.metadata["conversation"]  # one dialogue, one side
    (ex,) = dstc11_examples(data.sessions, data.snippets)  # the first seeks no knowledge
    assert ex.id == "val-1" and [p.id for p in ex.positives] == ["hotel:20:review:9:4"]
    assert ex.target == "Guests found the bathrooms spotless."
    with pytest.raises(DataFormatError, match=r"labels.json.*one label per context"):
        load_dstc11(_dstc_dir(tmp_path / "x", LABELS[:1]))


# ----------------------------------------------------------------------------- synthetic


CORPUS = [
    Passage(
        f"p{i}", f"{w} " * 3 + "this passage explains things in enough words to be sampled " * 2
    )
    for i, w in enumerate(["volcano lava", "penguin ice", "violin bow", "glacier valley", "comet"])
]


def _fake_generate(calls):
    def generate(chats):
        calls.append(len(chats))
        out = []
        for chat in chats:
            words = chat[-1]["content"].split()
            # the passage about comets gets an off-topic question: the BM25 filter drops it
            out.append(
                "Question: what is a rainbow?"
                if words[0] == "comet"
                else f"what is {words[0]} {words[1]}?"
            )
        return out

    return generate


def test_synthetic_pairs_are_filtered_cached_and_deterministic(tmp_path):
    pytest.importorskip("bm25s")
    from chatretriever.retrieval.training_data.synthetic import SyntheticConfig, synthetic_examples

    config = SyntheticConfig(n=10, top_k=1, min_words=5, batch_size=2)
    cache, calls = tmp_path / "q.jsonl", []
    first = synthetic_examples(CORPUS, _fake_generate(calls), config, cache, show_progress=False)
    assert sorted(e.id for e in first) == [
        "synthetic-p0",
        "synthetic-p1",
        "synthetic-p2",
        "synthetic-p3",
    ]
    ex = next(e for e in first if e.id == "synthetic-p0")
    assert ex.messages[0].content == "what is volcano lava?" and ex.positives[0].id == "p0"
    assert ex.metadata["bm25_rank"] == 1 and ex.source == "synthetic"
    assert sum(calls) == 5 and len(cache.read_text().splitlines()) == 5
    again = synthetic_examples(CORPUS, _fake_generate(calls), config, cache, show_progress=False)
    assert again == first and sum(calls) == 5  # all from the cache: no generator call
    two = synthetic_examples(CORPUS, _fake_generate([]), SyntheticConfig(n=2, top_k=1, min_words=5))
    assert [e.id for e in two] == [e.id for e in first[:2]]  # a smaller n is a prefix
    other = SyntheticConfig(n=10, top_k=1, min_words=5, model="another-llm")
    synthetic_examples(CORPUS, _fake_generate(calls), other, cache, show_progress=False)
    assert sum(calls) == 10  # another model: its own cache keys


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def fake_teacher():
    register_encoder("fake", lambda rest: HashEncoder(dim=128, name=rest or "fake-hash"))
    yield
    unregister_encoder("fake")


def test_cli_builds_ikat_with_teacher_scores_and_records_them(tmp_path, fake_teacher):
    pytest.importorskip("bm25s")
    out = tmp_path / "ikat.jsonl"
    args = ["build-train", "ikat", str(_ikat_dir(tmp_path)), "--splits", "train"]
    assert main([*args, "--out", str(out), "--negatives", "0", "--teacher", "fake:t"]) == 0
    (ex,) = read_training_examples(out)
    assert ex.teacher.query == "rewrite" and ex.teacher.model.startswith("t@")
    assert len(ex.teacher.positives) == 1 and ex.teacher.negatives == ()
    meta = json.loads((tmp_path / "ikat.jsonl.meta.json").read_text())
    assert meta["teacher"] == ex.teacher.model and meta["positives"] == "passages"


def test_cli_synthetic_needs_one_corpus(tmp_path, capsys):
    assert (
        main(["build-train", "synthetic", "a.jsonl", "b.jsonl", "--out", str(tmp_path / "o")]) == 2
    )
    assert "one directory or corpus" in capsys.readouterr().err


def test_source_caps_keep_a_stable_hash_sample_across_files():
    from chatretriever.io.training import TrainingExample, TrainingPassage
    from chatretriever.modeling.recipe_data import DataSettings, cap_sources
    from chatretriever.types import Turn

    def ex(i, source):
        return TrainingExample(
            f"{source}{i}", (Turn("user", "q"),), (TrainingPassage("p"),), source=source
        )

    parts = [([ex(i, "topiocqa") for i in range(6)], 1), ([ex(i, "mtrag") for i in range(3)], 10)]
    parts.append(([ex(i, "topiocqa") for i in range(6, 10)], 2))
    capped = cap_sources(parts, {"topiocqa": 4})
    assert [len(e) for e, _ in capped][1] == 3 and [r for _, r in capped] == [1, 10, 2]
    kept = [e.id for examples, _ in capped for e in examples if e.source == "topiocqa"]
    assert len(kept) == 4
    assert set(kept) >= {
        e.id for es, _ in cap_sources(parts, {"topiocqa": 2}) for e in es if e.source == "topiocqa"
    }
    assert kept != [f"topiocqa{i}" for i in range(4)]  # a hash sample, not the first four
    with pytest.raises(ValueError, match="data.caps.topiocqa"):
        DataSettings(files=[{"path": "x"}], caps={"topiocqa": 0})


def test_dstc11_negatives_about_the_positives_entity_are_dropped():
    from chatretriever.io.training import TrainingExample, TrainingPassage
    from chatretriever.retrieval.training_data.builders import drop_same_entity_negatives
    from chatretriever.types import Turn

    negs = [
        "hotel:20:review:1:0",
        "hotel:2:faq:3",
        "hotel:20:faq:0",
        "restaurant:20:faq:1",
        "hotel:7:faq:0",
    ]
    ex = TrainingExample(
        "x",
        (Turn("user", "clean rooms?"),),
        (TrainingPassage("spotless", "hotel:20:review:9:4"),),
        tuple(TrainingPassage(f"text {n}", n) for n in negs),
    )
    (out,) = drop_same_entity_negatives([ex], 2)
    assert [p.id for p in out.negatives] == ["hotel:2:faq:3", "restaurant:20:faq:1"]


def test_batched_generation_equals_one_chat_at_a_time(tiny_llama_dir, monkeypatch):
    from chatretriever.modeling import backbones
    from chatretriever.retrieval.training_data.synthetic import hf_batch_generator

    model, tokenizer = backbones.load_backbone(str(tiny_llama_dir), kind="causal")
    # the random model's favourite tokens are special or blank: ban them so replies have text
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()]
    model.generation_config.suppress_tokens = sorted({*tokenizer.all_special_ids, *blank})
    monkeypatch.setattr(backbones, "load_backbone", lambda name, kind: (model, tokenizer))
    chats = [
        [{"role": "user", "content": "what is a volcano?"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me more"}],
        [{"role": "user", "content": "which one is cheaper and what about the second one?"}],
    ]
    batched = hf_batch_generator("tiny", max_new_tokens=6, device="cpu")(chats)
    alone = [backbones.generate_reply(model, tokenizer, c, max_new_tokens=6) for c in chats]
    assert batched == alone and all(batched)  # left padding changes no reply


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("What is the legal definition of remand?", True),
        ("What is the answer to this question?", False),  # about the prompt
        ("This passage explains home equity loans.", False),  # not a question
        ("Why?", False),  # too short
        ("What " + "very " * 40 + "long?", False),
    ],
)
def test_plausible_question(reply, ok):
    from chatretriever.retrieval.training_data.synthetic import plausible_question

    assert plausible_question(reply) is ok


def test_cli_sample_keeps_what_a_recipe_cap_keeps_and_scores_only_those(tmp_path, fake_teacher):
    pytest.importorskip("bm25s")
    from chatretriever.modeling.recipe_data import cap_sources

    topics = [
        {
            "number": f"{t}-1",
            "title": "Universities",
            "ptkb": {},
            "turns": [
                {
                    "turn_id": i,
                    "utterance": f"question {t} {i}",
                    "resolved_utterance": f"question {t} {i}",
                    "response": "an answer",
                    "ptkb_provenance": [],
                    "response_provenance": ["cw-1:2"],
                }
                for i in (1, 2, 3)
            ],
        }
        for t in (1, 2, 3)
    ]
    ikat = _ikat_dir(tmp_path, topics)
    base = ["build-train", "ikat", str(ikat), "--splits", "train", "--negatives", "0"]
    full, sampled = tmp_path / "full.jsonl", tmp_path / "sampled.jsonl"
    assert main([*base, "--out", str(full)]) == 0
    assert main([*base, "--out", str(sampled), "--sample", "4", "--teacher", "fake:t"]) == 0
    everything = read_training_examples(full)
    kept = read_training_examples(sampled)
    assert len(everything) == 9 and len(kept) == 4
    ((capped, _),) = cap_sources([(everything, 1)], {"ikat": 4})
    assert [e.id for e in kept] == [e.id for e in capped]  # same examples, same order
    assert all(e.teacher is not None for e in kept)
    meta = json.loads((tmp_path / "sampled.jsonl.meta.json").read_text())
    assert meta["sample"] == {"n": 4, "seed": 0} and meta["examples"] == 4
    assert main([*base, "--out", str(sampled), "--sample", "0"]) == 2

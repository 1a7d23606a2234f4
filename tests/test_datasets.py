"""Public dataset loaders on small inline fixtures shaped like the real files, then (slow) on the
real files in ../shared/data with counts checked against its README."""

from __future__ import annotations

import json

import pytest
from fixtures import jsonl, write

from chatretriever.errors import DataFormatError
from chatretriever.io.cast import load_cast, read_cast_rewrites, read_cast_topics
from chatretriever.io.cast_txt import looks_like_cast_txt, read_cast_topics_txt
from chatretriever.io.esconv import (
    dialog_sessions,
    dialogs_sessions,
    iter_multiesc,
    iter_strategy_tsv,
    normalize_strategy,
    read_esconv,
)
from chatretriever.io.mtrag import domain_of, iter_mtrag_corpus, iter_mtrag_tasks, load_mtrag
from chatretriever.io.reclm import item_text, load_reclm, read_reclm_items, read_reclm_sequences
from chatretriever.io.topiocqa import read_topiocqa
from chatretriever.types import Qrel, Turn


def check_error(exc_info, path, line, field):
    err = exc_info.value
    assert err.path == str(path)
    assert (err.line, err.field) == (line, field), str(err)


# --- MTRAG -------------------------------------------------------------------------------------


def mtrag_task(conv: str, turn: int, collection: str, question: str = "and the second?"):
    return {
        "conversation_id": conv,
        "task_id": f"{conv}<::>{turn}",
        "task_type": "rag",
        "turn": str(turn),
        "dataset": "MT-RAG 2.0",
        "contexts": [{"document_id": f"{conv}-doc", "text": "\npassage", "title": "T"}],
        "input": [
            {"speaker": "user", "text": "what is x?", "metadata": {"author_type": "human"}},
            {"speaker": "agent", "text": "x is y.", "metadata": {"author_type": "model"}},
            {"speaker": "user", "text": question, "metadata": {}},
        ],
        "targets": [{"speaker": "agent", "text": f"answer {conv}", "metadata": {}}],
        "answerability": ["ANSWERABLE"],
        "Question Type": ["Factoid", "Comparative"],
        "Multi-Turn": ["Follow-up"],
        "Collection": collection,
    }


@pytest.fixture
def mtrag_root(tmp_path):
    root = tmp_path / "mtrag"
    tasks = [
        mtrag_task("c1", 3, "clapnq"),
        mtrag_task("c2", 5, "ibmcloud"),
        mtrag_task("c3", 2, "govt"),
    ]
    write(root / "mtrag-un" / "reference.jsonl", jsonl(tasks))
    header = "query-id\tcorpus-id\tscore\n"
    write(root / "mtrag-un" / "qrels" / "clapnq.tsv", header + "c1<::>3\tc1-doc\t1\n")
    write(root / "mtrag-un" / "qrels" / "cloud.tsv", header + "c2<::>5\tc2-doc\t1\nc2<::>5\tz\t1\n")
    corpus = [
        {"_id": "c1-doc", "title": "A", "text": "a", "domain": "clapnq"},
        {"_id": "c2-doc", "title": "", "text": "b", "domain": "cloud"},
        {"_id": "z", "title": "", "text": "c", "domain": "cloud"},
        {"_id": "g", "title": "", "text": "d", "domain": "govt"},
    ]
    write(root / "corpus.jsonl.gz", jsonl(corpus))
    return root


def test_mtrag_sessions_qrels_and_corpus(mtrag_root):
    data = load_mtrag(mtrag_root, check_corpus=True)
    assert [s.id for s in data.sessions] == ["c1<::>3", "c2<::>5", "c3<::>2"]
    s = data.sessions[1]
    assert [t.role for t in s.turns] == ["user", "assistant", "user"]
    assert s.question == "and the second?" and s.response == "answer c2"
    assert s.metadata["domain"] == "cloud" and s.metadata["collection"] == "ibmcloud"
    assert s.metadata["turn"] == 5 and s.metadata["conversation_id"] == "c2"
    assert s.metadata["answerability"] == "ANSWERABLE"
    assert s.metadata["question_type"] == ["Factoid", "Comparative"]
    assert s.metadata["context_ids"] == ["c2-doc"]
    assert data.qrels == [
        Qrel("c1<::>3", "c1-doc", 1),
        Qrel("c2<::>5", "c2-doc", 1),
        Qrel("c2<::>5", "z", 1),
    ]  # govt has no qrels file: skipped
    assert data.corpus_path == mtrag_root / "corpus.jsonl.gz"


def test_mtrag_domain_subset(mtrag_root):
    data = load_mtrag(mtrag_root / "mtrag-un", domains=["cloud"])
    assert [s.id for s in data.sessions] == ["c2<::>5"]
    assert {q.query_id for q in data.qrels} == {"c2<::>5"}
    ids = [p.id for p in iter_mtrag_corpus(mtrag_root / "corpus.jsonl.gz", ["cloud", "govt"])]
    assert ids == ["c2-doc", "z", "g"]
    with pytest.raises(ValueError, match="unknown MTRAG domain"):
        load_mtrag(mtrag_root, domains=["wiki"])


def test_domain_of():
    assert [domain_of(c) for c in ("clapnq", "ibmcloud", "fiqa", "govt", "mt-rag-govt-elser")] == [
        "clapnq",
        "cloud",
        "fiqa",
        "govt",
        "govt",
    ]
    assert domain_of("wikipedia") is None


def test_mtrag_release_variants_read_the_same(tmp_path):
    # MTRAG's README documents `collection`, an integer `turn` and the labels in the question's
    # `enrichments`; the files use `Collection`, a string turn and top-level labels
    task = mtrag_task("c1", 2, "mt-rag-fiqa-beir-elser-512-100-20240501")
    variant = {k: v for k, v in task.items() if k not in ("Collection", "answerability")}
    labels = {k: variant.pop(k) for k in ("Question Type", "Multi-Turn")}
    question = {**variant["input"][-1], "enrichments": {**labels, "answerability": ["PARTIAL"]}}
    variant.update(collection=task["Collection"], turn=2, input=[*variant["input"][:-1], question])
    path = write(
        tmp_path / "reference.jsonl",
        jsonl([task, {**variant, "conversation_id": "c2", "task_id": "c2<::>2"}]),
    )
    a, b = iter_mtrag_tasks(path)
    assert b.metadata["domain"] == a.metadata["domain"] == "fiqa" and b.metadata["turn"] == 2
    assert b.metadata["question_type"] == ["Factoid", "Comparative"]
    assert b.metadata["multi_turn"] == ["Follow-up"] and b.metadata["answerability"] == "PARTIAL"
    assert b.turns == a.turns and b.response == "answer c1"
    variant.pop("collection")
    with pytest.raises(DataFormatError, match="missing field") as e:
        list(iter_mtrag_tasks(write(tmp_path / "r2.jsonl", jsonl([variant]))))
    check_error(e, tmp_path / "r2.jsonl", 1, "Collection")


@pytest.mark.parametrize(
    "change, field, match",
    [
        (lambda t: t.pop("conversation_id"), "conversation_id", "missing field"),
        (lambda t: t.update(task_id="c9<::>3"), "task_id", "got 'c9<::>3'"),
        (lambda t: t["input"][1].update(speaker="bot"), "input[1]", "speaker"),
        (lambda t: t["input"][1].update(speaker=["user"]), "input[1]", "speaker"),
        (lambda t: t["input"].pop(), "input", "last message"),
        (lambda t: t["input"][0].pop("text"), "input[0].text", "text must be a string"),
        (lambda t: t.update(Collection="wiki"), "Collection", "no known domain"),
        (lambda t: t.update(targets=[{"speaker": "agent"}]), "targets[0]", "with a text"),
        (lambda t: t.update(contexts=[{"text": "x"}]), "contexts[0]", "document_id"),
    ],
)
def test_mtrag_bad_task(tmp_path, change, field, match):
    bad = mtrag_task("c2", 1, "fiqa")
    change(bad)
    path = write(tmp_path / "reference.jsonl", jsonl([mtrag_task("c1", 1, "fiqa"), bad]))
    with pytest.raises(DataFormatError, match=match) as e:
        list(iter_mtrag_tasks(path))
    check_error(e, path, 2, field)


def test_mtrag_bad_files(mtrag_root, tmp_path):
    ref = mtrag_root / "mtrag-un" / "reference.jsonl"
    rows = ref.read_text().splitlines()
    write(ref, "\n".join([rows[0], rows[0]]) + "\n")
    with pytest.raises(DataFormatError, match="duplicate id") as e:
        load_mtrag(mtrag_root)
    check_error(e, ref, 2, "task_id")
    write(ref, rows[0] + "\n" + rows[1][:40] + "\n")
    with pytest.raises(DataFormatError, match="malformed JSON") as e:
        load_mtrag(mtrag_root)
    check_error(e, ref, 2, None)


def test_mtrag_qrels_must_name_tasks_and_passages(mtrag_root):
    cloud = mtrag_root / "mtrag-un" / "qrels" / "cloud.tsv"
    write(cloud, "query-id\tcorpus-id\tscore\nc2<::>5\tc2-doc\t1\nc2<::>6\tz\t1\n")
    with pytest.raises(DataFormatError, match="names no known query") as e:
        load_mtrag(mtrag_root)
    check_error(e, cloud, 3, "query_id")
    write(cloud, "query-id\tcorpus-id\tscore\nc2<::>5\tmissing\t1\n")
    assert len(load_mtrag(mtrag_root).qrels) == 2  # passages checked only on request
    with pytest.raises(DataFormatError, match="names no document") as e:
        load_mtrag(mtrag_root, check_corpus=True)
    check_error(e, cloud, 2, "doc_id")


def test_mtrag_corpus_needs_a_domain(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        jsonl([{"_id": "a", "text": "t", "domain": "fiqa"}, {"_id": "b", "text": "t"}]),
    )
    with pytest.raises(DataFormatError, match="expected one of") as e:
        list(iter_mtrag_corpus(path))
    check_error(e, path, 2, "domain")
    with pytest.raises(DataFormatError, match="no reference.jsonl"):
        load_mtrag(tmp_path)


# --- TREC CAsT ---------------------------------------------------------------------------------

CAST_2019 = [
    {
        "number": 31,
        "title": "head and neck cancer",
        "description": "compare cancers",
        "turn": [
            {"number": 1, "raw_utterance": "What is throat cancer?"},
            {"number": 2, "raw_utterance": "Is it treatable? "},
        ],
    },
    {
        "number": 32,
        "title": "sharks",
        "description": "sharks",
        "turn": [{"number": 1, "raw_utterance": "What are sharks?"}],
    },
]
CAST_2020_MANUAL = [
    {
        "number": 81,
        "turn": [
            {
                "number": 1,
                "raw_utterance": "How do you repair my garage door opener?",
                "manual_rewritten_utterance": "How do you repair my garage door opener?",
                "automatic_rewritten_utterance": "How do you repair my garage door opener?",
                "manual_canonical_result_id": "MARCO_1",
            },
            {
                "number": 2,
                "raw_utterance": "Now it stopped working. Why?",
                "manual_rewritten_utterance": "Now my garage door opener stopped working. Why?",
                "automatic_rewritten_utterance": "Why did garage door opener stop working?",
                "manual_canonical_result_id": "MARCO_2",
            },
        ],
    },
]
CAST_2020_AUTO = [
    {
        "number": 81,
        "turn": [
            {
                "number": 1,
                "raw_utterance": "How do you repair my garage door opener?",
                "automatic_rewritten_utterance": "How do you repair my garage door opener?",
                "automatic_canonical_result_id": "MARCO_9",
            },
            {
                "number": 2,
                "raw_utterance": "Now it stopped working. Why?",
                "automatic_rewritten_utterance": "Why did garage door opener stop working?",
                "automatic_canonical_result_id": "MARCO_8",
            },
        ],
    },
]
CAST_2021 = [
    {
        "number": 106,
        "turn": [
            {
                "number": 1,
                "raw_utterance": "I had a biopsy. What are the common types?",
                "passage": "Ductal carcinoma is the most common type.",
                "manual_rewritten_utterance": "What are the common types of breast cancer?",
                "canonical_result_id": "MARCO_D1",
                "passage_id": 1,
                "automatic_rewritten_utterance": "What are the common types of cancer?",
            },
            {
                "number": 2,
                "raw_utterance": "How likely is it to spread?",
                "passage": "It rarely spreads.",
                "manual_rewritten_utterance": "How likely is ductal carcinoma to spread?",
                "canonical_result_id": "MARCO_D2",
                "passage_id": 2,
                "automatic_rewritten_utterance": "How likely is cancer to spread?",
            },
        ],
    },
]
_T1 = {
    "number": "1-1",
    "utterance": "What was COP26 about?",
    "manual_rewritten_utterance": "What was COP26 about?",
    "response": "A climate summit.",
    "provenance": ["MARCO_26_1-1"],
}
CAST_2022 = [
    {
        "number": 132,
        "turn": [
            _T1,
            {
                "number": "1-3",
                "utterance": "What are its effects?",
                "manual_rewritten_utterance": "What are the effects of COP26?",
                "response": "Pledges.",
                "provenance": ["MARCO_1"],
            },
        ],
    },
    {
        "number": 132,
        "turn": [  # another branch of the same tree: 1-1 repeats
            _T1,
            {
                "number": "2-1",
                "utterance": "Who attended it?",
                "manual_rewritten_utterance": "Who attended COP26?",
            },
        ],
    },
]


@pytest.fixture
def cast_root(tmp_path):
    root = tmp_path / "trec-cast"
    d19 = root / "2019" / "data"
    write(d19 / "evaluation" / "evaluation_topics_v1.0.json", json.dumps(CAST_2019, indent=2))
    write(
        d19 / "evaluation" / "evaluation_topics_annotated_resolved_v1.0.tsv",
        "31_1\tWhat is throat cancer?\n31_2\tIs throat cancer treatable?\n32_1\tWhat are sharks?\n",
    )
    write(d19 / "2019qrels.txt", "31_1 Q0 CAR_a 0\n31_1 Q0 CAR_b 2\n31_2 Q0 MARCO_3 4\n")
    write(d19 / "training" / "train_topics_v1.0.json", json.dumps(CAST_2019[1:]))
    write(d19 / "training" / "train_topics_mod.qrel", "32_1 0 MARCO_1 2\n32_1 0 MARCO_1 2\n")
    write(root / "2020" / "2020_manual_evaluation_topics_v1.0.json", json.dumps(CAST_2020_MANUAL))
    write(root / "2020" / "2020_automatic_evaluation_topics_v1.0.json", json.dumps(CAST_2020_AUTO))
    write(root / "2020" / "2020qrels.txt", "81_1 0 CAR_x 1\n81_2 0 MARCO_y 3\n")
    write(root / "2021" / "2021_manual_evaluation_topics_v1.0.json", json.dumps(CAST_2021))
    write(root / "2021" / "trec-cast-qrels-docs.2021.qrel", "106_2 0 KILT_1 2\n")
    write(
        root / "2022" / "2022_evaluation_topics_flattened_duplicated_v1.0.json",
        json.dumps(CAST_2022),
    )
    write(root / "2022" / "cast2022.qrel", "")
    return root


def test_cast_2019_raw_history_and_tsv_rewrites(cast_root):
    data = load_cast(cast_root, 2019)
    assert [s.id for s in data.sessions] == ["31_1", "31_2", "32_1"]
    s = data.sessions[1]
    assert [t.content for t in s.turns] == ["What is throat cancer?", "Is it treatable?"]
    assert {t.role for t in s.turns} == {"user"} and s.response is None
    assert s.rewrite == "Is throat cancer treatable?"
    assert s.metadata["topic"] == "31" and s.metadata["turn"] == "2"
    assert s.metadata["title"] == "head and neck cancer"
    assert data.qrels[1] == Qrel("31_1", "CAR_b", 2) and data.qrels[2].relevance == 4
    train = load_cast(cast_root / "2019", 2019, split="train")
    assert [s.id for s in train.sessions] == ["32_1"] and train.sessions[0].rewrite is None
    assert train.qrels == [Qrel("32_1", "MARCO_1", 2)]  # the repeated line is kept once


def test_cast_2020_manual_and_automatic(cast_root):
    data = load_cast(cast_root, 2020)
    s = data.sessions[1]
    assert s.id == "81_2" and len(s.turns) == 2 and s.turns[0].role == "user"
    assert s.rewrite == "Now my garage door opener stopped working. Why?"
    assert s.metadata["automatic_rewrite"] == "Why did garage door opener stop working?"
    assert s.metadata["manual_canonical_result_id"] == "MARCO_2"
    assert s.metadata["automatic_canonical_result_id"] == "MARCO_8"
    assert len(data.qrels) == 2


def test_cast_2021_responses_are_assistant_turns(cast_root):
    data = load_cast(cast_root, 2021)
    s = data.sessions[1]
    assert s.messages() == [
        {"role": "user", "content": "I had a biopsy. What are the common types?"},
        {"role": "assistant", "content": "Ductal carcinoma is the most common type."},
        {"role": "user", "content": "How likely is it to spread?"},
    ]
    assert s.response == "It rarely spreads." and s.metadata["canonical_result_id"] == "MARCO_D2"
    assert s.metadata["automatic_rewrite"] == "How likely is cancer to spread?"


def test_cast_2022_flattened_branches_kept_once(cast_root):
    data = load_cast(cast_root, 2022)
    assert [s.id for s in data.sessions] == ["132_1-1", "132_1-3", "132_2-1"]
    assert data.qrels == []
    branch = data.sessions[2]
    assert [t.role for t in branch.turns] == ["user", "assistant", "user"]
    assert branch.turns[1].content == "A climate summit." and branch.response is None
    assert data.sessions[1].metadata["provenance"] == ["MARCO_1"]


def test_cast_conflicting_repeat_raises(tmp_path):
    topics = json.loads(json.dumps(CAST_2022))
    topics[1]["turn"][0]["manual_rewritten_utterance"] = "something else"
    path = write(tmp_path / "t.json", json.dumps(topics))
    with pytest.raises(DataFormatError, match="repeats with another conversation") as e:
        read_cast_topics(path)
    check_error(e, path, None, "[1].turn[0]")


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda t: t[0]["turn"][1].pop("raw_utterance"), "[0].turn[1].raw_utterance"),
        (lambda t: t[0]["turn"][1].update(raw_utterance=3), "[0].turn[1].raw_utterance"),
        (lambda t: t[0]["turn"][0].pop("number"), "[0].turn[0].number"),
        (lambda t: t[1].pop("turn"), "[1]"),
        (lambda t: t[1].update(number=None), "[1].number"),
    ],
)
def test_cast_bad_topics(tmp_path, change, field):
    topics = json.loads(json.dumps(CAST_2019))
    change(topics)
    path = write(tmp_path / "t.json", json.dumps(topics))
    with pytest.raises(DataFormatError) as e:
        read_cast_topics(path)
    check_error(e, path, None, field)


def test_cast_bad_rewrites_and_qrels(cast_root):
    tsv = cast_root / "2019/data/evaluation/evaluation_topics_annotated_resolved_v1.0.tsv"
    write(tsv, "31_1\tWhat is throat cancer?\n99_1\tStray\n")
    with pytest.raises(DataFormatError, match="names no turn") as e:
        load_cast(cast_root, 2019)
    check_error(e, tsv, 2, "id")
    write(tsv, "31_1\tWhat is throat cancer?\n31_2 no tab\n")
    with pytest.raises(DataFormatError, match="2 tab-separated") as e:
        read_cast_rewrites(tsv)
    check_error(e, tsv, 2, None)
    qrels = cast_root / "2020" / "2020qrels.txt"
    write(qrels, "81_1 0 CAR_x 1\n81_9 0 CAR_x 1\n")
    with pytest.raises(DataFormatError, match="names no known query") as e:
        load_cast(cast_root, 2020)
    check_error(e, qrels, 2, "query_id")
    with pytest.raises(ValueError, match="no CAsT topics"):
        load_cast(cast_root, 2023)


# --- TopiOCQA ----------------------------------------------------------------------------------


def topiocqa_turn(conv: int, turn: int, context: list[str]):
    return {
        "Context": context,
        "Conversation_no": conv,
        "Turn_no": turn,
        "Question": f"question {conv}.{turn}",
        "is_nq": turn == 1,
        "Answer": f"answer {conv}.{turn}",
        "Topic": "Force",
        "Topic_section": "Introduction",
    }


TOPIOCQA = [
    topiocqa_turn(1, 1, []),
    topiocqa_turn(1, 2, ["question 1.1", "answer 1.1"]),
    topiocqa_turn(2, 1, []),
]


def test_topiocqa_sessions(tmp_path):
    path = write(tmp_path / "topiocqa_dev.json.gz", json.dumps(TOPIOCQA, indent=4))
    sessions = read_topiocqa(path)
    assert [s.id for s in sessions] == ["1_1", "1_2", "2_1"]
    s = sessions[1]
    assert s.messages() == [
        {"role": "user", "content": "question 1.1"},
        {"role": "assistant", "content": "answer 1.1"},
        {"role": "user", "content": "question 1.2"},
    ]
    assert s.response == "answer 1.2"
    assert s.metadata == {
        "conversation": 1,
        "turn": 2,
        "is_nq": False,
        "topic": "Force",
        "topic_section": "Introduction",
    }


@pytest.mark.parametrize(
    "change, field, match",
    [
        (lambda t: t.pop("Answer"), "[1].Answer", "missing field"),
        (lambda t: t.update(Turn_no="2"), "[1].Turn_no", "expected int"),
        (lambda t: t.update(Context=["only a question"]), "[1].Context", "alternating"),
        (lambda t: t.update(Turn_no=1), "[1].Turn_no", "duplicate id"),
    ],
)
def test_topiocqa_bad_input(tmp_path, change, field, match):
    rows = json.loads(json.dumps(TOPIOCQA))
    change(rows[1])
    path = write(tmp_path / "t.json", json.dumps(rows))
    with pytest.raises(DataFormatError, match=match) as e:
        read_topiocqa(path)
    check_error(e, path, None, field)


# --- ESConv / MultiESC -------------------------------------------------------------------------

ESCONV = [
    {
        "experience_type": "Current Experience",
        "emotion_type": "anxiety",
        "problem_type": "job crisis",
        "situation": "I lost my job.",
        "survey_score": {"seeker": {"empathy": "5"}, "supporter": {}},
        "dialog": [
            {"speaker": "listener", "annotation": {"strategy": "Questions"}, "content": "Hi!\n"},
            {"speaker": "speaker", "annotation": {}, "content": "Hello\n"},
            {"speaker": "speaker", "annotation": {"feedback": "4"}, "content": "I lost my job.\n"},
            {
                "speaker": "listener",
                "annotation": {"strategy": "Reflection of feelings"},
                "content": "That sounds hard.",
            },
            {
                "speaker": "listener",
                "annotation": {"strategy": "Questions"},
                "content": "What happened?",
            },
            {"speaker": "speaker", "annotation": {}, "content": "They closed the office."},
            {
                "speaker": "listener",
                "annotation": {"strategy": "Providing Suggestions"},
                "content": "Maybe update your resume.",
            },
        ],
    },
    {
        "emotion_type": "sadness",
        "problem_type": "breakup",
        "situation": "s",
        "dialog": [
            {"speaker": "seeker", "annotation": {}, "content": "I feel sad."},
            {"speaker": "supporter", "annotation": {"strategy": "Other"}, "content": "I hear you."},
        ],
    },
]


def test_esconv_dialogs_and_sessions(tmp_path):
    path = write(tmp_path / "ESConv.json", json.dumps(ESCONV, indent=1))
    dialogs = read_esconv(path)
    d = dialogs[0]
    assert (d.id, d.emotion, d.problem, d.situation) == (
        "0",
        "anxiety",
        "job crisis",
        "I lost my job.",
    )
    assert [t.role for t in d.turns] == [
        "assistant",
        "user",
        "user",
        "assistant",
        "assistant",
        "user",
        "assistant",
    ]
    assert d.turns[1].content == "Hello"  # trailing newline stripped
    assert d.strategies == (
        "Questions",
        None,
        None,
        "Reflection of feelings",
        "Questions",
        None,
        "Providing Suggestions",
    )
    assert d.supporter_turns == 4 and d.metadata["experience_type"] == "Current Experience"
    sessions = dialog_sessions(d)
    # the greeting before any seeker turn has nothing to answer: no session
    assert [s.id for s in sessions] == ["0_3", "0_4", "0_6"]
    second = sessions[1]
    assert second.question == "I lost my job." and second.response == "What happened?"
    assert second.metadata["strategy"] == "Questions"
    assert second.metadata["supporter_prefix"] == ["That sounds hard."]
    assert sessions[2].turns[-2] == Turn("assistant", "What happened?")
    assert [s.id for s in dialogs_sessions(dialogs)] == ["0_3", "0_4", "0_6", "1_1"]


def test_normalize_strategy():
    assert normalize_strategy("Questions") == "Question"
    assert normalize_strategy("[Other]") == "Others"
    assert normalize_strategy("Direct Guidance") == "Providing Suggestions"
    assert normalize_strategy("Greeting") == "Greeting"


def test_multiesc_lines(tmp_path):
    rows = [
        {
            "emotion_type": "depression",
            "problem_type": "academic pressure",
            "situation": "s",
            "init_intensity": 4,
            "final_intensity": 2,
            "dialog": [
                {
                    "text": "Hi , how can I help ?",
                    "speaker": "sys",
                    "strategy": "Greeting",
                    "all_strategy": ["Greeting"],
                },
                {"text": "I failed .", "speaker": "usr", "vad": [0.1, 0.2, 0.3], "feedback": None},
                {
                    "text": "That is hard .",
                    "speaker": "sys",
                    "strategy": "Reflection of feelings",
                    "all_strategy": ["Reflection of feelings"],
                },
            ],
        },
    ]
    path = write(tmp_path / "multiesc_valid.txt", jsonl(rows * 2))
    dialogs = list(iter_multiesc(path))
    assert [d.id for d in dialogs] == ["0", "1"]
    assert dialogs[0].strategies == ("Greeting", None, "Reflection of feelings")
    assert dialogs[0].metadata == {"init_intensity": 4, "final_intensity": 2}
    sessions = dialog_sessions(dialogs[1])
    assert len(sessions) == 1 and sessions[0].response == "That is hard ."
    assert [t.role for t in sessions[0].turns] == ["assistant", "user"]


def test_esconv_bad_input(tmp_path):
    bad = json.loads(json.dumps(ESCONV))
    bad[1]["dialog"][1]["speaker"] = "bot"
    path = write(tmp_path / "e.json", json.dumps(bad))
    with pytest.raises(DataFormatError, match="speaker must be") as e:
        read_esconv(path)
    check_error(e, path, None, "[1].dialog[1].speaker")
    bad[1]["dialog"][1]["speaker"] = ["supporter"]
    write(path, json.dumps(bad))
    with pytest.raises(DataFormatError, match="speaker must be"):
        read_esconv(path)
    bad[1]["dialog"][1] = {"speaker": "supporter", "annotation": {}}
    write(path, json.dumps(bad))
    with pytest.raises(DataFormatError) as e:
        read_esconv(path)
    check_error(e, path, None, "[1].dialog[1].content")
    ok = {"dialog": [{"text": "hi", "speaker": "usr"}]}
    lines = write(tmp_path / "m.txt", jsonl([ok]) + '{"dialog": [{"speaker": "usr"}]}\n')
    with pytest.raises(DataFormatError) as e:
        list(iter_multiesc(lines))
    check_error(e, lines, 2, "dialog[0].text")
    write(lines, jsonl([ok]) + '{"dialog": []}\n')
    with pytest.raises(DataFormatError, match="non-empty") as e:
        list(iter_multiesc(lines))
    check_error(e, lines, 2, "dialog")


STRATEGY_TSV = (
    "1.0 0 0 Hello, can we talk about the pandemic?  EOS 1.0 1 1 [Other] Hello \n"
    "0.0 1 1 [Other] Hello  EOS 0.0 1 2 [Questions] How has it affected you?\n"
    "0.0 0 0 I feel stressed.  EOS 0.0 1 1 [Self-disclosure] Me too.  EOS 0.0 1 2 "
    "[Affirmation and Reassurance] It is natural.\n"
)


def test_strategy_tsv(tmp_path):
    path = write(tmp_path / "devWithStrategy_short.tsv", STRATEGY_TSV)
    sessions = list(iter_strategy_tsv(path))
    assert [s.id for s in sessions] == ["1", "3"]  # line 2 has no seeker turn in its context
    assert sessions[0].question == "Hello, can we talk about the pandemic?"
    assert (sessions[0].response, sessions[0].metadata["strategy"]) == ("Hello", "Other")
    assert sessions[1].metadata == {
        "strategy": "Affirmation and Reassurance",
        "supporter_prefix": ["Me too."],
    }
    write(path, STRATEGY_TSV + "0.0 0 0 hi EOS garbage\n")
    with pytest.raises(DataFormatError) as e:
        list(iter_strategy_tsv(path))
    check_error(e, path, 4, "utterance[1]")
    write(path, "0.0 1 0 [Other] hi EOS 0.0 0 1 a seeker ends it\n")
    with pytest.raises(DataFormatError, match="supporter turn") as e:
        list(iter_strategy_tsv(path))
    check_error(e, path, 1, "utterance[1]")


# --- RecLM-emb ---------------------------------------------------------------------------------

ITEMS = [
    {
        "item_id": "761140",
        "title": "Lost Summoner Kitty",
        "tags": ["Strategy", "Indie"],
        "genres": ["Casual"],
        "game_details": ["Single-player"],
        "developer": "Kotoshiro",
        "publisher": None,
        "price": 4.99,
        "release_date": "2018-01-04",
        "sentiment": None,
        "early_access": False,
    },
    {
        "item_id": "643980",
        "title": "Ironbound",
        "tags": [],
        "genres": ["RPG"],
        "game_details": [],
        "developer": None,
        "publisher": "Making Fun, Inc.",
        "price": "Free To Play",
        "release_date": None,
        "sentiment": "Mostly Positive",
        "early_access": True,
    },
    {
        "item_id": "670290",
        "title": "Real Pool 3D",
        "tags": ["Sports"],
        "genres": [],
        "game_details": [],
        "developer": "Poolians.com",
        "publisher": "Poolians.com",
        "price": 0.0,
        "release_date": "2017-07-24",
        "sentiment": None,
        "early_access": False,
    },
]


@pytest.fixture
def steam_root(tmp_path):
    root = tmp_path / "steam"
    write(root / "metadata.jsonl.gz", jsonl(ITEMS))
    write(root / "sequential_data.txt", "1 1 3 2\n2 3 1\n")
    return root


def test_reclm_items_and_histories(steam_root):
    data = load_reclm(steam_root)
    assert [p.id for p in data.items] == ["1", "2", "3"]
    first = data.items[0]
    assert first.title == "Lost Summoner Kitty" and first.metadata["item_id"] == "761140"
    assert first.text == (
        "Title: Lost Summoner Kitty\nTags: Strategy, Indie\nGenres: Casual\n"
        "Game details: Single-player\nDeveloper: Kotoshiro\nPrice: 4.99\n"
        "Release date: 2018-01-04\nEarly access: no"
    )
    assert "Early access: yes" in data.items[1].text and "Tags" not in data.items[1].text
    assert [(h.user_id, h.items) for h in data.histories] == [
        ("1", ("1", "3", "2")),
        ("2", ("3", "1")),
    ]
    assert item_text({"title": "x", "description": " y "}) == "Title: x\nDescription: y"


def test_reclm_bad_input(steam_root, tmp_path):
    seq = steam_root / "sequential_data.txt"
    write(seq, "1 1 3 2\n2 3 4\n")
    with pytest.raises(DataFormatError, match="names no item") as e:
        load_reclm(steam_root)
    check_error(e, seq, 2, "item[2]")
    for text, line, field, match in [
        ("1 1\n2 x\n", 2, "item[1]", "1-based item row"),
        ("1 1\n2 0\n", 2, "item[1]", "1-based item row"),
        ("1 1\n1 2\n", 2, "user_id", "duplicate id"),
        ("1 1\n2\n", 2, None, "at least one item"),
    ]:
        write(seq, text)
        with pytest.raises(DataFormatError, match=match) as e:
            read_reclm_sequences(seq)
        check_error(e, seq, line, field)
    items = tmp_path / "items.jsonl"
    for rows, line, field, match in [
        ([ITEMS[0], ITEMS[0]], 2, "item_id", "duplicate id"),
        ([ITEMS[0], {"item_id": "9"}], 2, "title", "missing field"),
    ]:
        write(items, jsonl(rows))
        with pytest.raises(DataFormatError, match=match) as e:
            read_reclm_items(items)
        check_error(e, items, line, field)
    write(items, json.dumps(ITEMS[0]) + "\n\n" + json.dumps(ITEMS[1]) + "\n")
    with pytest.raises(DataFormatError, match="blank line") as e:
        read_reclm_items(items)  # ids are row numbers: a gap would shift them
    check_error(e, items, 3, None)


# --- the real files (slow) ---------------------------------------------------------------------


@pytest.mark.slow
def test_real_mtrag(shared_data):
    data = load_mtrag(shared_data / "mtrag", check_corpus=True)
    assert len(data.sessions) == 507
    assert len(data.qrels) == 851 and len({q.query_id for q in data.qrels}) == 332
    assert all(s.metadata["domain"] in ("clapnq", "cloud", "fiqa", "govt") for s in data.sessions)
    assert all(s.response for s in data.sessions)
    domains = {}
    for p in iter_mtrag_corpus(data.corpus_path):
        domains[p.metadata["domain"]] = domains.get(p.metadata["domain"], 0) + 1
    assert sum(domains.values()) == 38_104 and set(domains) == {"clapnq", "cloud", "fiqa", "govt"}


@pytest.mark.slow
def test_real_cast(shared_data):
    root = shared_data / "trec-cast"
    expected = {2019: (479, 173), 2020: (216, 208), 2021: (239, 158), 2022: (205, 0)}
    for year, (turns, judged) in expected.items():
        data = load_cast(root, year)
        assert len(data.sessions) == turns
        assert len({q.query_id for q in data.qrels}) == judged
        assert all(s.rewrite for s in data.sessions)  # 2019 via the resolved TSV
    assert len(load_cast(root, 2019, "train").sessions) == 269
    responses = load_cast(root, 2021).sessions
    assert all(s.response for s in responses) and responses[1].turns[1].role == "assistant"


@pytest.mark.slow
def test_real_topiocqa(shared_data):
    for split, conversations, turns in [("dev", 205, 2_514), ("train", 3_509, 45_450)]:
        sessions = read_topiocqa(shared_data / "topiocqa" / f"topiocqa_{split}.json.gz")
        assert len(sessions) == turns
        assert len({s.metadata["conversation"] for s in sessions}) == conversations


@pytest.mark.slow
def test_real_esconv(shared_data):
    esconv = read_esconv(shared_data / "esconv" / "FailedESConv.json")
    assert len(esconv) == 196
    assert sum(d.supporter_turns for d in esconv) == 2_377
    labels = {normalize_strategy(s) for d in esconv for s in d.strategies if s}
    assert len(labels) == 8 and sum(1 for d in esconv for s in d.strategies if s) == 2_377
    multiesc = list(iter_multiesc(shared_data / "esconv" / "multiesc_valid.txt"))
    assert len(multiesc) == 195 and sum(d.supporter_turns for d in multiesc) == 2_257
    official = json.loads((shared_data / "esconv" / "multiesc_strategy.json").read_text())
    assert {s for d in multiesc for s in d.strategies if s} == {s.strip("[]") for s in official}
    assert len(list(iter_strategy_tsv(shared_data / "esconv" / "devWithStrategy_short.tsv"))) > 2900


@pytest.mark.slow
def test_real_steam(shared_data):
    data = load_reclm(shared_data / "steam")
    assert len(data.items) == 32_131 and len(data.histories) == 6_684
    assert min(len(h.items) for h in data.histories) >= 3


# --- TREC CAsT: 2019 resolved TSV beside the topics, 2022 trees, 2019 plain text ---------------

RESOLVED_2019 = "31_1\tWhat is throat cancer?\n31_2\tIs throat cancer treatable?\n32_1\tSharks?\n"


def test_cast_2019_topics_take_the_resolved_tsv_beside_them(tmp_path, caplog):
    topics = write(tmp_path / "eval" / "evaluation_topics_v1.0.json", json.dumps(CAST_2019))
    assert all(s.rewrite is None for s in read_cast_topics(topics))  # no TSV yet
    tsv = write(tmp_path / "eval" / "evaluation_topics_annotated_resolved_v1.0.tsv", RESOLVED_2019)
    write(tmp_path / "eval" / "old_resolved.tsv", "31_1\tWhat is throat cancer?\n")  # covers less
    write(tmp_path / "eval" / "train_sample_resolved.tsv", "1_1\tWhat is a PA?\n")  # other turns
    write(tmp_path / "eval" / "broken_resolved.tsv", "31_1 no tab\n")  # skipped with a warning
    with caplog.at_level("INFO", logger="chatretriever.io.cast"):
        sessions = read_cast_topics(topics)
    assert [s.id for s in sessions] == ["31_1", "31_2", "32_1"]
    assert [s.rewrite for s in sessions] == [
        "What is throat cancer?",
        "Is throat cancer treatable?",
        "Sharks?",
    ]
    assert sessions[1].question == "Is it treatable?"  # the raw utterance stays the question
    assert f"3 of 3 turns from {tsv}" in caplog.text and "broken_resolved.tsv" in caplog.text
    # a TSV never replaces rewrites the topics carry themselves (2020-2022)
    topics = write(
        tmp_path / "2021" / "2021_manual_evaluation_topics_v1.0.json", json.dumps(CAST_2021)
    )
    write(tmp_path / "2021" / "x_resolved.tsv", "106_1\tother\n106_2\tother\n")
    sessions = read_cast_topics(topics)
    assert [s.rewrite for s in sessions] == [
        t["manual_rewritten_utterance"] for t in CAST_2021[0]["turn"]
    ]
    assert sessions[1].metadata["automatic_rewrite"] == "How likely is cancer to spread?"


def _user_turn(number, parent, utterance, rewrite):
    return _tree_turn(
        number, parent, "User", utterance=utterance, manual_rewritten_utterance=rewrite
    )


def _tree_turn(number, parent, participant, **fields):
    turn = {"number": number, "participant": participant, **fields}
    return turn if parent is None else {**turn, "parent": parent}


CAST_2022_TREE = [
    {
        "number": 132,
        "turn": [
            _user_turn("1-1", None, "What was COP26?", "What was COP26?"),
            _tree_turn("1-2", "1-1", "System", response="A summit.", provenance=["M_1"]),
            _user_turn("1-3", "1-2", "Its effects?", "COP26 effects?"),
            _tree_turn("1-4", "1-3", "System", response="Pledges.", provenance=["M_2"]),
            _user_turn("2-1", "1-2", "Who came?", "Who came to COP26?"),
            _tree_turn("2-2", "1-1", "System", response="Which COP26?", provenance=[]),
            _user_turn("3-1", "2-2", "The 2021 one.", "COP26 2021"),
        ],
    }
]


def test_cast_2022_tree_one_session_per_user_turn(tmp_path):
    path = write(tmp_path / "2022_evaluation_topics_tree_v1.0.json", json.dumps(CAST_2022_TREE))
    sessions = {s.id: s for s in read_cast_topics(path)}
    assert list(sessions) == ["132_1-1", "132_1-3", "132_2-1", "132_3-1"]
    branch = sessions["132_2-1"]  # continues 1-2, not 1-3: its history is its parent chain
    assert [(t.role, t.content) for t in branch.turns] == [
        ("user", "What was COP26?"),
        ("assistant", "A summit."),
        ("user", "Who came?"),
    ]
    assert branch.rewrite == "Who came to COP26?" and branch.response is None
    assert branch.metadata == {"topic": "132", "turn": "2-1", "parent": "1-2"}
    first = sessions["132_1-1"]  # two System replies: the first in the file is the response
    assert first.response == "A summit." and first.metadata["provenance"] == ["M_1"]
    assert sessions["132_1-3"].response == "Pledges."
    assert [t.content for t in sessions["132_3-1"].history] == ["What was COP26?", "Which COP26?"]
    auto = json.loads(json.dumps(CAST_2022_TREE))
    for turn in auto[0]["turn"]:
        if "manual_rewritten_utterance" in turn:
            turn["automatic_rewritten_utterance"] = turn.pop("manual_rewritten_utterance")
    path = write(tmp_path / "2022_automatic_evaluation_topics_tree_v1.0.json", json.dumps(auto))
    s = read_cast_topics(path)[2]
    assert s.rewrite is None and s.metadata["automatic_rewrite"] == "Who came to COP26?"


@pytest.mark.parametrize(
    "change, field, match",
    [
        (lambda t: t[2].update(parent="9-9"), "[0].turn[2].parent", "names no turn"),
        (lambda t: t[0].update(parent="1-3"), "[0].turn[1].parent", "loops"),
        (lambda t: t[1].update(participant="Bot"), "[0].turn[1].participant", "'User' or 'System'"),
        (lambda t: t[1].pop("response"), "[0].turn[1].response", "missing"),
        (lambda t: t[2].pop("utterance"), "[0].turn[2].utterance", "missing"),
        (lambda t: t[4].update(number="1-3"), "[0].turn[4].number", "duplicate turn"),
        (lambda t: t[2].update(parent=[1]), "[0].turn[2].parent", "expected a turn number"),
    ],
)
def test_cast_2022_tree_bad_input(tmp_path, change, field, match):
    topics = json.loads(json.dumps(CAST_2022_TREE))
    change(topics[0]["turn"])
    path = write(tmp_path / "tree.json", json.dumps(topics))
    with pytest.raises(DataFormatError, match=match) as e:
        read_cast_topics(path)
    check_error(e, path, None, field)


CAST_2019_TXT = (
    "Number: 31\n"
    "Title: head and neck cancer\n"
    "Description: compare cancers   \n"
    "1\tWhat is throat cancer?\n"
    "2 \tIs it treatable? \n"  # the real file has a space before one tab
    "\n"
    "-----\n"
    "Number: 32\r\n"
    "Title: sharks\r\n"
    "Description: sharks\r\n"
    "1\tWhat are sharks?\r\n"
)


def test_cast_2019_plain_text_topics_read_as_the_json(tmp_path):
    path = write(tmp_path / "evaluation_topics_v1.0.txt", CAST_2019_TXT)
    json_path = write(tmp_path / "json" / "evaluation_topics_v1.0.json", json.dumps(CAST_2019))
    sessions = read_cast_topics_txt(path)
    assert sessions == read_cast_topics(json_path)
    assert [s.id for s in sessions] == ["31_1", "31_2", "32_1"]
    assert [t.content for t in sessions[1].turns] == ["What is throat cancer?", "Is it treatable?"]
    assert sessions[1].metadata == {
        "topic": "31",
        "turn": "2",
        "title": "head and neck cancer",
        "description": "compare cancers",
    }
    write(tmp_path / "evaluation_topics_annotated_resolved_v1.0.tsv", RESOLVED_2019)
    assert [s.rewrite for s in read_cast_topics_txt(path)][1] == "Is throat cancer treatable?"


def test_looks_like_cast_txt():
    assert looks_like_cast_txt(CAST_2019_TXT) and looks_like_cast_txt("\ufeffNumber: 1\n")
    assert looks_like_cast_txt("\nNumber: 31\n1\tWhat is throat cancer?\n")
    assert not looks_like_cast_txt(RESOLVED_2019)
    assert not looks_like_cast_txt("31_1 Q0 CAR_a 0\n")
    assert not looks_like_cast_txt('[{"number": 31, "turn": []}]')
    assert not looks_like_cast_txt("Number: 31\nsomething else\n")
    assert not looks_like_cast_txt("")


@pytest.mark.parametrize(
    "text, line, field, match",
    [
        ("1\tWhat?\n", 1, None, "before any 'Number:'"),
        ("Title: t\nNumber: 1\n1\tWhat?\n", 1, "Title", "before any 'Number:'"),
        ("Number: 1\n1\tWhat?\nWhat next?\n", 3, None, "expected 'Number:'"),
        ("Number: 1\n1\tWhat?\n1\tAgain?\n", 3, "turn", "duplicate turn"),
        ("Number: 1\n1\t  \n", 2, "utterance", "empty utterance"),
        ("Number: 1\nTitle: a\n\nNumber: 2\n1\tWhat?\n", 1, "Number", "has no turns"),
        ("Number: 1\n1\tWhat?\nNumber: 1\n1\tWhat?\n", 3, "Number", "duplicate topic"),
        ("Number: 1 2\n1\tWhat?\n", 1, "Number", "whitespace"),
        ("Number: 1\nTitle: a\nTitle: b\n1\tWhat?\n", 3, "Title", "a second Title"),
        ("\n\n", None, None, "no topics"),
    ],
)
def test_cast_2019_plain_text_bad_input(tmp_path, text, line, field, match):
    path = write(tmp_path / "topics.txt", text)
    with pytest.raises(DataFormatError, match=match) as e:
        read_cast_topics_txt(path)
    check_error(e, path, line, field)

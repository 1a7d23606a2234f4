"""Hidden-rationale retrieval: ESConv tasks, the binary-choice prompt, KV reuse, the reranker."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from chatretriever.errors import DataFormatError
from chatretriever.methods.rationale import tasks
from chatretriever.methods.rationale.prompts import WORDINGS, BinaryChoicePrompt, ChoiceWording
from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
from chatretriever.methods.rationale.scoring import (
    cached_option_logits,
    option_logits,
    prefix_kv,
    relevance_scores,
)
from chatretriever.types import Run, Session, Turn

SHIPPED_SPLIT = tasks.SHIPPED_SPLIT
REPO = Path(__file__).parents[1]

FAILED = [
    {
        "situation": "lost my job",
        "emotion_type": "sadness",
        "problem_type": "job crisis",
        "dialog": [
            {"speaker": "seeker", "content": "I lost my job.", "annotation": {}},
            {"speaker": "supporter", "content": "Why?", "annotation": {"strategy": "Questions"}},
            {"speaker": "seeker", "content": "Budget cuts.", "annotation": {}},
            {"speaker": "supporter", "content": "Try a recruiter.",
             "annotation": {"strategy": "Direct Guidance"}},
            {"speaker": "supporter", "content": "Here is a site.",
             "annotation": {"strategy": "Information"}},
        ],
    }
]  # fmt: skip
MULTI = [
    {"dialog": [{"text": "Hello", "speaker": "sys", "strategy": "Greeting"},
                {"text": "I am sad.", "speaker": "usr"},
                {"text": "You feel down.", "speaker": "sys",
                 "strategy": "Reflection of feelings"}]},
    {"dialog": [{"text": "My dog died.", "speaker": "usr"},
                {"text": "I lost a pet too.", "speaker": "sys", "strategy": "Self-disclosure"}]},
    {"dialog": [{"text": "Exams soon.", "speaker": "usr"},
                {"text": "Make a plan.", "speaker": "sys",
                 "strategy": "Providing Suggestions or Information"}]},
]  # fmt: skip


@pytest.fixture
def esconv_dir(tmp_path):
    (tmp_path / "FailedESConv.json").write_text(json.dumps(FAILED))
    (tmp_path / "multiesc_valid.txt").write_text("\n".join(json.dumps(d) for d in MULTI) + "\n")
    split = {
        "data_dir": "unused",
        "train": {"FailedESConv.json": "all", "multiesc_valid.txt": [0]},
        "eval": {"multiesc_valid.txt": [1, 2]},
    }
    (tmp_path / "split.json").write_text(json.dumps(split))
    return tmp_path


def test_strategy_labels_map_to_the_multiesc_set():
    assert tasks.strategy_doc_id("Questions") == "question"
    assert tasks.strategy_doc_id("[Information]") == "suggestions"
    assert tasks.strategy_doc_id("Providing Suggestions") == "suggestions"
    assert tasks.strategy_doc_id("Other") == "others"
    with pytest.raises(ValueError, match="unknown strategy"):
        tasks.strategy_doc_id("Sarcasm")
    passages = tasks.strategy_passages()
    assert len(passages) == 8 and len({p.id for p in passages}) == 8
    assert all(p.title and p.text.endswith(".") for p in passages)


def test_split_tasks_and_qrels(esconv_dir):
    split = tasks.load_split(esconv_dir / "split.json", esconv_dir)
    train = tasks.task_sessions(tasks.split_dialogs(split, "train"))
    evals = tasks.task_sessions(tasks.split_dialogs(split, "eval"), with_situation=True)
    # FailedESConv: "Why?" (after turn 0) and the two-message reply after turn 2 (the second
    # message's session carries the first in supporter_prefix); MultiESC 0: the greeting before
    # any seeker turn is skipped.
    assert [s.id for s in train] == ["failed-0_1", "failed-0_3", "failed-0_4", "multiesc-0_2"]
    assert [s.metadata["strategy_id"] for s in train] == [
        "question", "suggestions", "suggestions", "reflection",
    ]  # fmt: skip
    assert train[2].metadata["supporter_prefix"] == ["Try a recruiter."]
    assert [s.id for s in evals] == ["multiesc-1_1", "multiesc-2_1"]
    assert all(s.metadata["show_situation"] for s in evals)
    qrels = tasks.strategy_qrels(evals)
    assert [(q.query_id, q.doc_id, q.relevance) for q in qrels] == [
        ("multiesc-1_1", "self-disclosure", 1),
        ("multiesc-2_1", "suggestions", 1),
    ]
    assert [(q.query_id, q.doc_id) for q in tasks.response_qrels(evals)] == [
        ("multiesc-1_1", "multiesc-1_1-r"),
        ("multiesc-2_1", "multiesc-2_1-r"),
    ]
    paths = tasks.write_task(esconv_dir / "out", tasks.strategy_passages(), evals, qrels)
    assert paths["qrels"].read_text().splitlines()[0] == "multiesc-1_1 0 self-disclosure 1"


def test_split_rejects_overlap_and_unknown_files(esconv_dir):
    bad = {"train": {"multiesc_valid.txt": [0, 1]}, "eval": {"multiesc_valid.txt": [1]}}
    (esconv_dir / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataFormatError, match="both train and eval"):
        tasks.load_split(esconv_dir / "bad.json", esconv_dir)
    bad = {"train": {"ESConv.json": "all"}, "eval": {}}
    (esconv_dir / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataFormatError, match="train.ESConv.json"):
        tasks.load_split(esconv_dir / "bad.json", esconv_dir)


def test_class_prior_and_own_dialog_filter(esconv_dir):
    split = tasks.load_split(esconv_dir / "split.json", esconv_dir)
    train = tasks.task_sessions(tasks.split_dialogs(split, "train"))
    evals = tasks.task_sessions(tasks.split_dialogs(split, "eval"))
    prior = tasks.class_prior_run(train, evals)
    assert prior.scores["multiesc-1_1"]["suggestions"] == pytest.approx(2 / 4)
    assert prior.scores["multiesc-1_1"]["greeting"] == 0.0
    assert [d.doc_id for d in prior.ranked("multiesc-2_1")][:3] == [
        "suggestions", "question", "reflection",
    ]  # fmt: skip
    both = train + evals
    docs = tasks.response_passages(both)
    run = Run({"failed-0_3": {d.id: 1.0 for d in docs}})
    kept = tasks.restrict_to_other_dialogs(run, both, docs).scores["failed-0_3"]
    # its own gold stays; the other turns of dialog failed-0 go
    assert sorted(kept) == ["failed-0_3-r", "multiesc-0_2-r", "multiesc-1_1-r", "multiesc-2_1-r"]


def test_shipped_esconv_split_is_the_documented_shuffle(monkeypatch):
    monkeypatch.chdir(REPO)  # its data_dir is the project's layout, seen from the checkout's root
    split = tasks.load_split(SHIPPED_SPLIT)  # reads the JSON only: no data needed
    assert split.data_dir.resolve() == (SHARED_DATA / "esconv").resolve()
    assert set(split.parts["train"]) == {"FailedESConv.json", "multiesc_valid.txt"}
    assert set(split.parts["eval"]) == {"multiesc_valid.txt"}
    assert split.parts["train"]["FailedESConv.json"] is None  # every dialog: training only
    # Its description: MultiESC's 195 dialogs shuffled with random.Random(16), the first 95
    # to training (the rest, 100, to evaluation).
    ids = list(range(195))
    random.Random(16).shuffle(ids)
    assert split.parts["train"]["multiesc_valid.txt"] == frozenset(ids[:95])
    assert split.parts["eval"]["multiesc_valid.txt"] == frozenset(ids[95:])


def test_split_data_dir_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    split_file = tmp_path / "conf" / "split.json"
    split_file.parent.mkdir()
    split_file.write_text(json.dumps({"data_dir": "data/esconv", "train": {}, "eval": {}}))
    monkeypatch.chdir(tmp_path)
    assert tasks.load_split(split_file).data_dir == Path("data/esconv")
    # not found: the error names the directory, where it was looked for, and the remedy
    found = r"data/esconv \(resolved: .*\) not found.*--data-dir"
    with pytest.raises(FileNotFoundError, match=found):
        tasks.split_dialogs(tasks.load_split(split_file), "train")
    assert tasks.load_split(split_file, tmp_path / "x").data_dir == tmp_path / "x"  # the override
    split_file.write_text(json.dumps({"train": {}, "eval": {}}))  # no data_dir and none given
    with pytest.raises(DataFormatError, match="data_dir.*--data-dir"):
        tasks.load_split(split_file)
    assert tasks.load_split(split_file, "d").data_dir == Path("d")


def test_real_esconv_split_sizes(shared_data, monkeypatch):
    monkeypatch.chdir(REPO)
    split = tasks.load_split(SHIPPED_SPLIT)
    evals = tasks.task_sessions(tasks.split_dialogs(split, "eval"))
    train = tasks.task_sessions(tasks.split_dialogs(split, "train"))
    assert len(evals) == 1101 and len(train) == 3350
    assert not {s.metadata["dialog"] for s in evals} & {s.metadata["dialog"] for s in train}


# ------------------------------------------------------------------------------ the prompt
SESSIONS = [
    Session("a", (Turn("user", "what is the capital?"),)),
    Session(
        "b",
        (Turn("user", "hi"), Turn("assistant", "hello there"), Turn("user", "tell me more")),
        metadata={"supporter_prefix": ["one more thing"], "situation": "sad", "show_situation": 1},
    ),
]
DOCS = ["the quick brown fox", "paris is the capital of france, said the second document"]


def test_prompt_layout_document_first(tokenizer):
    p = BinaryChoicePrompt(tokenizer, "ab")
    text = tokenizer.decode(p.document_ids([DOCS[0]])[0] + p.query_ids([SESSIONS[1]])[0])
    expected = (
        "<|im_start|>user\nHere is a reply strategy for an emotional-support conversation.\n"
        "Strategy: the quick brown fox\n\nHere is the conversation so far:\n"
        "(Seeker's situation: sad)\nSeeker: hi\nSupporter: hello there\nSeeker: tell me more\n"
        "Supporter: one more thing\n\nCan the supporter reply to the seeker's last message with "
        "this strategy?\nA. Yes\nB. No\nAnswer with A or B only.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected
    tf = BinaryChoicePrompt(tokenizer, "tf")
    text = tokenizer.decode(tf.document_ids(["D"])[0] + tf.query_ids([SESSIONS[0]])[0])
    assert text.startswith("<|im_start|>user\ndocument: D\nquery: User: what is the capital?\n")
    assert tokenizer.convert_ids_to_tokens(list(tf.option_ids)) == ["T", "F"]
    assert tokenizer.convert_ids_to_tokens(list(p.option_ids)) == ["A", "B"]
    assert p.answer_ids([True, False]) == list(p.option_ids)


def test_prompt_truncation_and_control_tokens_stay_text(tokenizer):
    p = BinaryChoicePrompt(tokenizer, "ab", max_document_tokens=3, max_query_tokens=4)
    full = BinaryChoicePrompt(tokenizer, "ab")
    doc = full.document_ids(["a typed <|im_end|> stays text"])[0]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_id not in doc
    assert p.document_ids([DOCS[1]])[0] == full.document_ids([DOCS[1]])[0][: len(p._before) + 3]
    short, long_ = p.query_ids([SESSIONS[1]])[0], full.query_ids([SESSIONS[1]])[0]
    tail = len(p._after)
    assert short[-tail - 4 :] == long_[-tail - 4 :]  # the most recent tokens are kept
    assert len(short) == len(p._middle) + 4 + tail


def test_option_must_be_one_token(tokenizer):
    wording = ChoiceWording("x", "d: ", " q: ", " ?", yes="definitely", no="B")
    with pytest.raises(ValueError, match="'definitely'.*exactly one"):
        BinaryChoicePrompt(tokenizer, wording)
    assert set(WORDINGS) == {"ab", "tf"}


# ------------------------------------------------------------------------------ KV reuse
@pytest.fixture(params=["llama", "qwen2"])
def tiny_reranker(request, tiny_llama_dir, tiny_qwen2_dir):
    path = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    return BinaryChoiceReranker.from_pretrained(path, batch_size=3, device="cpu")


def test_kv_reuse_equals_full_prompts(tiny_reranker):
    r = tiny_reranker
    p, pad = r.prompt, r.pad_id
    prefixes, suffixes = p.document_ids(DOCS), p.query_ids(SESSIONS)
    full = [d + q for d in prefixes for q in suffixes]  # different lengths: padding matters
    with torch.inference_mode():
        batched = option_logits(r.model, full, p.option_ids, pad)  # (4, 2)
        alone = torch.cat([option_logits(r.model, [s], p.option_ids, pad) for s in full])
    kv = [prefix_kv(r.model, d) for d in prefixes]
    broadcast = torch.cat(
        [cached_option_logits(r.model, [c, c], suffixes, p.option_ids, pad) for c in kv]
    )
    stacked = cached_option_logits(
        r.model, [kv[0], kv[0], kv[1], kv[1]], suffixes * 2, p.option_ids, pad
    )
    assert batched.dtype == torch.float32 and batched.shape == (4, 2)
    for other in (alone, broadcast, stacked):
        torch.testing.assert_close(other, batched, atol=1e-4, rtol=0)
    # the reranker's two paths agree too, and the cache is not consumed by use
    with_kv = r.score_matrix(DOCS, SESSIONS, reuse_kv=True)
    without = r.score_matrix(DOCS, SESSIONS, reuse_kv=False)
    np.testing.assert_allclose(with_kv, without, atol=1e-4)
    np.testing.assert_allclose(with_kv.T.reshape(-1), relevance_scores(batched).numpy(), atol=1e-4)
    again = cached_option_logits(r.model, [kv[0]], suffixes[:1], p.option_ids, pad)
    torch.testing.assert_close(again, batched[:1], atol=1e-4, rtol=0)


def test_relevance_score_is_log_softmax_over_two_options():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    expected = torch.tensor([2.0 - np.log(np.exp(2.0) + 1.0), np.log(0.5)], dtype=torch.float32)
    torch.testing.assert_close(relevance_scores(logits), expected)


def test_rerank_keeps_top_k_and_agrees_without_reuse(tiny_llama_dir):
    r = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, batch_size=2, device="cpu")
    docs = {"d1": DOCS[0], "d2": DOCS[1], "d3": "a third one"}
    run = Run({"a": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "b": {"d3": 5.0, "d1": 1.0}}, "bm25")
    out = r.rerank(run, docs, SESSIONS, k=2)
    assert out.name == "bm25.rahore"
    assert set(out.scores["a"]) == {"d1", "d2"} and set(out.scores["b"]) == {"d1", "d3"}
    plain = r.rerank(run, docs, SESSIONS, k=2, reuse_kv=False)
    for q in out.scores:
        for d, v in out.scores[q].items():
            assert v == pytest.approx(plain.scores[q][d], abs=1e-4)
            assert v <= 0.0
    with pytest.raises(ValueError, match="not in the corpus"):
        r.rerank(run, {"d1": "x"}, SESSIONS, k=2)
    with pytest.raises(ValueError, match="no session"):
        r.rerank(run, docs, SESSIONS[:1], k=2)

"""Robustness evaluation (paper 4.3): both loops on a fake LLM and the fake encoder, the cache."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
from fakes import HashEncoder

from chatretriever.io.sessions import read_sessions
from chatretriever.retrieval.robustness.conversations import group_conversations
from chatretriever.retrieval.robustness.evaluation import evaluate_robustness
from chatretriever.retrieval.robustness.full import full_modification
from chatretriever.retrieval.robustness.generation import RobustnessLLM, batched
from chatretriever.retrieval.robustness.partial import judge_check, partial_modification
from chatretriever.retrieval.robustness.prompts import (
    JUDGE_OPTIONS,
    RobustnessPrompts,
    parse_context,
    parse_verdict,
)
from chatretriever.types import Passage, Qrel, Run, Session, Turn

pytest.importorskip("ir_measures")

PASSAGES = {
    "p-garage": "garage door opener repair costs between 100 and 300 dollars",
    "p-opener": "a new garage door opener costs 150 to 500 dollars",
    "p-nba": "lebron james scored 40000 points in the nba and was drafted by cleveland",
    "p-jordan": "michael jordan played for the chicago bulls",
    "p-paris": "paris is the capital of france with the eiffel tower",
}
CONTEXT_REPLY = (
    "Query1: What does a garage door opener cost?\nResponse1: About 150 to 500 dollars.\n"
    "Query2: What breaks in openers?\nResponse2: The motor or the sensors."
)


class FakeLLM:
    """A BatchGenerator answering each prompt kind; records every (prompt, seed) it is asked."""

    def __init__(self, verdict: str = "reasonable", bad_contexts: int = 0) -> None:
        self.verdict = verdict
        self.bad_contexts = bad_contexts  # this many context replies are malformed first
        self.calls: list[tuple[str, int]] = []
        self.batches = 0
        self.caps: list[int | None] = []

    def __call__(
        self, prompts: Sequence[list[dict[str, str]]], seeds: Sequence[int], cap: int | None = None
    ) -> list[str]:
        self.batches += 1
        self.caps.append(cap)
        out = []
        for messages, seed in zip(prompts, seeds, strict=True):
            user = messages[-1]["content"]
            self.calls.append((user, seed))
            if "reasonable or unreasonable" in user:
                out.append(self.verdict)
            elif "Synthetic Conversation Context" in user:
                if self.bad_contexts > 0:
                    self.bad_contexts -= 1
                    out.append("Query1: only one turn")
                else:
                    out.append(CONTEXT_REPLY.replace("opener", f"opener (seed {seed})"))
            elif "Retrieved Passages" in user:
                out.append(f"Answer from {user.count('[')} passages.")
            else:  # the rewrite prompt of rewrite.py
                q = user.split("User: ")[-1].split("\n")[0]
                out.append(f"{q} about LeBron James")
        return out


def conversation_sessions() -> list[Session]:
    """Two conversations: c1 has three turns (turns 2 and 3 evaluated), c2 one turn."""
    t = [
        Turn("user", "Who scored 40000 points in the NBA?"),
        Turn("assistant", "LeBron James."),
        Turn("user", "Which team drafted him?"),
        Turn("assistant", "Cleveland."),
        Turn("user", "And where did Jordan play?"),
    ]
    return [
        Session("c1<::>2", tuple(t[:3])),
        Session("c1<::>3", tuple(t), rewrite="Where did Michael Jordan play?"),
        Session("c2<::>1", (Turn("user", "How much is garage door opener repair?"),)),
    ]


QRELS = [
    Qrel("c1<::>2", "p-nba", 1),
    Qrel("c1<::>3", "p-jordan", 1),
    Qrel("c2<::>1", "p-garage", 1),
]


def hash_retrieve(encoder: HashEncoder, k: int = 3):
    ids = list(PASSAGES)
    emb = encoder.encode_passages([Passage(i, PASSAGES[i]) for i in ids])  # (N, D)
    calls: list[list[str]] = []

    def retrieve(sessions: Sequence[Session]) -> Run:
        calls.append([s.id for s in sessions])
        q = encoder.encode_sessions(list(sessions))  # (Q, D)
        scores = q @ emb.T  # (Q, N)
        out = {}
        for s, row in zip(sessions, scores, strict=True):
            top = np.argsort(-row, kind="stable")[:k]
            out[s.id] = {ids[i]: float(row[i]) for i in top}
        return Run(out)

    retrieve.calls = calls  # type: ignore[attr-defined]
    return retrieve


def test_prompts_parse_verdicts_and_contexts() -> None:
    assert parse_verdict("Unreasonable.") is False
    assert parse_verdict("The query is not reasonable") is False
    assert parse_verdict("**Reasonable**") is True
    assert parse_verdict("I think so") is None
    turns = parse_context("# Synthetic:\n" + CONTEXT_REPLY)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[3].content == "The motor or the sensors."
    assert parse_context("Query1: a\nResponse1: b") is None
    assert parse_context("") is None
    p = RobustnessPrompts()
    msgs = p.response_messages([Turn("user", "q0"), Turn("assistant", "a0")], "q1", ["x", "y"])
    assert "Query: q0\nResponse: a0" in msgs[1]["content"]
    assert "[1] x\n[2] y" in msgs[1]["content"] and "# Current Query:\nq1" in msgs[1]["content"]


def test_group_conversations_walks_every_user_turn() -> None:
    convs = group_conversations(conversation_sessions())
    assert [c.id for c in convs] == ["c1<::>3", "c2<::>1"]
    assert [s.task for s in convs[0].steps] == [False, True, True]
    assert [s.response for s in convs[0].steps[:2]] == ["LeBron James.", "Cleveland."]
    assert convs[0].steps[0].session.question == "Who scored 40000 points in the NBA?"


def test_partial_reasonable_keeps_queries_and_replaces_responses() -> None:
    fake = FakeLLM("Reasonable.")
    llm = RobustnessLLM(fake, "fake", batch_size=2)
    retrieve = hash_retrieve(HashEncoder())
    result = partial_modification(
        group_conversations(conversation_sessions()), retrieve, PASSAGES, llm
    )
    assert [s.id for s in result.sessions] == ["c1<::>2", "c1<::>3", "c2<::>1"]
    assert result.forms == {"original": 3}
    last = result.sessions[1]
    # the dataset's responses are gone: each is the LLM's answer from the top-3 passages
    assert [t.content for t in last.turns if t.role == "assistant"] == [
        "Answer from 3 passages."
    ] * 2
    assert last.question == "And where did Jordan play?"
    # one retrieval call per turn, conversations batched together
    assert retrieve.calls == [["c1<::>3#turn1", "c2<::>1"], ["c1<::>2"], ["c1<::>3"]]
    assert set(result.run.scores) == {"c1<::>2", "c1<::>3", "c2<::>1"}
    # turn 1: c1's response (c2 ends there: its last turn gets no response); turn 2: judge +
    # response; turn 3 (c1's last): the judge only
    assert fake.batches == 1 + 2 + 1
    assert sum("Retrieved Passages" in u for u, _ in fake.calls) == 2


def test_unreasonable_judge_uses_human_rewrite_else_llm_rewrite() -> None:
    fake = FakeLLM("This query is unreasonable.")
    llm = RobustnessLLM(fake, "fake")
    result = partial_modification(
        group_conversations(conversation_sessions()), hash_retrieve(HashEncoder()), PASSAGES, llm
    )
    by_id = {s.id: s for s in result.sessions}
    assert by_id["c1<::>3"].question == "Where did Michael Jordan play?"
    assert by_id["c1<::>3"].metadata["query_form"] == "human_rewrite"
    assert by_id["c1<::>2"].metadata["query_form"] == "llm_rewrite"  # no human rewrite
    assert by_id["c1<::>2"].question == "Which team drafted him? about LeBron James"
    assert by_id["c1<::>2"].metadata["original_question"] == "Which team drafted him?"
    assert by_id["c2<::>1"].metadata["query_form"] == "original"  # a first turn is not judged
    assert result.forms == {"llm_rewrite": 1, "human_rewrite": 1, "original": 1}
    assert set(fake.caps) == {16, 64, 96}  # judge, rewrite, response
    # the history carries the question that was asked
    assert by_id["c1<::>3"].turns[2].content == "Which team drafted him? about LeBron James"


def test_judge_without_verdict_is_retried_then_counted() -> None:
    fake = FakeLLM("maybe")
    llm = RobustnessLLM(fake, "fake", max_retries=2)
    result = partial_modification(
        group_conversations(conversation_sessions()), hash_retrieve(HashEncoder()), PASSAGES, llm
    )
    assert result.forms == {"original": 3}  # no verdict: the query stays
    judge_seeds = [s for u, s in fake.calls if "reasonable or unreasonable" in u]
    assert judge_seeds == [0, 1000, 2000] * 2  # two later turns, three tries each
    assert set(fake.caps) == {16, 96}  # judgments are capped at 16 new tokens, responses at 96
    assert llm.stats.failures == {"judge": 2} and llm.stats.retries == {"judge": 4}


def test_full_modification_five_contexts_per_turn_and_retries() -> None:
    sessions = conversation_sessions()
    fake = FakeLLM(bad_contexts=2)
    llm = RobustnessLLM(fake, "fake", max_retries=1)
    result = full_modification(sessions, llm)
    assert result.seeds == [0, 1, 2, 3, 4] and len(result.context_sets) == 5
    for seed, contexts in zip(result.seeds, result.context_sets, strict=True):
        assert [s.id for s in contexts] == [s.id for s in sessions]
        for s, orig in zip(contexts, sessions, strict=True):
            assert len(s.turns) == 5 and s.question == orig.question
            assert f"(seed {seed})" in s.turns[0].content or seed == 0
    assert llm.stats.retries == {"context": 2} and "context" not in llm.stats.failures
    assert llm.stats.reasons == {"not two turns": 2}
    # the standalone forms: human rewrite where there is one, else the LLM rewrite
    prompts = [u for u, _ in fake.calls if "Synthetic Conversation Context" in u]
    assert any("# Rewrite: Where did Michael Jordan play?" in u for u in prompts)
    assert [s.metadata["standalone_form"] for s in result.context_sets[0]] == [
        "llm_rewrite",
        "human_rewrite",
        "llm_rewrite",
    ]


def test_full_modification_counts_failures_and_keeps_the_original_context() -> None:
    fake = FakeLLM(bad_contexts=10**6)
    llm = RobustnessLLM(fake, "fake", max_retries=2)
    result = full_modification(conversation_sessions()[:1], llm, n_contexts=2)
    assert result.fallbacks == [1, 1] and llm.stats.failures == {"context": 2}
    s = result.context_sets[0][0]
    assert s.turns == conversation_sessions()[0].turns and s.metadata["context"] == "original"


def test_evaluate_robustness_writes_datasets_and_a_rerun_makes_no_llm_call(tmp_path) -> None:
    sessions = conversation_sessions()
    systems = {"hash": hash_retrieve(HashEncoder()), "hash-b": hash_retrieve(HashEncoder(salt="b"))}
    fake = FakeLLM("unreasonable")
    cache = tmp_path / "generations.jsonl"
    llm = RobustnessLLM(fake, "fake", cache_path=cache)
    report = evaluate_robustness(systems, sessions, QRELS, PASSAGES, llm, tmp_path, n_contexts=3)
    llm.close()
    row = report["systems"]["hash"]
    assert 0.0 <= row["original"] <= 1.0
    assert row["partial"]["diff"] == pytest.approx(abs(row["partial"]["nDCG@3"] - row["original"]))
    assert len(row["full"]["per_seed"]) == 3
    assert row["full"]["sd"] == pytest.approx(
        np.std(list(row["full"]["per_seed"].values()), ddof=1)
    )
    assert report["llm"]["model"] == "fake" and report["llm"]["generated"] == len(fake.calls)
    assert len(read_sessions(tmp_path / "full.seed2.jsonl")) == 3
    partial = read_sessions(tmp_path / "partial.hash-b.jsonl")
    assert {s.metadata["query_form"] for s in partial} == {
        "original",
        "llm_rewrite",
        "human_rewrite",
    }
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(lines) == len(fake.calls) and {r["model"] for r in lines} == {"fake"}

    again = FakeLLM("unreasonable")
    llm2 = RobustnessLLM(again, "fake", cache_path=cache)
    report2 = evaluate_robustness(systems, sessions, QRELS, PASSAGES, llm2, tmp_path, n_contexts=3)
    assert again.calls == [] and report2["llm"]["generated"] == 0
    assert report2["systems"] == {
        k: {**v, "seconds": report2["systems"][k]["seconds"]} for k, v in report["systems"].items()
    }
    # another model name is another cache key
    other = FakeLLM()
    RobustnessLLM(other, "other", cache_path=cache).generate(
        [[{"role": "user", "content": "Retrieved Passages"}]], [0]
    )
    assert len(other.calls) == 1


def test_a_plain_rewrite_generator_works_batched() -> None:
    seen = []
    llm = RobustnessLLM(batched(lambda m: seen.append(m) or "Reasonable"), "plain")
    assert llm.generate([[{"role": "user", "content": "x"}]] * 2, [0, 1]) == ["Reasonable"] * 2
    assert len(seen) == 2 and llm.generate([[{"role": "user", "content": "x"}]], [1]) == [
        "Reasonable"
    ]
    assert len(seen) == 2


class ChoosingLLM(FakeLLM):
    """A FakeLLM that also scores options (the judge then chooses, never samples) and continues
    a started reply (contexts are written slot by slot); every continuation runs on past its
    line, as a model does, so the stop string is what ends it."""

    continues_reply = True

    def __init__(self, verdict: str = "reasonable", empty_slots: int = 0) -> None:
        super().__init__(verdict)
        self.empty_slots = empty_slots
        self.scored: list[str] = []
        self.stops: list[str | None] = []

    def __call__(self, prompts, seeds, cap=None, stop=None):
        self.stops.append(stop)
        if prompts[0][-1]["role"] != "assistant":
            return super().__call__(prompts, seeds, cap)
        self.batches += 1
        out = []
        for messages, seed in zip(prompts, seeds, strict=True):
            label = messages[-1]["content"].split("\n")[-1]
            self.calls.append((label, seed))
            if self.empty_slots > 0:
                self.empty_slots -= 1
                out.append("   ")
            else:
                out.append(f" {label[:-1]} text (seed {seed})\nResponse9: runs on")
        return out

    def score(self, prompts, options):
        self.scored += [m[-1]["content"] for m in prompts]
        return [[0.0 if o == self.verdict else -1.0 for o in options] for _ in prompts]


def test_a_scoring_llm_judges_by_choice_and_caches_it(tmp_path) -> None:
    fake = ChoosingLLM("unreasonable")
    cache = tmp_path / "g.jsonl"
    llm = RobustnessLLM(fake, "fake", cache_path=cache)
    result = partial_modification(
        group_conversations(conversation_sessions()), hash_retrieve(HashEncoder()), PASSAGES, llm
    )
    assert result.forms == {"llm_rewrite": 1, "human_rewrite": 1, "original": 1}
    assert len(fake.scored) == 2 and not any("reasonable or" in u for u, _ in fake.calls)
    assert llm.stats.choices == {"judge": {"unreasonable": 2}} and llm.stats.scored == 2
    llm.close()
    again = ChoosingLLM("reasonable")  # a rerun reads the verdicts from the cache
    llm2 = RobustnessLLM(again, "fake", cache_path=cache)
    partial_modification(
        group_conversations(conversation_sessions()), hash_retrieve(HashEncoder()), PASSAGES, llm2
    )
    assert again.scored == [] and llm2.stats.choices == {"judge": {"unreasonable": 2}}
    with pytest.raises(ValueError, match="two options"):
        RobustnessLLM(FakeLLM(), "fake").choose("judge", [[]], ["a", "b"])


def test_contexts_are_written_slot_by_slot_when_the_llm_continues_a_reply() -> None:
    sessions = conversation_sessions()
    fake = ChoosingLLM(empty_slots=1)
    llm = RobustnessLLM(fake, "fake", max_retries=1)
    result = full_modification(sessions, llm, n_contexts=2)
    assert result.fallbacks == [0, 0]
    s = result.context_sets[1][0]
    # each slot is cut at the stop string: the model's run-on "Response9" line is gone
    assert [(t.role, t.content) for t in s.turns[:4]] == [
        ("user", "Query1 text (seed 1)"),
        ("assistant", "Response1 text (seed 1)"),
        ("user", "Query2 text (seed 1)"),
        ("assistant", "Response2 text (seed 1)"),
    ]
    assert s.question == sessions[0].question and s.metadata["context"] == "synthetic"
    # the slot prompt: Figure 7, then the reply written so far with the next label open
    slot_prompts = [u for u, _ in fake.calls if u.startswith(("Query", "Response"))]
    assert len(slot_prompts) == 2 * 3 * 4 + 1  # sets x sessions x slots + the one retry
    assert "\n" in fake.stops and llm.stats.retries == {"context_slot": 1}
    assert llm.stats.reasons == {"empty": 1}


def test_a_slot_empty_after_every_retry_fails_its_context() -> None:
    fake = ChoosingLLM(empty_slots=10**6)
    llm = RobustnessLLM(fake, "fake", max_retries=1)
    result = full_modification(conversation_sessions()[:1], llm, n_contexts=1)
    assert result.fallbacks == [1] and llm.stats.failures == {"context_slot": 1}
    assert result.context_sets[0][0].metadata["context"] == "original"


class ContextReadingLLM(ChoosingLLM):
    """Scores "unreasonable" higher when the history never mentions the question's last word."""

    def score(self, prompts, options):
        rows = []
        for m in prompts:
            user = m[-1]["content"]
            context = user.split("# Context:\n")[-1].split("# Next Query")[0].lower()
            last = user.split("# Next Query\n")[-1].split("\n")[0].strip("?").split()[-1].lower()
            bad = last not in context
            rows.append([-1.0 if (o == "reasonable") == bad else 0.0 for o in options])
        return rows


def test_judge_check_counts_verdicts_on_own_and_swapped_histories() -> None:
    sessions = [
        Session(f"c{i}<::>2", (Turn("user", f"tell me about {w}"), Turn("assistant", f"{w}."),
                               Turn("user", f"what else about {w}?")))
        for i, w in enumerate(["doors", "cats", "trains", "bees"])
    ] + [Session("c9<::>1", (Turn("user", "a first question"),))]  # fmt: skip
    llm = RobustnessLLM(ContextReadingLLM(), "fake")
    report = judge_check(llm, sessions, n=10)
    assert report == {"n": 4, "unreasonable_own": 0, "unreasonable_other": 4, "no_verdict": 0}
    assert llm.stats.choices == {"judge_check": {"reasonable": 4, "unreasonable": 4}}
    blind = judge_check(RobustnessLLM(FakeLLM("maybe"), "fake", max_retries=0), sessions, n=3)
    assert blind == {"n": 3, "unreasonable_own": 0, "unreasonable_other": 0, "no_verdict": 6}
    with pytest.raises(ValueError, match="two sessions"):
        judge_check(RobustnessLLM(FakeLLM(), "fake"), sessions[-1:])


def test_rewrites_are_generated_in_one_batch_then_read_from_the_cache() -> None:
    fake = FakeLLM()
    llm = RobustnessLLM(fake, "fake", batch_size=8)
    sessions = conversation_sessions()  # c1's two turns have history, c2's first turn none
    out = llm.rewrite_sessions(sessions)
    assert fake.batches == 1 and len(fake.calls) == 2  # the rewriter's own calls hit the cache
    assert out[0].rewrite == "Which team drafted him? about LeBron James"
    assert out[2].rewrite == sessions[2].question  # a first turn is its own rewrite


def test_a_choice_is_cached_per_generation_settings(tmp_path) -> None:
    cache = tmp_path / "g.jsonl"
    prompt = [[{"role": "user", "content": "Next Query\nok?"}]]
    first = ChoosingLLM("unreasonable")
    llm = RobustnessLLM(first, "fake", cache_path=cache, settings={"dtype": "bf16"})
    assert llm.choose("judge", prompt, JUDGE_OPTIONS) == [1]
    llm.close()
    same = ChoosingLLM("reasonable")
    again = RobustnessLLM(same, "fake", cache_path=cache, settings={"dtype": "bf16"})
    assert again.choose("judge", prompt, JUDGE_OPTIONS) == [1] and same.scored == []
    other = ChoosingLLM("reasonable")  # float32 weights score differently: not the same key
    fp32 = RobustnessLLM(other, "fake", cache_path=cache)
    assert fp32.choose("judge", prompt, JUDGE_OPTIONS) == [0] and len(other.scored) == 1

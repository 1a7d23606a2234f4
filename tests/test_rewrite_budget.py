"""The query rewriter's prompt budget: newest turns kept, a long question keeps its end, and the
cache keys of prompts that fit stay as they were before the budget existed."""

from __future__ import annotations

import json

import pytest

from chatretriever.retrieval.rewrite import (
    RewritePrompt,
    _key,
    build_messages,
    rewrite_sessions,
)
from chatretriever.types import Session, Turn

SHORT = Session(
    "s1",
    (
        Turn("user", "tell me about jaguars"),
        Turn("assistant", "Jaguars are big cats of the Americas."),
        Turn("user", "what do they eat?"),
    ),
)
INSTRUCTION = (
    "\n\nRewrite the user's last question so that it includes the topic from the conversation. "
    "Answer with the question only."
)


def long_chat(n: int, question: str = "and how much does the model 7 cost?") -> Session:
    """n exchanges about numbered models, each answer 240 characters, then the question."""
    turns: list[Turn] = []
    for i in range(n):
        turns += [Turn("user", f"what about model {i}?"), Turn("assistant", f"model {i} " * 30)]
    return Session("long", (*turns, Turn("user", question)))


class RecordingLLM:
    """A generator that records the messages it is given and repeats the question."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, str]]] = []

    def __call__(self, messages: list[dict[str, str]]) -> str:
        self.calls.append(messages)
        return "how much does the model 7 cost?"


def test_a_prompt_that_fits_and_its_key_are_as_before_the_budget():
    # Values computed before the budget existed: rewrite caches of benchmarks stay valid.
    assert RewritePrompt().hash == "67cdd8adebb5"
    key = "b7a9ac4be3c68e56fc89f4842b994a5a9a71a35e72351cb90bc20bfb92efd502"
    assert _key(SHORT, "smollm2-135m-instruct", RewritePrompt()) == key
    history = "User: tell me about jaguars\nAssistant: Jaguars are big cats of the Americas."
    assert build_messages(SHORT, RewritePrompt()) == [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": history + "\nUser: what do they eat?" + INSTRUCTION},
    ]
    # Another budget changes nothing for a prompt that fits it.
    assert RewritePrompt(max_prompt_chars=1000).hash == RewritePrompt().hash
    assert build_messages(SHORT, RewritePrompt(max_prompt_chars=1000)) == build_messages(
        SHORT, RewritePrompt()
    )


def test_a_long_conversation_keeps_its_newest_turns_within_the_budget():
    session = long_chat(60)
    full = build_messages(session, RewritePrompt(max_prompt_chars=10**6))[1]["content"]
    assert len(full) > RewritePrompt().max_prompt_chars  # even the default budget cuts it
    user = build_messages(session, RewritePrompt(max_prompt_chars=2000))[1]["content"]
    assert len(user) <= 2000 and user.endswith(
        "User: and how much does the model 7 cost?" + INSTRUCTION
    )
    history = user[: -len("\nUser: and how much does the model 7 cost?" + INSTRUCTION)]
    lines = full.split("\n")[:120]  # the history lines of the full prompt, oldest first
    kept = history.split("\n")
    assert kept == lines[-len(kept) :]  # a suffix: the newest turns, none skipped
    assert "model 59" in history and "model 0 " not in history
    one_more = "\n".join(lines[-len(kept) - 1 :]) + user[len(history) :]
    assert len(one_more) > 2000  # the next older turn would not have fit


def test_an_over_long_question_keeps_its_end_and_no_history():
    question = "START " + "pasted log line. " * 400 + "so what does the error mean?"
    user = build_messages(long_chat(3, question), RewritePrompt(max_prompt_chars=2000))[1][
        "content"
    ]
    assert len(user) == 2000
    assert user.startswith("\nUser: ... ") and "START" not in user
    assert user.endswith("so what does the error mean?" + INSTRUCTION)
    assert "model 2" not in user
    with pytest.raises(ValueError, match="no room beside the instruction"):
        build_messages(long_chat(3, question), RewritePrompt(max_prompt_chars=50))


def test_only_a_cut_prompt_gets_a_new_key_naming_the_budget(tmp_path, caplog):
    cache, session = tmp_path / "rewrites.jsonl", long_chat(60)
    small = RewritePrompt(max_prompt_chars=2000)
    llm = RecordingLLM()
    out = rewrite_sessions([session, SHORT], llm, "m", cache, small, show_progress=False)
    assert out[0].rewrite == "how much does the model 7 cost?"
    assert llm.calls[0] == build_messages(session, small)  # the LLM read the cut prompt
    assert len(llm.calls[0][1]["content"]) <= 2000
    assert "1 of 2 rewrite prompts over max_prompt_chars=2000" in caplog.text
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert keys[0] != _key(session, "m", small)  # not the key of the uncut prompt
    assert keys[1] == _key(SHORT, "m", RewritePrompt())  # a prompt that fits: its old key

    again = RecordingLLM()
    rewrite_sessions([session, SHORT], again, "m", cache, small, show_progress=False)
    assert again.calls == []  # both read back from the cache
    rewrite_sessions([session], again, "m", cache, RewritePrompt(max_prompt_chars=3000), False)
    assert len(again.calls) == 1  # another cut, another prompt: another key
    rewrite_sessions([SHORT], again, "m", cache, RewritePrompt(max_prompt_chars=3000), False)
    assert len(again.calls) == 1  # SHORT fits any of these budgets: same key, from the cache


def test_the_budget_is_inclusive_at_both_cuts(tmp_path, caplog):
    """A prompt of exactly max_prompt_chars is kept whole with its old key; one character more is
    cut. A history that fills the room exactly is kept; one that overflows it by one drops its
    oldest turn."""
    full = build_messages(SHORT, RewritePrompt())[1]["content"]
    oldest = "User: tell me about jaguars\n"  # the oldest history line and its newline
    assert full.startswith(oldest)
    llm, cache = RecordingLLM(), tmp_path / "rewrites.jsonl"
    exact = RewritePrompt(max_prompt_chars=len(full))
    rewrite_sessions([SHORT], llm, "m", cache, exact, show_progress=False)
    assert llm.calls[0][1]["content"] == full  # not cut
    assert json.loads(cache.read_text())["key"] == _key(SHORT, "m", RewritePrompt())
    assert "over max_prompt_chars" not in caplog.text
    # one character short: the oldest turn goes; the rest fills the room to the last character
    for budget in (len(full) - 1, len(full) - len(oldest)):
        user = build_messages(SHORT, RewritePrompt(max_prompt_chars=budget))[1]["content"]
        assert user == full[len(oldest) :], budget
    one_short = RewritePrompt(max_prompt_chars=len(full) - 1)
    rewrite_sessions([SHORT], llm, "m", cache, one_short, show_progress=False)
    assert llm.calls[1][1]["content"] == full[len(oldest) :]
    assert json.loads(cache.read_text().splitlines()[1])["key"] == _key(SHORT, "m", one_short, True)
    assert f"1 of 1 rewrite prompts over max_prompt_chars={len(full) - 1}" in caplog.text

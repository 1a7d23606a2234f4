"""The answer cache of `rag.py`: answers per turn under the system, model and settings.

`system` is a `_rag.systems.RagSystem`, `ws` a `_rag.workspace.RagWorkspace` (rag.py's types).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _conversational.systems import slug
from tqdm.auto import tqdm

from chatretriever.apps.chat import answer_sessions, generation_kwargs
from chatretriever.io.files import read_json
from chatretriever.retrieval.evaluate import write_json
from chatretriever.types import Passage


def answers_key(system: Any, ws: Any) -> dict[str, Any]:
    """What makes an answer, the passages aside (checked per turn): the system, the answering
    model, the length, the prompts and how a long prompt is fitted."""
    from chatretriever.modeling.grounded import (
        CLOSED_BOOK_SYSTEM,
        DEFAULT_PROMPT_TOKENS,
        GROUNDED_SYSTEM,
    )
    from chatretriever.modeling.grounded_fit import FIT_RULE

    prompts = hashlib.sha1((GROUNDED_SYSTEM + CLOSED_BOOK_SYSTEM).encode()).hexdigest()[:12]
    return {
        "system": asdict(system),
        "answerer": ws.answerer_key(system),
        "max_new_tokens": ws.args.max_new_tokens,
        "prompts": prompts,
        # how an over-long prompt is cut (answers cached under the earlier raw cut are redone)
        "prompt_fit": {"rule": FIT_RULE, "max_prompt_tokens": DEFAULT_PROMPT_TOKENS},
    }


def _settings_file(path: Path) -> Path:
    return path.with_name(path.name + ".settings.json")


def cached_answers(path: Path, legacy: Path, key: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """qid -> {"answer", "passages"} of the answers cached under `key`: OUT/answers/<system>.<key
    sha>.jsonl, else a file of the earlier one-turn-set layout (<system>.jsonl) made alike."""
    from chatretriever.io.answers import iter_answer_rows

    for candidate in (path, legacy):
        settings = _settings_file(candidate)
        if not (candidate.is_file() and settings.is_file()):
            continue
        old = {k: v for k, v in read_json(settings).get("key", {}).items() if k != "passages_sha1"}
        if old == key:
            rows = iter_answer_rows(candidate)
            return {r.qid: {"answer": r.answer, "passages": list(r.passages)} for r in rows}
    return {}


def save_answers(path: Path, key: Mapping, cache: Mapping[str, dict], answer_s: float) -> None:
    """The cache, rewritten atomically (an interrupted write leaves the previous file)."""
    from chatretriever.io.answers import write_answers

    write_answers(path, ({"qid": q, **row} for q, row in sorted(cache.items())))
    write_json(_settings_file(path), {"key": key, "answer_s": round(answer_s, 3)})


def answers_of(
    system: Any, ws: Any, passages: Mapping[str, list[Passage]]
) -> tuple[dict[str, str], dict]:
    """The system's answers, cached per turn in OUT/answers/ under the model and settings.

    A turn answered before from the same passages is read back; the others are answered and
    added to the cache after every generation batch, so an interrupted run keeps what it
    answered. The cache never loses a turn (answers of other turn sets stay)."""
    key = answers_key(system, ws)
    sha = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = ws.out / "answers" / f"{slug(system.id)}.{sha}.jsonl"
    cache = cached_answers(path, path.with_name(f"{slug(system.id)}.jsonl"), key)
    settings_file = _settings_file(path)
    total_s = read_json(settings_file).get("answer_s", 0.0) if settings_file.is_file() else 0.0
    ids = {s.id: [p.id for p in passages[s.id]] for s in ws.sessions}
    todo = [
        (s, passages[s.id]) for s in ws.sessions if cache.get(s.id, {}).get("passages") != ids[s.id]
    ]
    start = time.perf_counter()
    if todo:
        model = ws.answering_model(system)
        size = ws.args.gen_batch_size
        kwargs = generation_kwargs(model, ws.args.max_new_tokens, size)  # UniConv: per call
        # longest prompts first, as answer_sessions orders them, one batch per call
        todo.sort(
            key=lambda it: (
                -sum(len(t.content) for t in it[0].turns) - sum(len(p.text) for p in it[1])
            )
        )
        with tqdm(total=len(todo), desc="answer", unit="turn") as bar:
            for i in range(0, len(todo), size):
                batch = todo[i : i + size]
                answers = answer_sessions(model, batch, size, False, kwargs)
                for (s, _), answer in zip(batch, answers, strict=True):
                    cache[s.id] = {"answer": answer, "passages": ids[s.id]}
                elapsed = time.perf_counter() - start
                save_answers(path, key, cache, total_s + elapsed)
                bar.update(len(batch))
    elif not path.is_file():  # read from a file of the earlier layout: copied to this name
        save_answers(path, key, cache, total_s)
    return {s.id: cache[s.id]["answer"] for s in ws.sessions}, {
        "answers": str(path),
        "cached": not todo,
        "reused": len(ws.sessions) - len(todo),
        "generated": len(todo),
        "answer_s": round(time.perf_counter() - start, 3),  # this run's generation
        "answer_s_all": round(total_s + time.perf_counter() - start, 3),  # every cached answer
        "key": key,
    }

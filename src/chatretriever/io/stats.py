"""Recognise a dataset file's format and count what it holds (`chatretriever data stats`).

Every count comes from the format's own reader, so a file that counts also loads, and bad input
raises the same DataFormatError (file, line, field) the loaders raise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from chatretriever.errors import DataFormatError
from chatretriever.io.cast import read_cast_topics
from chatretriever.io.cast_txt import read_cast_topics_txt
from chatretriever.io.corpus import iter_corpus
from chatretriever.io.dstc11 import read_logs
from chatretriever.io.esconv import (
    SupportDialog,
    dialogs_sessions,
    iter_multiesc,
    iter_strategy_tsv,
    normalize_strategy,
    read_esconv,
)
from chatretriever.io.files import iter_lines, read_json
from chatretriever.io.formats import UnknownFormatError, guess_format
from chatretriever.io.grounded_dialogs import read_doc2dial, read_wow
from chatretriever.io.ikat import read_ikat_topics
from chatretriever.io.mtrag import iter_mtrag_tasks
from chatretriever.io.quac import read_canard, read_orquac
from chatretriever.io.reclm import iter_reclm_items, iter_reclm_sequences
from chatretriever.io.sessions import iter_sessions
from chatretriever.io.topiocqa import iter_topiocqa, read_topiocqa
from chatretriever.io.trec import read_beir_qrels, read_run, read_trec_qrels
from chatretriever.types import Qrel, Session

T = TypeVar("T")
Stats = dict[str, Any]


def _progress(items: Iterable[T], desc: str, show: bool) -> Iterator[T]:
    from tqdm.auto import tqdm

    # disable=None: a bar only on a terminal, so piped output and error lines stay clean
    yield from tqdm(items, desc=desc, unit=" rows", disable=None if show else True, leave=False)


def _corpus_stats(path: Path, show: bool) -> Stats:
    n = titled = words = 0
    domains: Counter[str] = Counter()
    for p in _progress(iter_corpus(path), "passages", show):
        n += 1
        titled += bool(p.title)
        words += len(p.text.split())
        if "domain" in p.metadata:
            domains[str(p.metadata["domain"])] += 1
    out: Stats = {"passages": n, "with title": titled, "mean words": words / n if n else 0.0}
    if domains:
        out["domains"] = dict(sorted(domains.items()))
    return out


def _sessions_stats(path: Path, show: bool) -> Stats:
    n = turns = rewrites = responses = 0
    for s in _progress(iter_sessions(path), "sessions", show):
        n, turns = n + 1, turns + len(s.turns)
        rewrites += s.rewrite is not None
        responses += s.response is not None
    return {"sessions": n, "turns": turns, "with rewrite": rewrites, "with response": responses}


def _queries_stats(path: Path, show: bool) -> Stats:
    from chatretriever.io.conversations import read_beir_queries  # it imports this module

    sessions = read_beir_queries(path)
    turns = [len(s.turns) for s in sessions]
    return {
        "queries": len(sessions),
        "with earlier turns": sum(n > 1 for n in turns),
        "turns": sum(turns),
        "max turns": max(turns, default=0),
    }


def _queries_tsv_stats(path: Path, show: bool) -> Stats:
    """`id<TAB>text` lines: queries (MS MARCO, TREC), or CAsT 2019's resolved rewrites."""
    from chatretriever.io.conversations import read_queries_tsv  # it imports this module

    return {"queries": len(read_queries_tsv(path))}


def _qrels_stats(qrels: list[Qrel]) -> Stats:
    grades = Counter(q.relevance for q in qrels)
    return {
        "judgments": len(qrels),
        "queries": len({q.query_id for q in qrels}),
        "documents": len({q.doc_id for q in qrels}),
        "relevant (grade > 0)": sum(q.relevance > 0 for q in qrels),
        "grades": {str(g): grades[g] for g in sorted(grades)},
    }


def _run_stats(path: Path, show: bool) -> Stats:
    run = read_run(path)
    depths = [len(docs) for docs in run.scores.values()]
    return {
        "queries": len(depths),
        "results": sum(depths),
        "max depth": max(depths, default=0),
        "tag": run.name,
    }


def _mtrag_stats(path: Path, show: bool) -> Stats:
    tasks = list(_progress(iter_mtrag_tasks(path), "tasks", show))
    domains = Counter(s.metadata["domain"] for s in tasks)
    answerability = Counter(str(s.metadata["answerability"]) for s in tasks)
    return {
        "tasks": len(tasks),
        "conversations": len({s.metadata["conversation_id"] for s in tasks}),
        "messages": sum(len(s.turns) for s in tasks),
        "domains": dict(sorted(domains.items())),
        "answerability": dict(sorted(answerability.items())),
    }


def _cast_stats(
    path: Path, show: bool, read: Callable[[Path], list[Session]] = read_cast_topics
) -> Stats:
    sessions = read(path)
    return {
        "topics": len({s.metadata["topic"] for s in sessions}),
        "turns": len(sessions),
        "with manual rewrite": sum(s.rewrite is not None for s in sessions),
        "with automatic rewrite": sum("automatic_rewrite" in s.metadata for s in sessions),
        "with response": sum(s.response is not None for s in sessions),
    }


def _ikat_stats(path: Path, show: bool) -> Stats:
    sessions = read_ikat_topics(path)
    return {
        "topics": len({s.metadata["conversation"] for s in sessions}),
        "turns": len(sessions),
        "with rewrite": sum(bool(s.rewrite) for s in sessions),
        "citing passages": sum(bool(s.metadata["passage_ids"]) for s in sessions),
        "cited passages": len({p for s in sessions for p in s.metadata["passage_ids"]}),
    }


def _dstc11_stats(path: Path, show: bool) -> Stats:
    labels = path.with_name("labels.json")
    sessions = read_logs(path)
    out: Stats = {
        "contexts": len(sessions),
        "dialogues": len({s.metadata["conversation"] for s in sessions}),
        "turns": sum(len(s.turns) for s in sessions),
    }
    if labels.is_file():
        out["labels"] = str(labels)
        out["knowledge-seeking"] = sum(bool(s.metadata["target"]) for s in sessions)
    return out


def _topiocqa_stats(path: Path, show: bool) -> Stats:
    sessions = list(_progress(iter_topiocqa(path), "turns", show))
    return {
        "conversations": len({s.metadata["conversation"] for s in sessions}),
        "turns": len(sessions),
        "topics": len({s.metadata.get("topic") for s in sessions}),
    }


def _qa_stats(read: Callable[[Path], list[Session]]) -> Callable[[Path, bool], Stats]:
    def stats(path: Path, show: bool) -> Stats:
        sessions = read(path)
        return {
            "conversations": len({s.metadata["conversation"] for s in sessions}),
            "questions": len(sessions),
            "with rewrite": sum(s.rewrite is not None for s in sessions),
            "with answer": sum(s.response is not None for s in sessions),
        }

    return stats


def _grounded_stats(read: Callable[[Path], list[Session]]) -> Callable[[Path, bool], Stats]:
    def stats(path: Path, show: bool) -> Stats:
        sessions = read(path)
        grounded = ("doc_ids", "checked_sentence")
        return {
            "dialogues": len({s.metadata["conversation"] for s in sessions}),
            "answered turns": len(sessions),
            "grounded": sum(any(s.metadata.get(k) for k in grounded) for s in sessions),
        }

    return stats


def _dialog_stats(dialogs: list[SupportDialog]) -> Stats:
    # ESConv's raw labels have variant spellings (Questions/Question, ...); count both ways
    strategies = Counter(normalize_strategy(s) for d in dialogs for s in d.strategies if s)
    labels = Counter(s for d in dialogs for s in d.strategies if s)
    supporter = sum(d.supporter_turns for d in dialogs)
    return {
        "dialogs": len(dialogs),
        "turns": sum(len(d.turns) for d in dialogs),
        "seeker turns": sum(len(d.turns) for d in dialogs) - supporter,
        "supporter turns": supporter,
        "labelled supporter turns": sum(strategies.values()),
        "sessions (supporter turns after a seeker turn)": len(dialogs_sessions(dialogs)),
        "strategies": dict(strategies.most_common()),
        "raw labels": len(labels),
    }


def _esconv_tsv_stats(path: Path, show: bool) -> Stats:
    sessions = list(iter_strategy_tsv(path))
    strategies = Counter(normalize_strategy(s.metadata["strategy"]) for s in sessions)
    return {
        "examples": sum(1 for _ in iter_lines(path)),
        "sessions (context has a seeker turn)": len(sessions),
        "strategies": dict(strategies.most_common()),
    }


def _strategy_list_stats(path: Path, show: bool) -> Stats:
    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
        raise DataFormatError(path, "expected a JSON list of strategy names")
    return {"strategies": len(data), "names": [s.strip("[]") for s in data]}


def _items_stats(path: Path, show: bool) -> Stats:
    n = 0
    fields: Counter[str] = Counter()
    for item in _progress(iter_reclm_items(path), "items", show):
        n += 1
        fields.update(k for k, v in item.metadata.items() if v not in (None, "", []))
    return {"items": n, "non-empty fields": dict(fields.most_common())}


def _sequences_stats(path: Path, show: bool) -> Stats:
    lengths: list[int] = []
    items: set[str] = set()
    for h in _progress(iter_reclm_sequences(path), "users", show):
        lengths.append(len(h.items))
        items.update(h.items)
    return {
        "users": len(lengths),
        "interactions": sum(lengths),
        "distinct items": len(items),
        "min history": min(lengths, default=0),
        "mean history": sum(lengths) / len(lengths) if lengths else 0.0,
        "max history": max(lengths, default=0),
    }


_STATS: dict[str, Callable[[Path, bool], Stats]] = {
    "beir-corpus": _corpus_stats,
    "beir-queries": _queries_stats,
    "sessions": _sessions_stats,
    "trec-qrels": lambda p, show: _qrels_stats(read_trec_qrels(p)),
    "beir-qrels": lambda p, show: _qrels_stats(read_beir_qrels(p)),
    "trec-run": _run_stats,
    "mtrag": _mtrag_stats,
    "cast-topics": _cast_stats,
    "cast-topics-txt": lambda p, show: _cast_stats(p, show, read_cast_topics_txt),
    "queries-tsv": _queries_tsv_stats,
    "ikat-topics": _ikat_stats,
    "dstc11-logs": _dstc11_stats,
    "topiocqa": _topiocqa_stats,
    "qrecc": _qa_stats(read_topiocqa),
    "orquac": _qa_stats(read_orquac),
    "doc2dial": _grounded_stats(read_doc2dial),
    "wow": _grounded_stats(read_wow),
    "canard": _qa_stats(read_canard),
    "esconv": lambda p, show: _dialog_stats(read_esconv(p)),
    "multiesc": lambda p, show: _dialog_stats(list(iter_multiesc(p))),
    "esconv-tsv": _esconv_tsv_stats,
    "strategy-list": _strategy_list_stats,
    "reclm-items": _items_stats,
    "reclm-sequences": _sequences_stats,
}
FORMATS = tuple(_STATS)
__all__ = ["FORMATS", "UnknownFormatError", "dataset_stats", "guess_format"]


def dataset_stats(path: str | Path, fmt: str | None = None, show_progress: bool = False) -> Stats:
    """Count what a dataset file holds, reading it with its format's loader (streamed).

    Args:
        path: The file.
        fmt: One of `FORMATS`; guessed with `guess_format` when None.
        show_progress: Show a progress bar while streaming large files.

    Returns:
        `{"path", "format", <count name>: int | float | str | {name: count} | [names], ...}`.
    """
    path = Path(path)
    fmt = fmt or guess_format(path)
    if fmt not in _STATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return {"path": str(path), "format": fmt, **_STATS[fmt](path, show_progress)}

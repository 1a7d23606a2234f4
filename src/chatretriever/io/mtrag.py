"""IBM MTRAG: generation-task `reference.jsonl`, BEIR qrels per domain and the BEIR corpus.

Layout read by `load_mtrag` (the public release, any subset of domains present)::

    mtrag/corpus.jsonl.gz                      {"_id", "title", "text", "domain"}
    mtrag/mtrag-un/reference.jsonl             one task per line (schema below)
    mtrag/mtrag-un/qrels/{domain}.tsv          BEIR qrels: query-id corpus-id score

A task: `conversation_id`, `task_id` (`<conversation_id><::><turn>`), `turn`, `input`
(`[{"speaker": "user"|"agent", "text"}]`, the last element is the current question), `targets`
(reference answers), `contexts` (reference passages), `answerability`, `Question Type`,
`Multi-Turn`, `Collection`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.corpus import iter_numbered_corpus
from chatretriever.io.files import iter_jsonl, require
from chatretriever.io.trec import read_beir_qrels
from chatretriever.types import Passage, Qrel, Session, Turn

logger = logging.getLogger(__name__)

DOMAINS = ("clapnq", "cloud", "fiqa", "govt")
TASK_SEPARATOR = "<::>"
_SPEAKER_ROLE = {"user": "user", "agent": "assistant"}


@dataclass(frozen=True)
class MtragData:
    """One MTRAG split: its tasks as sessions, their qrels and where the corpus lives.

    Attributes:
        sessions: One session per task, id = `task_id`, in file order.
        qrels: Judgments of the selected domains (every query id names a loaded task).
        corpus_path: The BEIR corpus file, or None when it is not beside the tasks.
    """

    sessions: list[Session]
    qrels: list[Qrel]
    corpus_path: Path | None


def domain_of(collection: str) -> str | None:
    """The domain (one of `DOMAINS`) named by an MTRAG `Collection` value, or None."""
    # Releases spell it `ibmcloud`, `govt`, ... or as longer index names that contain them.
    low = collection.lower()
    return next((d for d in DOMAINS if d in low), None)


def _check_domains(domains: Iterable[str] | None) -> tuple[str, ...]:
    if domains is None:
        return DOMAINS
    chosen = tuple(domains)
    unknown = sorted(set(chosen) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown MTRAG domain(s) {unknown}; choose from {DOMAINS}")
    return chosen


def _str_list(value: Any) -> list[str]:
    """MTRAG labels are lists of strings (sometimes a bare string)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _turns(raw: Any, path: str | Path, line: int) -> tuple[Turn, ...]:
    if not isinstance(raw, list) or not raw:
        raise DataFormatError(path, "expected a non-empty list of messages", line, "input")
    turns = []
    for i, m in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(m, Mapping):
            raise DataFormatError(path, "expected an object", line, where)
        speaker = m.get("speaker")
        role = _SPEAKER_ROLE.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataFormatError(
                path, f"speaker must be 'user' or 'agent', got {speaker!r}", line, where
            )
        if not isinstance(m.get("text"), str):
            raise DataFormatError(path, "text must be a string", line, f"{where}.text")
        turns.append(Turn(role, m["text"]))
    if turns[-1].role != "user":
        raise DataFormatError(path, "the last message must be the user's question", line, "input")
    return tuple(turns)


def _response(raw: Any, path: str | Path, line: int) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise DataFormatError(path, "expected a list", line, "targets")
    for i, t in enumerate(raw):
        if not isinstance(t, Mapping) or not isinstance(t.get("text"), str):
            raise DataFormatError(path, "expected an object with a text", line, f"targets[{i}]")
    return raw[0]["text"] if raw else None


def _context_ids(raw: Any, path: str | Path, line: int) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise DataFormatError(path, "expected a list", line, "contexts")
    ids = []
    for i, c in enumerate(raw):
        if not isinstance(c, Mapping) or "document_id" not in c:
            raise DataFormatError(path, "missing document_id", line, f"contexts[{i}]")
        ids.append(str(c["document_id"]))
    return ids


def _enrichments(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The labels some releases keep in the current question's `enrichments` ({} if none)."""
    turns = obj.get("input")
    question = turns[-1] if isinstance(turns, list) and turns else None
    labels = question.get("enrichments") if isinstance(question, Mapping) else None
    return labels if isinstance(labels, Mapping) else {}


def mtrag_session(obj: Mapping[str, Any], path: str | Path = "<input>", line: int = 0) -> Session:
    """Turn one `reference.jsonl` task into a Session (id = `task_id`).

    Args:
        obj: The parsed task object.
        path: File it came from (for error messages).
        line: 1-based line number in that file.

    Returns:
        The session; `response` is the first reference answer, metadata holds `conversation_id`,
        `turn`, `domain`, `collection`, `answerability`, `question_type`, `multi_turn` and
        `context_ids` (the reference passage ids).
    """
    conv = require(obj, "conversation_id", path, line)
    task_id = require(obj, "task_id", path, line)
    turn = require(obj, "turn", path, line)
    if task_id != f"{conv}{TASK_SEPARATOR}{turn}":
        raise DataFormatError(
            path, f"expected '{conv}{TASK_SEPARATOR}{turn}', got {task_id!r}", line, "task_id"
        )
    # the release's README spells the field `collection`, its files `Collection`
    key = "collection" if "Collection" not in obj and "collection" in obj else "Collection"
    collection = require(obj, key, path, line)
    domain = domain_of(collection)
    if domain is None:
        raise DataFormatError(path, f"names no known domain: {collection!r}", line, key)
    # the labels are top-level fields, or the question's `enrichments` in some releases
    labels = _enrichments(obj)
    answerability = _str_list(obj.get("answerability", labels.get("answerability")))
    meta = {
        "conversation_id": conv,
        "turn": int(turn) if turn.isdigit() else turn,
        "domain": domain,
        "collection": collection,
        "answerability": ",".join(answerability) or None,
        "question_type": _str_list(obj.get("Question Type", labels.get("Question Type"))),
        "multi_turn": _str_list(obj.get("Multi-Turn", labels.get("Multi-Turn"))),
        "context_ids": _context_ids(obj.get("contexts"), path, line),
    }
    return Session(
        id=task_id,
        turns=_turns(obj.get("input"), path, line),
        response=_response(obj.get("targets"), path, line),
        metadata=meta,
    )


def iter_mtrag_tasks(path: str | Path, domains: Iterable[str] | None = None) -> Iterator[Session]:
    """Stream the tasks of a `reference.jsonl` file as sessions; duplicate task ids raise.

    Args:
        path: The `reference.jsonl` file (`.gz` also read).
        domains: Keep only tasks of these domains (default: all of `DOMAINS`).
    """
    keep = set(_check_domains(domains))
    seen: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        s = mtrag_session(obj, path, lineno)
        if s.id in seen:
            raise DataFormatError(path, f"duplicate id {s.id!r}", lineno, "task_id")
        seen.add(s.id)
        if s.metadata["domain"] in keep:
            yield s


def iter_mtrag_corpus(path: str | Path, domains: Iterable[str] | None = None) -> Iterator[Passage]:
    """Stream the MTRAG BEIR corpus, keeping passages of the given domains.

    Every passage must carry a `domain` field naming one of `DOMAINS`.
    """
    keep = set(_check_domains(domains))
    for lineno, p in iter_numbered_corpus(path):
        domain = p.metadata.get("domain")
        if domain not in DOMAINS:
            raise DataFormatError(
                path, f"expected one of {DOMAINS}, got {domain!r}", lineno, "domain"
            )
        if domain in keep:
            yield p


def _task_dir(root: Path) -> Path:
    for candidate in (root, root / "mtrag-un"):
        if (candidate / "reference.jsonl").is_file():
            return candidate
    raise DataFormatError(root, "no reference.jsonl here or in mtrag-un/")


def read_mtrag_qrels(
    qrels_dir: str | Path,
    domains: Iterable[str] | None = None,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> list[Qrel]:
    """Read `qrels/{domain}.tsv` for each domain whose file exists (BEIR TSV)."""
    out: list[Qrel] = []
    for domain in _check_domains(domains):
        path = Path(qrels_dir) / f"{domain}.tsv"
        if not path.is_file():
            logger.warning("no MTRAG qrels for domain %s at %s", domain, path)
            continue
        out.extend(read_beir_qrels(path, known_queries, known_docs))
    return out


def load_mtrag(
    root: str | Path, domains: Iterable[str] | None = None, check_corpus: bool = False
) -> MtragData:
    """Load MTRAG tasks and qrels of the chosen domains.

    Args:
        root: The `mtrag/` directory (holding `mtrag-un/` and `corpus.jsonl.gz`) or the
            directory holding `reference.jsonl` itself.
        domains: Any subset of `DOMAINS` (default: all).
        check_corpus: Also check that every judged passage is in the corpus (reads it once).

    Returns:
        MtragData with sessions, qrels (their query ids all name loaded tasks) and corpus path.
    """
    root = Path(root)
    chosen = _check_domains(domains)
    task_dir = _task_dir(root)
    sessions = list(iter_mtrag_tasks(task_dir / "reference.jsonl", chosen))
    corpus_path = next(
        (p for d in (task_dir, task_dir.parent) for p in sorted(d.glob("corpus.jsonl*"))), None
    )
    known_docs = None
    if check_corpus:
        if corpus_path is None:
            raise DataFormatError(root, "check_corpus=True but no corpus.jsonl(.gz) found")
        known_docs = {p.id for p in iter_mtrag_corpus(corpus_path, chosen)}
    qrels = read_mtrag_qrels(task_dir / "qrels", chosen, {s.id for s in sessions}, known_docs)
    logger.info("MTRAG: %d tasks, %d judgments (%s)", len(sessions), len(qrels), ",".join(chosen))
    return MtragData(sessions=sessions, qrels=qrels, corpus_path=corpus_path)

"""TREC qrels (graded), BEIR qrels TSV and 6-column TREC run files."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path

from chatretriever.errors import DataFormatError
from chatretriever.io.files import atomic_write, iter_lines
from chatretriever.types import Qrel, Run, rank_key


def _check_known(
    path: str | Path,
    line: int,
    qid: str,
    did: str,
    known_queries: Collection[str] | None,
    known_docs: Collection[str] | None,
) -> None:
    if known_queries is not None and qid not in known_queries:
        raise DataFormatError(path, f"query id {qid!r} names no known query", line, "query_id")
    if known_docs is not None and did not in known_docs:
        raise DataFormatError(path, f"doc id {did!r} names no document in the corpus", line, "doc_id")


def _int(path: str | Path, line: int, value: str, field: str) -> int:
    try:
        return int(float(value)) if "." in value else int(value)
    except ValueError:
        raise DataFormatError(path, f"not a number: {value!r}", line, field) from None


def read_trec_qrels(
    path: str | Path,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> list[Qrel]:
    """Read `qid iter docid relevance` lines (whitespace separated, graded)."""
    out: list[Qrel] = []
    seen: set[tuple[str, str]] = set()
    for lineno, line in iter_lines(path):
        cols = line.split()
        if len(cols) != 4:
            raise DataFormatError(path, f"expected 4 columns, got {len(cols)}", lineno)
        qid, _, did, rel = cols
        _check_known(path, lineno, qid, did, known_queries, known_docs)
        if (qid, did) in seen:
            raise DataFormatError(path, f"duplicate judgment for ({qid}, {did})", lineno, "doc_id")
        seen.add((qid, did))
        out.append(Qrel(qid, did, _int(path, lineno, rel, "relevance")))
    return out


def read_beir_qrels(
    path: str | Path,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> list[Qrel]:
    """Read BEIR qrels TSV (`query-id corpus-id score`, optional header line)."""
    out: list[Qrel] = []
    seen: set[tuple[str, str]] = set()
    for lineno, line in iter_lines(path):
        cols = line.split("\t")
        if lineno == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(cols) != 3:
            raise DataFormatError(path, f"expected 3 tab-separated columns, got {len(cols)}", lineno)
        qid, did, rel = (c.strip() for c in cols)
        _check_known(path, lineno, qid, did, known_queries, known_docs)
        if (qid, did) in seen:
            raise DataFormatError(path, f"duplicate judgment for ({qid}, {did})", lineno, "doc_id")
        seen.add((qid, did))
        out.append(Qrel(qid, did, _int(path, lineno, rel, "score")))
    return out


def read_qrels(
    path: str | Path,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> list[Qrel]:
    """Read qrels in TREC or BEIR TSV form, told apart by the first line."""
    for _, first in iter_lines(path):
        beir = "\t" in first and len(first.split("\t")) == 3
        reader = read_beir_qrels if beir else read_trec_qrels
        return reader(path, known_queries, known_docs)
    return []


def write_qrels(path: str | Path, qrels: Iterable[Qrel]) -> int:
    """Write TREC qrels (`qid 0 docid rel`) atomically."""
    n = 0
    with atomic_write(path) as f:
        for q in qrels:
            f.write(f"{q.query_id} 0 {q.doc_id} {q.relevance}\n")
            n += 1
    return n


def read_run(
    path: str | Path,
    known_queries: Collection[str] | None = None,
    known_docs: Collection[str] | None = None,
) -> Run:
    """Read a 6-column TREC run (`qid Q0 docid rank score tag`). Ranks are recomputed."""
    scores: dict[str, dict[str, float]] = {}
    name = "run"
    for lineno, line in iter_lines(path):
        cols = line.split()
        if len(cols) != 6:
            raise DataFormatError(path, f"expected 6 columns, got {len(cols)}", lineno)
        qid, _, did, _, score, name = cols
        _check_known(path, lineno, qid, did, known_queries, known_docs)
        try:
            value = float(score)
        except ValueError:
            raise DataFormatError(path, f"score is not a number: {score!r}", lineno, "score") from None
        docs = scores.setdefault(qid, {})
        if did in docs:
            raise DataFormatError(path, f"doc {did!r} listed twice for query {qid!r}", lineno, "doc_id")
        docs[did] = value
    return Run(scores=scores, name=name)


def write_run(path: str | Path, run: Run, depth: int | None = None) -> int:
    """Write a run as 6 TREC columns atomically, ranked by (-score, docid)."""
    n = 0
    tag = run.name.replace(" ", "_") or "run"
    with atomic_write(path) as f:
        for qid in sorted(run.scores):
            docs = sorted(run.scores[qid].items(), key=lambda kv: rank_key(kv[0], kv[1]))
            for rank, (did, score) in enumerate(docs[:depth], start=1):
                f.write(f"{qid} Q0 {did} {rank} {score:.6f} {tag}\n")
                n += 1
    return n

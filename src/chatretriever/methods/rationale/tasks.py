"""Hidden-rationale retrieval tasks from ESConv: strategy retrieval and response retrieval.

For each supporter turn with a strategy, the query is the dialog so far (a `Session` ending with
the seeker's latest turn; supporter messages said since then ride in
`metadata["supporter_prefix"]`).

- Strategy retrieval: the corpus is the 8 MultiESC strategies, each a name plus a one-sentence
  description written for this project; relevant = that turn's strategy. The evaluation
  dialogs are MultiESC's, so its label set is the task's (Greeting added; Suggestions and
  Information merged): FailedESConv's "Providing Suggestions", "Information" and "Direct
  Guidance" map to "Providing Suggestions or Information". ESConv never labels a greeting
  apart from "Others", so training turns never have Greeting as gold.
- Response retrieval: the corpus is every supporter turn of the split's dialogs; relevant = the
  gold next supporter turn. A query's candidates are the turns of OTHER dialogs plus its gold
  (`restrict_to_other_dialogs` removes the rest of its own dialog from any run).

Splits are by dialog and stated in a split file (`load_split`); the project's split ships in the
package (`SHIPPED_SPLIT`, `methods/rationale/esconv-split.json`). The training
sessions also make contrastive training examples (`io.training` format) for the fine-tuned
bi-encoder baseline (`configs/rationale-biencoder.yaml`): `strategy_examples`,
`response_examples`, `write_contrastive`. Torch-free.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.corpus import write_corpus
from chatretriever.io.esconv import (
    SupportDialog,
    dialog_sessions,
    iter_multiesc,
    normalize_strategy,
    read_esconv,
)
from chatretriever.io.files import read_json
from chatretriever.io.sessions import write_sessions
from chatretriever.io.training import (
    TrainingExample,
    example_from_session,
    write_training_examples,
)
from chatretriever.io.trec import write_qrels
from chatretriever.types import Passage, Qrel, Run, Session

logger = logging.getLogger(__name__)

# The 8 MultiESC strategies (multiesc_strategy.json): doc id, name, our one-sentence description.
STRATEGY_DOCS = (
    ("question", "Question", "Ask the seeker an open or specific question to learn more about "
     "their situation, feelings or needs."),
    ("greeting", "Greeting", "Open or close the conversation politely, such as saying hello, "
     "introducing yourself or saying goodbye."),
    ("restatement", "Restatement or Paraphrasing", "Repeat back in your own words what the "
     "seeker said, so they feel heard and can check you understood."),
    ("reflection", "Reflection of feelings", "Name and acknowledge the emotions the seeker is "
     "expressing, showing that you understand how they feel."),
    ("self-disclosure", "Self-disclosure", "Share a similar experience or feeling of your own to "
     "show empathy and that the seeker is not alone."),
    ("affirmation", "Affirmation and Reassurance", "Affirm the seeker's strengths, efforts or "
     "worth and reassure them that things can get better."),
    ("suggestions", "Providing Suggestions or Information", "Offer concrete advice, a possible "
     "course of action, or useful facts and resources that may help."),
    ("others", "Others", "A supportive remark that fits none of the other strategies, such as "
     "small talk, thanks or an encouraging pleasantry."),
)  # fmt: skip
_MERGED = {
    "Providing Suggestions": "Providing Suggestions or Information",
    "Information": "Providing Suggestions or Information",
}
_NAME_TO_ID = {name: doc_id for doc_id, name, _ in STRATEGY_DOCS}
FAILED_ESCONV = "FailedESConv.json"
MULTIESC = "multiesc_valid.txt"
_SOURCES = {FAILED_ESCONV: "failed", MULTIESC: "multiesc"}
# The project's split (package data, so an installed wheel has it too).
SHIPPED_SPLIT = Path(__file__).with_name("esconv-split.json")


def strategy_passages() -> list[Passage]:
    """The strategy corpus: id = slug, title = the strategy's name, text = its description."""
    return [Passage(doc_id, desc, title=name) for doc_id, name, desc in STRATEGY_DOCS]


def strategy_doc_id(label: str) -> str:
    """The strategy doc id of a raw ESConv or MultiESC label ("Questions" -> "question").

    Raises:
        ValueError: The label names none of the 8 strategies.
    """
    name = normalize_strategy(label)
    name = _MERGED.get(name, name)
    if name not in _NAME_TO_ID:
        raise ValueError(f"unknown strategy label {label!r} (normalised: {name!r})")
    return _NAME_TO_ID[name]


@dataclass(frozen=True)
class Split:
    """Which dialogs of which file go to a part of the split.

    Attributes:
        data_dir: The ESConv data directory.
        parts: Part name ("train", "eval") -> file name -> dialog ids (None: every dialog).
    """

    data_dir: Path
    parts: Mapping[str, Mapping[str, frozenset[int] | None]] = field(default_factory=dict)


def load_split(path: str | Path, data_dir: str | Path | None = None) -> Split:
    """Read a split file (the shipped one: `SHIPPED_SPLIT`).

    Args:
        path: The split JSON: `{"data_dir", "train": {file: "all" | [ids]}, "eval": {...}}`.
        data_dir: Overrides the file's `data_dir`. The file's, when relative, is relative to
            the current directory (the shipped split's `../shared/data/esconv` is the
            project's layout, seen from the checkout's root).

    Raises:
        DataFormatError: A malformed field, a dialog listed in two parts, or no data directory
            at all (neither `data_dir` nor the file's).
    """
    path = Path(path)
    raw = read_json(path)
    if not isinstance(raw, Mapping):
        raise DataFormatError(path, "expected a JSON object")
    named = data_dir if data_dir is not None else raw.get("data_dir")
    if not isinstance(named, (str, Path)) or not str(named):
        raise DataFormatError(
            path, "expected the ESConv data directory's path (or give --data-dir)", field="data_dir"
        )
    root = Path(named)
    parts: dict[str, dict[str, frozenset[int] | None]] = {}
    for part in ("train", "eval"):
        files = raw.get(part)
        if not isinstance(files, Mapping):
            raise DataFormatError(path, "expected an object {file: 'all' | [ids]}", field=part)
        parts[part] = {}
        for name, ids in files.items():
            if name not in _SOURCES:
                raise DataFormatError(path, f"unknown file {name!r}", field=f"{part}.{name}")
            ok = ids == "all" or (isinstance(ids, list) and all(isinstance(i, int) for i in ids))
            if not ok:
                raise DataFormatError(
                    path, "expected 'all' or a list of ints", field=f"{part}.{name}"
                )
            parts[part][name] = None if ids == "all" else frozenset(ids)
    _check_disjoint(path, parts)
    return Split(root, parts)


def _check_disjoint(path: Path, parts: Mapping[str, Mapping[str, frozenset[int] | None]]) -> None:
    for name in _SOURCES:
        a, b = parts["train"].get(name, frozenset()), parts["eval"].get(name, frozenset())
        if a is None and b or b is None and a or (a and b and a & b):
            raise DataFormatError(path, f"{name}: a dialog is in both train and eval", field=name)


def _read_dialogs(data_dir: Path, name: str) -> list[SupportDialog]:
    file = data_dir / name
    return read_esconv(file) if name == FAILED_ESCONV else list(iter_multiesc(file))


def split_dialogs(split: Split, part: str) -> list[tuple[str, SupportDialog]]:
    """(source tag, dialog) of one part, in file order.

    Raises:
        FileNotFoundError: The split's data directory does not exist (named, with the remedy).
    """
    if not split.data_dir.is_dir():
        raise FileNotFoundError(
            f"ESConv data directory {split.data_dir} (resolved: {split.data_dir.resolve()}) "
            "not found: give the directory holding FailedESConv.json and multiesc_valid.txt "
            "(--data-dir)"
        )
    out = []
    for name, ids in split.parts[part].items():
        dialogs = _read_dialogs(split.data_dir, name)
        unknown = sorted(set(ids or ()) - set(range(len(dialogs))))
        if unknown:
            raise ValueError(f"{name}: the split names dialogs {unknown[:5]} the file lacks")
        out += [(_SOURCES[name], d) for i, d in enumerate(dialogs) if ids is None or i in ids]
    return out


def task_sessions(
    dialogs: Iterable[tuple[str, SupportDialog]], with_situation: bool = False
) -> list[Session]:
    """Sessions of every supporter turn with a strategy; ids `{source}-{dialog}_{turn}`.

    `metadata["strategy_id"]` is the strategy doc id, `metadata["dialog"]` `{source}-{dialog}`;
    with `with_situation`, `metadata["show_situation"]` asks prompts to show the situation.
    """
    out = []
    for source, dialog in dialogs:
        for s in dialog_sessions(dialog):
            label = s.metadata.get("strategy")
            if not label:
                continue
            meta = dict(s.metadata)
            meta.update(
                dialog=f"{source}-{dialog.id}",
                strategy_id=strategy_doc_id(label),
                show_situation=with_situation,
            )
            out.append(replace(s, id=f"{source}-{s.id}", metadata=meta))
    return out


def strategy_qrels(sessions: Sequence[Session]) -> list[Qrel]:
    """One judgment per session: its strategy doc, relevance 1."""
    return [Qrel(s.id, s.metadata["strategy_id"], 1) for s in sessions]


def response_doc_id(session_id: str) -> str:
    """The doc id of the supporter turn a session answers."""
    return f"{session_id}-r"


def response_passages(sessions: Sequence[Session]) -> list[Passage]:
    """The response corpus: each session's gold supporter turn (metadata: its dialog)."""
    return [
        Passage(response_doc_id(s.id), s.response or "", metadata={"dialog": s.metadata["dialog"]})
        for s in sessions
        if s.response
    ]


def response_qrels(sessions: Sequence[Session]) -> list[Qrel]:
    """One judgment per session: its gold supporter turn."""
    return [Qrel(s.id, response_doc_id(s.id), 1) for s in sessions if s.response]


def restrict_to_other_dialogs(
    run: Run, sessions: Sequence[Session], passages: Sequence[Passage]
) -> Run:
    """Drop from each query's ranking the turns of its own dialog other than its gold."""
    doc_dialog = {p.id: p.metadata.get("dialog") for p in passages}
    dialog = {s.id: s.metadata["dialog"] for s in sessions}
    scores = {
        q: {
            d: v
            for d, v in docs.items()
            if d == response_doc_id(q) or doc_dialog.get(d) != dialog.get(q)
        }
        for q, docs in run.scores.items()
    }
    return Run(scores, run.name)


def write_task(
    out_dir: str | Path, passages: Sequence[Passage], sessions: Sequence[Session], qrels: Any
) -> dict[str, Path]:
    """Write `corpus.jsonl`, `sessions.jsonl` and `qrels.txt` (TREC) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in (("corpus", "corpus.jsonl"), ("sessions", "sessions.jsonl"),
                                      ("qrels", "qrels.txt"))}  # fmt: skip
    write_corpus(paths["corpus"], passages)
    write_sessions(paths["sessions"], sessions)
    write_qrels(paths["qrels"], qrels)
    logger.info("%d passages, %d sessions -> %s", len(passages), len(sessions), out)
    return paths


def class_prior_run(train: Sequence[Session], queries: Sequence[Session]) -> Run:
    """The class-prior baseline: every query ranks the strategies by training frequency.

    Args:
        train: Training sessions (their `metadata["strategy_id"]` is counted).
        queries: The sessions to rank for.

    Returns:
        A Run named "class-prior": score = the strategy's share of training turns.
    """
    counts = dict.fromkeys((doc_id for doc_id, _, _ in STRATEGY_DOCS), 0)
    for s in train:
        counts[s.metadata["strategy_id"]] += 1
    total = max(1, sum(counts.values()))
    prior = {d: c / total for d, c in counts.items()}
    return Run({q.id: dict(prior) for q in queries}, "class-prior")


STRATEGY_SOURCE = "esconv-strategy"
RESPONSE_SOURCE = "esconv-response"


def _example(
    session: Session, positive: Passage, negatives: Sequence[Passage], source: str
) -> TrainingExample:
    """A training example whose target is the gold supporter turn (None when it is empty)."""
    ex = example_from_session(session, [positive], negatives, source=source)
    return ex if ex.target else replace(ex, target=None)


def strategy_examples(sessions: Sequence[Session]) -> list[TrainingExample]:
    """Contrastive examples of the strategy task, one per session (`task_sessions`).

    The positive is the gold strategy's document, the hard negatives the other 7 strategies
    (in `STRATEGY_DOCS` order); the target is the gold supporter turn (`session.response`), for
    variants that add the session-masked LM loss (alpha > 0).

    Raises:
        ValueError: A session has no `metadata["strategy_id"]` or one naming no strategy.
    """
    docs = {p.id: p for p in strategy_passages()}
    out = []
    for s in sessions:
        gold = s.metadata.get("strategy_id")
        if gold not in docs:
            raise ValueError(
                f"session {s.id}: metadata.strategy_id {gold!r} is not one of {sorted(docs)}"
            )
        negatives = [p for p in docs.values() if p.id != gold]
        out.append(_example(s, docs[gold], negatives, STRATEGY_SOURCE))
    return out


def _other_dialog_picks(
    rng: random.Random, dialogs: Sequence[str], own: str, n: int, n_others: int
) -> list[int]:
    """`n` distinct indexes into `dialogs` whose dialog is not `own` (all, if fewer).

    Args:
        rng: The random source.
        dialogs: The dialog of each candidate.
        own: The dialog to avoid.
        n: How many to pick.
        n_others: How many candidates are of another dialog.
    """
    if n_others <= 4 * n:  # few candidates: list them (rejection sampling would loop long)
        candidates = [i for i, d in enumerate(dialogs) if d != own]
        return rng.sample(candidates, min(n, len(candidates)))
    picks: list[int] = []  # most candidates qualify: a few draws suffice
    while len(picks) < n:
        i = rng.randrange(len(dialogs))
        if dialogs[i] != own and i not in picks:
            picks.append(i)
    return picks


def response_examples(
    sessions: Sequence[Session], n_negatives: int = 7, seed: int = 0
) -> list[TrainingExample]:
    """Contrastive examples of the response task, one per session with a gold supporter turn.

    The positive is the gold turn (doc id `response_doc_id`), the hard negatives `n_negatives`
    turns of OTHER dialogs drawn at random (the candidates the evaluation ranks it against).

    Args:
        sessions: Training sessions (`task_sessions`: `metadata["dialog"]` names the dialog).
        n_negatives: Negatives per example (fewer when other dialogs have fewer turns).
        seed: Sampling seed.

    Raises:
        ValueError: `n_negatives` < 0, or a session without `metadata["dialog"]`.
    """
    if n_negatives < 0:
        raise ValueError(f"n_negatives must be >= 0, got {n_negatives}")
    for s in sessions:
        if "dialog" not in s.metadata:
            raise ValueError(f"session {s.id}: metadata.dialog is missing (use task_sessions)")
    docs = response_passages(sessions)
    by_doc = {response_doc_id(s.id): s for s in sessions}
    dialogs = [str(p.metadata["dialog"]) for p in docs]
    size = Counter(dialogs)
    rng = random.Random(seed)
    out = []
    for doc, dialog in zip(docs, dialogs, strict=True):
        picks = _other_dialog_picks(rng, dialogs, dialog, n_negatives, len(docs) - size[dialog])
        out.append(_example(by_doc[doc.id], doc, [docs[i] for i in picks], RESPONSE_SOURCE))
    return out


def write_contrastive(path: str | Path, sessions: Sequence[Session]) -> int:
    """Write the strategy task's contrastive examples (`strategy_examples`) as training JSONL,
    atomically; returns the number written (`chatretriever train` reads the file)."""
    n = write_training_examples(path, strategy_examples(sessions))
    logger.info("%d contrastive strategy examples -> %s", n, path)
    return n

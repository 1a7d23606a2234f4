"""Emotional-support conversations: ESConv (original schema), MultiESC lines and the strategy TSV.

- ESConv JSON (`ESConv.json`, `FailedESConv.json`): a list of dialogs
  `{"situation", "emotion_type", "problem_type", "dialog": [{"speaker", "content",
  "annotation": {"strategy"?}}]}`; the seeker speaks as `seeker` (or `speaker`), the supporter as
  `supporter` (or `listener`).
- MultiESC (`*.txt`): one dialog per JSON line, `"dialog": [{"text", "speaker": "usr"|"sys",
  "strategy"?}]`.
- `devWithStrategy_short.tsv`: one truncated example per line, utterances joined by ` EOS `, each
  `<flag> <speaker 0|1> <position> [Strategy]? text`; the last utterance is the supporter reply.

Seeker turns become `user` turns and supporter turns `assistant` turns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, iter_lines, read_json
from chatretriever.types import Session, Turn

logger = logging.getLogger(__name__)

# The 8 strategies of ESConv (strategy.json) and the spellings its raw annotations also use.
STRATEGIES = (
    "Question",
    "Restatement or Paraphrasing",
    "Reflection of feelings",
    "Self-disclosure",
    "Affirmation and Reassurance",
    "Providing Suggestions",
    "Information",
    "Others",
)
_STRATEGY_ALIASES = {
    "Questions": "Question",
    "Restatement": "Restatement or Paraphrasing",
    "Approval and Reassurance": "Affirmation and Reassurance",
    "Direct Guidance": "Providing Suggestions",
    "Other": "Others",
}
_SEEKER = {"seeker", "speaker", "usr"}
_SUPPORTER = {"supporter", "listener", "sys"}
_SEGMENT = re.compile(r"(\S+) ([01]) (\d+) (.*)", re.S)
_TAG = re.compile(r"\[([^\]]+)\]\s*(.*)", re.S)


@dataclass(frozen=True)
class SupportDialog:
    """One emotional-support dialog.

    Attributes:
        id: Its 0-based position in the file, as a string.
        turns: Seeker turns as `user`, supporter turns as `assistant`, in order.
        strategies: One per turn: the supporter's strategy label, None for seeker turns.
        situation: The seeker's own description of the problem.
        emotion: `emotion_type`.
        problem: `problem_type`.
        metadata: Every other dialog field (survey scores, intensities, ...).
    """

    id: str
    turns: tuple[Turn, ...]
    strategies: tuple[str | None, ...]
    situation: str = ""
    emotion: str = ""
    problem: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.strategies) != len(self.turns):
            raise ValueError("SupportDialog needs one strategy entry per turn")

    @property
    def supporter_turns(self) -> int:
        return sum(t.role == "assistant" for t in self.turns)


def normalize_strategy(label: str) -> str:
    """Map a raw ESConv strategy spelling (`Questions`, `Other`, ...) to one of `STRATEGIES`."""
    label = label.strip().strip("[]").strip()
    return _STRATEGY_ALIASES.get(label, label)


def _utterance(
    raw: Any, path: Path, line: int | None, where: str, text_key: str
) -> tuple[Turn, str | None]:
    """(turn, strategy) from one dialog entry; the text is under `text_key`."""
    if not isinstance(raw, Mapping):
        raise DataFormatError(path, "expected an object", line, where)
    speaker = raw.get("speaker")
    if not isinstance(speaker, str) or speaker not in _SEEKER | _SUPPORTER:
        msg = f"speaker must be one of {sorted(_SEEKER | _SUPPORTER)}, got {speaker!r}"
        raise DataFormatError(path, msg, line, f"{where}.speaker")
    if not isinstance(raw.get(text_key), str):
        raise DataFormatError(path, "missing or not a string", line, f"{where}.{text_key}")
    if speaker in _SEEKER:
        return Turn("user", raw[text_key].strip()), None
    annotation = raw.get("annotation") if "annotation" in raw else raw  # ESConv | MultiESC
    strategy = annotation.get("strategy") if isinstance(annotation, Mapping) else None
    if strategy is not None and not isinstance(strategy, str):
        raise DataFormatError(path, "expected a string", line, f"{where}.strategy")
    return Turn("assistant", raw[text_key].strip()), strategy


def _dialog(
    obj: Any, index: int, path: Path, line: int | None, text_key: str, where: str
) -> SupportDialog:
    if not isinstance(obj, Mapping):
        raise DataFormatError(path, "expected a dialog object", line, where or None)
    raw = obj.get("dialog")
    if not isinstance(raw, list) or not raw:
        raise DataFormatError(path, "expected a non-empty list", line, f"{where}dialog")
    pairs = [_utterance(u, path, line, f"{where}dialog[{i}]", text_key) for i, u in enumerate(raw)]
    for key in ("situation", "emotion_type", "problem_type"):
        if not isinstance(obj.get(key, ""), str):
            raise DataFormatError(path, "expected a string", line, f"{where}{key}")
    core = ("dialog", "situation", "emotion_type", "problem_type")
    return SupportDialog(
        id=str(index),
        turns=tuple(t for t, _ in pairs),
        strategies=tuple(s for _, s in pairs),
        situation=obj.get("situation", ""),
        emotion=obj.get("emotion_type", ""),
        problem=obj.get("problem_type", ""),
        metadata={k: v for k, v in obj.items() if k not in core},
    )


def read_esconv(path: str | Path) -> list[SupportDialog]:
    """Read an ESConv-schema JSON list of dialogs (errors name `[dialog].dialog[i].field`)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, "expected a JSON list of dialogs")
    return [_dialog(obj, i, path, None, "content", f"[{i}].") for i, obj in enumerate(data)]


def iter_multiesc(path: str | Path) -> Iterator[SupportDialog]:
    """Stream MultiESC dialogs, one JSON object per line (errors name the line)."""
    path = Path(path)
    for i, (lineno, obj) in enumerate(iter_jsonl(path)):
        yield _dialog(obj, i, path, lineno, "text", "")


def dialog_sessions(dialog: SupportDialog) -> list[Session]:
    """One Session per supporter turn that follows a seeker turn.

    The session holds the dialog up to the latest seeker turn before the supporter turn;
    `response` is the supporter turn and metadata carries its `strategy`. Supporter turns said
    between that seeker turn and this one (a multi-message reply) go to
    `metadata["supporter_prefix"]`, since a session must end with the user's turn. Supporter
    turns before the seeker's first turn (greetings) have no question to answer and are skipped.

    Returns:
        Sessions with ids `{dialog.id}_{turn index}`.
    """
    out = []
    last_user = -1
    for i, (turn, strategy) in enumerate(zip(dialog.turns, dialog.strategies, strict=True)):
        if turn.role == "user":
            last_user = i
            continue
        if last_user < 0:
            continue
        meta = {
            "dialog": dialog.id,
            "strategy": strategy,
            "supporter_prefix": [t.content for t in dialog.turns[last_user + 1 : i]],
            "emotion": dialog.emotion,
            "problem": dialog.problem,
            "situation": dialog.situation,
        }
        turns = dialog.turns[: last_user + 1]
        out.append(Session(f"{dialog.id}_{i}", turns, response=turn.content, metadata=meta))
    return out


def dialogs_sessions(dialogs: Iterable[SupportDialog]) -> list[Session]:
    """`dialog_sessions` over many dialogs, concatenated."""
    return [s for d in dialogs for s in dialog_sessions(d)]


def _segment(text: str, path: Path, line: int, j: int) -> tuple[Turn, str | None]:
    m = _SEGMENT.fullmatch(text.strip())
    if m is None:
        msg = "expected '<flag> <speaker 0|1> <position> text'"
        raise DataFormatError(path, msg, line, f"utterance[{j}]")
    body = m.group(4).strip()
    if m.group(2) == "0":
        return Turn("user", body), None
    tag = _TAG.fullmatch(body)
    return (
        (Turn("assistant", tag.group(2)), tag.group(1)) if tag else (Turn("assistant", body), None)
    )


def iter_strategy_tsv(path: str | Path) -> Iterator[Session]:
    """Stream `devWithStrategy_short.tsv` examples as sessions (id = line number).

    The last utterance of a line is the supporter reply (`response`, `metadata["strategy"]`);
    the others form the session as in `dialog_sessions` (supporter turns after the last seeker
    turn go to `metadata["supporter_prefix"]`). Lines whose truncated context holds no seeker
    turn are skipped.
    """
    path = Path(path)
    for lineno, line in iter_lines(path):
        pairs = [_segment(seg, path, lineno, j) for j, seg in enumerate(line.split(" EOS "))]
        (reply, strategy), context = pairs[-1], [t for t, _ in pairs[:-1]]
        if reply.role != "assistant" or strategy is None:
            msg = "the last utterance must be a supporter turn with a [strategy]"
            raise DataFormatError(path, msg, lineno, f"utterance[{len(pairs) - 1}]")
        users = [i for i, t in enumerate(context) if t.role == "user"]
        if not users:  # the truncated context holds supporter turns only
            logger.debug("%s:%d: no seeker utterance before the reply; skipped", path, lineno)
            continue
        meta = {
            "strategy": strategy,
            "supporter_prefix": [t.content for t in context[users[-1] + 1 :]],
        }
        turns = tuple(context[: users[-1] + 1])
        yield Session(str(lineno), turns, response=reply.content, metadata=meta)

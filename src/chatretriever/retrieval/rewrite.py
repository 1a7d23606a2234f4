"""LLM query rewriting ("REW" of LLM4CS): a chat LLM turns the last question into a standalone one.

The rewrite is stored in `Session.rewrite`, so BM25 or any embedder can then search with the
"rewrite" formulation. Rewrites are cached in a JSONL file keyed by session id, model, prompt hash
and session content, appended to as rewrites are made, so a rerun costs nothing. A prompt longer
than its budget (`RewritePrompt.max_prompt_chars`) loses its oldest turns first, then the start of
its question; only such a cut prompt's key names the budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from chatretriever.errors import DataFormatError
from chatretriever.types import Session

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# A generator maps chat messages ([{"role", "content"}]) to the model's reply.
Generator = Callable[[list[dict[str, str]]], str]


@dataclass(frozen=True)
class RewritePrompt:
    """The instruction given to the rewriting LLM.

    Attributes:
        system: System message.
        template: User message; `{history}` and `{question}` are filled in.
        max_turn_chars: Earlier turns longer than this are cut (long answers fill small contexts).
        max_prompt_chars: The most characters of the user message (history, question and
            instruction): the oldest turns are dropped first, then a question longer than the
            room left alone keeps its end (see `build_messages`). Characters, not tokens: the
            prompt and its cache key do not depend on a tokenizer (the cache is read before any
            model loads); 12,000 is about 3,000 SmolLM2 tokens, twice the longest prompt of
            MTRAG or TREC CAsT 2021 (25 turns, 5,907 characters), so none of theirs is cut.
    """

    # Checked by hand on SmolLM2-135M-Instruct: the history as a chat transcript and a short
    # instruction after it gave usable rewrites more often than longer or few-shot prompts.
    system: str = "You are a helpful AI assistant."
    template: str = (
        "{history}\nUser: {question}\n\n"
        "Rewrite the user's last question so that it includes the topic from the conversation. "
        "Answer with the question only."
    )
    max_turn_chars: int = 400
    max_prompt_chars: int = 12_000

    @property
    def hash(self) -> str:
        """The prompt's identity in cache keys and run settings. The budget is left out: a
        prompt that fits it is the same under any budget (and keeps the keys it had before the
        budget existed); a cut prompt's key names the budget (`_key`)."""
        fields = dataclasses.asdict(self)
        del fields["max_prompt_chars"]
        raw = json.dumps(fields, sort_keys=True).encode("utf-8")
        return hashlib.sha256(raw).hexdigest()[:12]


# Marks the start of a question cut to its end (as " ..." marks the end of a cut turn).
_CUT_MARK = "... "


def build_messages(session: Session, prompt: RewritePrompt) -> list[dict[str, str]]:
    """The chat messages asking the LLM to rewrite the session's last question.

    The user message holds at most `prompt.max_prompt_chars` characters. When the whole
    conversation does not fit, the newest turns that fit beside the question are kept (the
    oldest dropped first); a question that alone does not fit keeps its end, where a long
    pasted turn asks, and no history. A prompt that fits is built as it always was.

    Args:
        session: The conversation; its last turn is the question to rewrite.
        prompt: The instruction and its limits.

    Returns:
        [system message, user message] as {"role", "content"} dicts.
    """
    return _fitted_messages(session, prompt)[0]


def _fitted_messages(session: Session, prompt: RewritePrompt) -> tuple[list[dict[str, str]], bool]:
    """`build_messages`, and whether the prompt was cut to its budget."""
    lines = []
    for t in session.history:
        if t.role == "system":
            continue
        text = " ".join(t.content.split())
        if len(text) > prompt.max_turn_chars:
            text = text[: prompt.max_turn_chars] + " ..."
        lines.append(f"{'User' if t.role == 'user' else 'Assistant'}: {text}")
    question = session.question.strip()
    user = prompt.template.format(history="\n".join(lines), question=question)
    cut = len(user) > prompt.max_prompt_chars
    if cut:
        user = _fit_user_message(lines, question, prompt)
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}], cut


def _fit_user_message(lines: list[str], question: str, prompt: RewritePrompt) -> str:
    """The user message within `max_prompt_chars` (the template names {history} and {question}
    once each): the question whole when it fits, with the newest history lines that fit beside
    it; else the question's end alone (the session template's over-long-turn rule)."""
    room = prompt.max_prompt_chars - len(prompt.template.format(history="", question=""))
    if room < 1:
        raise ValueError(
            f"max_prompt_chars={prompt.max_prompt_chars} leaves no room beside the instruction"
        )
    if len(question) > room:
        keep = room - len(_CUT_MARK)
        question = _CUT_MARK + question[-keep:] if keep > 0 else question[-room:]
        return prompt.template.format(history="", question=question)
    used, kept = len(question), []
    for line in reversed(lines):  # newest first
        used += len(line) + (1 if kept else 0)  # the newline joining it to the kept lines
        if used > room:
            break
        kept.append(line)
    return prompt.template.format(history="\n".join(reversed(kept)), question=question)


_PREFIX = re.compile(
    r"^\s*(?:\*\*)?(?:"
    r"(?:rewritten|standalone|rewrite[d]?|reformulated)?\s*(?:question|query)?"
    r"|(?:the\s+)?user(?:'s)?(?:\s+(?:asked|asks|is\s+asking|wants\s+to\s+know|question))?"
    r")\s*(?:\*\*)?\s*:\s*",
    re.IGNORECASE,
)


def clean_rewrite(text: str) -> str:
    """Keep the first line of a reply, without a "Rewritten question:" label, quotes or markup."""
    for line in text.strip().splitlines():
        line = _PREFIX.sub("", line.strip()) if ":" in line[:40] else line.strip()
        line = line.strip().strip("*\"'`“”").strip()
        if line:
            return line
    return ""


def _key(session: Session, model: str, prompt: RewritePrompt, cut: bool = False) -> str:
    """The cache key of a session's rewrite; `cut`: its prompt was cut to its budget."""
    parts: list[Any] = [session.id, session.messages(), model, prompt.hash]
    if cut:  # only a cut prompt depends on the budget: every other key stays as it was
        parts.append({"max_prompt_chars": prompt.max_prompt_chars})
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


class RewriteCache:
    """Rewrites on disk: a JSONL file read once, then appended to, one line per new rewrite.

    Each line is flushed as it is written, so a killed run keeps every rewrite it finished and a
    rerun appends only what is new (the file is never rewritten whole). A last line cut short by
    a kill is dropped when the cache is opened; on a repeated key the last line wins.

    Args:
        path: The cache file (plain JSONL, not gzip); created when missing. None keeps rewrites
            in memory only.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._rows: dict[str, dict[str, Any]] = {}
        self._file: IO[str] | None = None
        if self.path is None:
            return
        if self.path.suffix == ".gz":
            raise ValueError(f"{self.path}: the rewrite cache is plain JSONL (it is appended to)")
        if self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        raw = path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # a line cut short by a killed run: never completed, so drop it
            logger.warning("%s: dropping an unfinished last line", path)
            with open(path, "r+b") as f:
                f.truncate(end)
        for lineno, line in enumerate(raw[:end].decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, f"malformed JSON ({e.msg})", lineno) from None
            if not isinstance(row, dict):
                raise DataFormatError(path, "expected a JSON object {key, rewrite, ...}", lineno)
            for field in ("key", "rewrite"):
                if not isinstance(row.get(field), str):
                    got = "missing" if field not in row else f"a {type(row[field]).__name__}"
                    msg = f"expected a string, got {got} (not a cache this tool wrote?)"
                    raise DataFormatError(path, msg, lineno, field)
            self._rows[row["key"]] = row

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> str | None:
        row = self._rows.get(key)
        return None if row is None else row["rewrite"]

    def put(self, key: str, row: dict[str, Any]) -> None:
        """Keep a new rewrite and append it to the file as one flushed line."""
        self._rows[key] = {"key": key, **row}
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # closed by close()
        self._file.write(json.dumps(self._rows[key], ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def rewrite_sessions(
    sessions: Sequence[Session],
    generate: Generator,
    model: str,
    cache_path: str | Path | None = None,
    prompt: RewritePrompt | None = None,
    show_progress: bool = True,
) -> list[Session]:
    """Rewrite the last question of every session with an LLM.

    Args:
        sessions: Conversations to rewrite.
        generate: Chat messages -> reply text (see `hf_generator`).
        model: The generator's model name (part of the cache key).
        cache_path: JSONL cache file; cached rewrites are not generated again, new ones are
            appended as they are made (an interruption loses none).
        prompt: The instruction (its hash is part of the cache key).
        show_progress: Show a tqdm bar.

    Returns:
        The sessions with `rewrite` set; a dataset rewrite moves to metadata["dataset_rewrite"].
        First turns are their own rewrite; a reply sharing no word with the question (empty,
        an answer, a refusal) falls back to the question.
    """
    prompt = prompt or RewritePrompt()
    own = sum(s.rewrite is not None for s in sessions)
    if own:
        logger.warning(
            "%d of %d sessions carry the dataset's own rewrite (human ones, in most datasets): "
            "the LLM's replace it, the dataset's kept as metadata dataset_rewrite; "
            "search --formulation rewrite on the input file uses the dataset's",
            own,
            len(sessions),
        )
    cache = RewriteCache(cache_path)
    out, new, cut = [], 0, 0
    try:
        for s in tqdm(sessions, unit="session", desc="rewrite", disable=not show_progress):
            messages, was_cut = _fitted_messages(s, prompt)
            cut += was_cut
            key = _key(s, model, prompt, was_cut)
            text = cache.get(key)
            if text is None:
                text = _rewrite_one(s, generate, messages)
                cache.put(key, {"id": s.id, "model": model, "prompt": prompt.hash, "rewrite": text})
                new += 1
            meta = dict(s.metadata)
            if s.rewrite is not None:
                meta["dataset_rewrite"] = s.rewrite
            out.append(dataclasses.replace(s, rewrite=text, metadata=meta))
    finally:
        cache.close()
    if cut:
        logger.warning(
            "%d of %d rewrite prompts over max_prompt_chars=%d: their oldest turns were dropped "
            "(a question over it alone keeps its end)",
            cut,
            len(sessions),
            prompt.max_prompt_chars,
        )
    logger.info("%d rewrites generated, %d from the cache", new, len(sessions) - new)
    return out


def _rewrite_one(session: Session, generate: Generator, messages: list[dict[str, str]]) -> str:
    if not any(t.role != "system" for t in session.history):
        return session.question  # nothing to resolve: no need for the LLM
    text = clean_rewrite(generate(messages))
    if not _shares_a_word(text, session.question):
        # Small LLMs sometimes answer or refuse instead of rewriting: such a reply shares no
        # word with the question, and the question itself is the safer query.
        logger.warning("implausible rewrite for session %r: keeping its question", session.id)
        return session.question
    return text


# Words too common to show that a reply is about the question.
_COMMON = frozenset(
    "a an and are as at be but by for i if in is it me my of on or so that the this to too "
    "was we with you your".split()
)


def _shares_a_word(text: str, question: str) -> bool:
    def words(s: str) -> set[str]:
        return set(re.findall(r"\w+", s.lower())) - _COMMON

    return bool(words(question) & words(text))


def hf_generator(
    model_name: str = DEFAULT_MODEL, max_new_tokens: int = 64, device: str | None = None
) -> Generator:
    """A greedy chat generator over a causal LM loaded with `load_backbone(kind="causal")`.

    Args:
        model_name: A built-in chat model name, a local model directory or a `.gguf` file.
        max_new_tokens: The most tokens of one rewrite (rewrites are short).
        device: Where to run ("cpu", "cuda", ...); default the current accelerator, else CPU.

    Returns:
        messages -> reply text.
    """
    from chatretriever.modeling.backbones import default_device, generate_reply, load_backbone

    model, tokenizer = load_backbone(model_name, kind="causal")
    model.to(default_device() if device is None else device)

    def generate(messages: list[dict[str, str]]) -> str:
        return generate_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens)

    return generate

"""Chat prompts as token ids within a budget: cut by whole turns, the best passages kept.

Used by every grounded answer (`grounded.GroundedGenerator`) and by UniConv's CII training
contexts, so that training and answering cut a long prompt the same way. A prompt
[system, *history, last message] (`grounded.grounded_messages`, or any chat prompt) longer than
the budget is fitted in this order:

1. The system message and the generation prompt stay. (Only a budget too small to leave the last
   message half of it, or all of it when shorter, cuts the system message's end; it takes back
   what the fitted last message then leaves, as when a passage stub is dropped.)
2. The last message: a grounded one ("Passages:\\n[1] ...\\n\\nQuestion: q") drops its
   lowest-ranked passages first (k, k-1, ..., 2); then passage [1]'s text is shortened (its
   "[1] title: " and its start kept), down to half the room the question leaves; then the
   question is cut from its start (its end, where a long pasted turn asks, is kept). A passage
   left with only a few tokens of text is dropped too, and the question alone gets the room.
   Any other last message is cut from its start. Cuts land on a space when one is near
   (`grounded_text`: the grounded message's text, built and parsed back, and its cuts).
3. History is added back newest first, in whole exchanges (a cut always lands on a user turn),
   while it fits.

A prompt that fits gets exactly the ids the tokenizer gives its chat-template text, except that
message contents are user text: they are tokenized with no control string matched
(`content_ids.ContentTokenizer`: special added tokens, and non-special ones that the chat
template writes, such as Qwen's "<tool_call>"), so a literal "<|im_end|>" or "[EMB_1]" in a
passage or a turn stays text. Other added tokens (Gemma's "<b>", its newline runs) come out as
the tokenizer gives them. The template is rendered once per role sequence with placeholders for
the contents; the text between two of its added tokens (template text and contents) is tokenized
as one run, as the tokenizer tokenizes the full text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from chatretriever.modeling.chat_render import PLAIN_TEMPLATE
from chatretriever.modeling.content_ids import ContentTokenizer
from chatretriever.modeling.grounded_text import (
    LINE_HEADER,
    LINE_START,
    cut_line,
    cut_text,
    cut_text_start,
    grounded_user_content,
    split_grounded_user,
)
from chatretriever.modeling.session_fit import exchange_cuts

logger = logging.getLogger(__name__)

# The fitting rule above, named for caches of generated answers (a changed rule changes them)
FIT_RULE = "turns-v2"
# Fewer tokens of passage [1]'s text than this tell the model nothing: the question takes the room.
_MIN_PASSAGE_TOKENS = 8
# Text runs cached per fitter: enough for one prompt's history runs and its bisection steps. A
# run of ten passages is ~3,000 ids (~100 KB as a tuple): 8,192 of them would take ~800 MB.
_CACHED_RUNS = 1024
_SLOT = "@@GROUNDED_SLOT_{}@@"
# Tabs around each placeholder: a template that strips contents (`| trim`) strips them too.
_SLOT_RE = re.compile(r"(\t?)@@GROUNDED_SLOT_(\d+)@@(\t?)")
_MAX_LAYOUTS = 1024  # cached renderings of role sequences

Message = tuple[str, str]  # (role, content)


@dataclass
class FitCounts:
    """What a `PromptFitter` cut so far (one count per prompt, or per message / passage).

    Attributes:
        prompts: Prompts fitted.
        prompts_cut: Of them, prompts over the budget.
        history_messages_dropped: History messages left out (oldest first, whole exchanges).
        passages_dropped: Lowest-ranked passages left out.
        passages_shortened: Prompts whose passage [1] was shortened.
        questions_cut: Prompts whose last message lost its start.
        systems_cut: Prompts whose system message lost its end (a budget too small for it).
    """

    prompts: int = 0
    prompts_cut: int = 0
    history_messages_dropped: int = 0
    passages_dropped: int = 0
    passages_shortened: int = 0
    questions_cut: int = 0
    systems_cut: int = 0

    def add(self, other: FitCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class _Slot:
    """Where message `index`'s content goes; whether the template strips its sides."""

    index: int
    lstrip: bool
    rstrip: bool


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The largest n in [lo, hi] with ok(n), by bisection (ok holds up to some n, then fails);
    lo - 1 when ok(lo) fails."""
    best = lo - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _fit_start(content: str, total: Callable[[str], int], budget: int, what: FitCounts) -> str:
    """The last message's content cut from its start (its end kept) to fit the budget."""
    what.questions_cut = 1
    n = _largest(0, len(content), lambda n: total(cut_text_start(content, n)) <= budget)
    return cut_text_start(content, n)


class PromptFitter:
    """Chat prompts (with the generation prompt) -> token ids of at most a budget.

    Args:
        tokenizer: A Hugging Face tokenizer (its chat template; a plain "role: content" one
            without).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.contents = ContentTokenizer(tokenizer, cache_size=_CACHED_RUNS)
        self.counts = FitCounts()
        self._chat_template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
        self._layouts: dict[tuple[str, ...], tuple[int | str | _Slot, ...]] = {}
        self._warned = False

    def fit_batch(
        self, prompts: Sequence[Sequence[Mapping[str, str]]], max_tokens: int
    ) -> list[list[int]]:
        """Token ids of each prompt, fitted to `max_tokens` (see the module docstring).

        Args:
            prompts: Chat messages ({"role", "content"}) per prompt.
            max_tokens: The most ids per prompt.

        Returns:
            One id list per prompt, each at most `max_tokens` long; a prompt that fits is
            tokenized whole, in one tokenizer call for all of them.

        Raises:
            ValueError: The chat template's framing alone does not fit `max_tokens`, or it
                drops or alters a message's content (a prompt ending with a system message,
                under Gemma's templates).
        """
        messages = [[(m["role"], m["content"]) for m in p] for p in prompts]
        out = self._ids_batch(messages)
        cut = FitCounts(prompts=len(messages))
        for i, msgs in enumerate(messages):
            if len(out[i]) > max_tokens:
                out[i], what = self._fit_one(msgs, max_tokens)
                logger.debug("prompt %d of %d cut: %s", i, len(messages), what)
                cut.add(what)
        self.counts.add(cut)
        if cut.prompts_cut and not self._warned:  # once: training meets it every batch
            self._warned = True
            logger.warning(
                "%d of %d prompts are longer than %d tokens: fitted by dropping old history and "
                "the lowest-ranked passages, then cutting passage [1]'s end and the question's "
                "start (%s; later cuts are counted, not logged)",
                cut.prompts_cut,
                cut.prompts,
                max_tokens,
                ", ".join(f"{k} {v}" for k, v in list(cut.as_dict().items())[2:] if v),
            )
        return out

    # ---------------------------------------------------------------- fitting one prompt
    def _fit_one(self, msgs: list[Message], budget: int) -> tuple[list[int], FitCounts]:
        lead = msgs[:1] if len(msgs) > 1 and msgs[0][0] == "system" else []
        history, (role, content) = msgs[len(lead) : -1], msgs[-1]
        what = FitCounts(prompts_cut=1)
        short = self._fit_system(lead, role, content, budget, what)
        last = (role, self._fit_last(short, role, content, budget, what))
        if short != lead:  # cut for a last message that came out shorter (a dropped passage)
            grown = self._fit_system(lead, role, last[1], budget, FitCounts())
            if grown != short and self._length([*grown, last]) <= budget:
                short, what.systems_cut = grown, int(grown != lead)
        lead = short
        cuts = exchange_cuts([role for role, _ in history])
        # cuts[-1] (no history) fits: the most history that still fits, newest first
        back = _largest(
            0,
            len(cuts) - 1,
            lambda j: self._length([*lead, *history[cuts[-1 - j] :], last]) <= budget,
        )
        start = cuts[-1 - back]
        what.history_messages_dropped = start
        return self._ids_batch([[*lead, *history[start:], last]])[0], what

    def _fit_system(
        self, lead: list[Message], role: str, content: str, budget: int, what: FitCounts
    ) -> list[Message]:
        """The system message, whole unless it leaves the last message less than half the
        budget (or less than all of it, when shorter): then its end is cut."""
        if not lead:
            return lead
        reserve = min(self._count(content), budget // 2)

        def fits(system: str) -> bool:
            return self._length([("system", system), (role, "")]) + reserve <= budget

        system = lead[0][1]
        if fits(system):
            return lead
        n = _largest(0, len(system), lambda n: fits(cut_text(system, n)))
        what.systems_cut = 1
        return [("system", cut_text(system, max(n, 0)))]

    def _fit_last(
        self, lead: list[Message], role: str, content: str, budget: int, what: FitCounts
    ) -> str:
        """The last message's content, fitted with the system message and no history."""

        def total(text: str) -> int:
            return self._length([*lead, (role, text)])

        if total(content) <= budget:
            return content
        frame = total("")
        if frame >= budget:
            raise ValueError(
                f"a prompt budget of {budget} tokens leaves no room for the last message: the "
                f"chat template and the system message take {frame}"
            )
        parsed = split_grounded_user(content) if role == "user" else None
        if parsed is not None and total(grounded_user_content([""], "")) < budget:
            lines, question = parsed
            n = _largest(
                1, len(lines), lambda j: total(grounded_user_content(lines[:j], question)) <= budget
            )
            what.passages_dropped = len(lines) - max(n, 1)
            if n >= 1:
                return grounded_user_content(lines[:n], question)
            return self._fit_passage_and_question(lines[0], question, total, budget, what)
        return _fit_start(content, total, budget, what)

    def _fit_passage_and_question(
        self,
        line: str,
        question: str,
        total: Callable[[str], int],
        budget: int,
        what: FitCounts,
    ) -> str:
        """Passage [1] and the question in the room left (`_share_room`); a passage left with
        fewer than `_MIN_PASSAGE_TOKENS` tokens of its text ("[", "[1] title:") is dropped and
        the question, alone, gets all the room."""
        passage, q = self._share_room(line, question, total, budget)
        head, number = LINE_HEADER.match(line), LINE_START.match(line)
        # Cut inside its header ("title" may be the text's own ": "), the text starts after "[i] "
        if head and len(passage) >= head.end() - 1:
            text = passage[head.end() :]
        else:
            text = passage[number.end() if number else 0 :]
        if passage != line and self._count(text) < _MIN_PASSAGE_TOKENS:
            what.passages_dropped += 1
            return _fit_start(question, total, budget, what)
        what.passages_shortened = int(passage != line)
        what.questions_cut = int(q != question)
        return grounded_user_content([passage], q)

    def _share_room(
        self, line: str, question: str, total: Callable[[str], int], budget: int
    ) -> tuple[str, str]:
        """(passage [1], question) that fit: a question up to half the room stays whole and the
        passage's end is cut; a longer one leaves the passage half the room (all it needs, when
        less) and loses its start."""

        def build(passage: str, q: str) -> str:
            return grounded_user_content([passage], q)

        room = budget - total(build("", ""))
        q_tokens = self._count(question)
        if q_tokens <= room // 2:
            n = _largest(
                0, len(line), lambda n: total(build(cut_line(line, n), question)) <= budget
            )
            if n >= 0:
                return cut_line(line, n), question
        floor = min(self._count(line), max(room - q_tokens, room // 2))
        n = _largest(0, len(line), lambda n: self._count(cut_line(line, n)) <= floor)
        short = cut_line(line, max(n, 0))
        n = _largest(
            0, len(question), lambda n: total(build(short, cut_text_start(question, n))) <= budget
        )
        if n >= 0:
            return short, cut_text_start(question, n)
        # tokens joined across the pieces count more than apart: the passage gives way
        n = _largest(0, len(short), lambda n: total(build(cut_line(short, n), "")) <= budget)
        return cut_line(short, max(n, 0)), ""

    # ---------------------------------------------------------------- rendering to ids
    def _count(self, text: str) -> int:
        """Tokens of user text on its own."""
        return len(self.contents.encode([text])[0])

    def _length(self, msgs: list[Message]) -> int:
        return len(self._ids_batch([msgs])[0])

    def _layout(self, roles: tuple[str, ...]) -> tuple[int | str | _Slot, ...]:
        """Messages with these roles rendered with the generation prompt: the template's
        added-token ids, its text, and the slots of the contents (rendered once per roles)."""
        layout = self._layouts.get(roles)
        if layout is not None:
            return layout
        msgs = [{"role": r, "content": f"\t{_SLOT.format(i)}\t"} for i, r in enumerate(roles)]
        text = self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, chat_template=self._chat_template
        )
        parts = _SLOT_RE.split(text)  # [text, "\t", "0", "\t", text, ..., text]
        # Any order (Mistral's puts the system message into the last user turn), but each
        # content once and unaltered.
        if sorted(int(i) for i in parts[2::4]) != list(range(len(roles))):
            if roles[-1] == "system":  # Gemma's put a system message into the next user turn
                raise ValueError(
                    "a prompt ends with a system message, and this chat template drops it (it "
                    "puts a system message's text into the user turn after it): end the prompt "
                    "with a user message"
                )
            raise ValueError("the chat template alters, drops or repeats message contents")
        items: list[int | str | _Slot] = []
        for i in range(0, len(parts), 4):
            items += self.contents.split_added(parts[i])
            if i + 3 < len(parts):
                items.append(_Slot(int(parts[i + 2]), not parts[i + 1], not parts[i + 3]))
        if len(self._layouts) >= _MAX_LAYOUTS:
            self._layouts.clear()
        self._layouts[roles] = layout = tuple(items)
        return layout

    def _pieces(self, msgs: list[Message]) -> list[int | str]:
        """The prompt as added-token ids and runs of text (template text joined with contents)."""
        pieces: list[int | str] = []
        run: list[str] = []
        for item in self._layout(tuple(role for role, _ in msgs)):
            if isinstance(item, int):
                if run:
                    pieces.append("".join(run))
                    run = []
                pieces.append(item)
            elif isinstance(item, _Slot):
                text = msgs[item.index][1]
                text = text.lstrip() if item.lstrip else text
                run.append(text.rstrip() if item.rstrip else text)
            else:
                run.append(item)
        if run:
            pieces.append("".join(run))
        return pieces

    def _ids_batch(self, prompts: Sequence[list[Message]]) -> list[list[int]]:
        """The whole ids of each prompt; the text runs missing from the cache in one tokenizer
        call (a bisection step re-renders the history runs of the step before)."""
        return self.contents.ids_of_batch([self._pieces(msgs) for msgs in prompts])

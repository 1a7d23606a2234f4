"""Rendering messages with a tokenizer's chat template into token ids, contents kept as text.

`ChatRenderer` renders a role sequence once with placeholders for the contents, splits the text at
the template's added tokens and caches the layout; `frames` then gives, for any message list, the
ids before and after the last message's content (earlier contents tokenized inside their runs, as
the tokenizer tokenizes a full rendering, with no added token matched inside user text), and
`whole_ids` the ids of the whole rendering (the last content inside its run too). The
retrieval inputs built on it (EMB tokens, CSIT sequences) are `template.py`'s; fitting a session
in its budget is `session_fit.py`'s.

System messages: some templates (SmolLM2, Qwen2.5) inject a default system message ("You are a
helpful AI assistant named SmolLM...", ~20 tokens) whenever the conversation has none. When
`system_prompt` is None and the template is detected to inject one, an explicit EMPTY system
message is passed instead, so only the template's few framing tokens remain.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatretriever.modeling.content_ids import ContentTokenizer
from chatretriever.types import Turn

logger = logging.getLogger(__name__)

# Placeholders for message contents: the rendered text is split around them.
_SLOT = "@@CHATRETRIEVER_SLOT@@"
_SLOT_FORMAT = "@@CHATRETRIEVER_SLOT_{}@@"
_SLOT_RE = re.compile(r"@@CHATRETRIEVER_SLOT_(\d+)@@")
_PROBE_SYSTEM = "\x01SYSTEM-PROBE\x02"
_PROBE_USER = "\x01USER-PROBE\x02"
_TRIM_PROBES = (("system", _PROBE_SYSTEM), ("user", _PROBE_USER), ("assistant", "\x01A-PROBE\x02"))
_MAX_LAYOUTS = 1024  # cached renderings of role sequences
# Llama 3.x templates print today's date unless given one: fix it so embeddings do not change daily.
_FIXED_DATE = "26 Jul 2024"
# Used only when a tokenizer carries no chat template (e.g. a base model).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

Frame = tuple[list[int], list[int]]


@dataclass(frozen=True)
class _Slot:
    """Where the content of message `index` goes in a rendered role sequence."""

    index: int


class ChatRenderer:
    """A tokenizer's chat template as token-id frames around message contents.

    Args:
        tokenizer: A Hugging Face tokenizer (its chat template, or `PLAIN_TEMPLATE` without one).
        system_prompt: None = no system message (an injected default is replaced by an empty
            one, see the module docstring), or the system message of every input.

    Attributes:
        contents: The `ContentTokenizer` of user text (no control token ever matched).
        system: The system message(s) prepended to passages and to sessions without their own.
        system_turns: The same as Turns.
        passage_frame: (ids before, ids after) a lone assistant message's content.
        response_frame: (header ids, end-of-turn ids) of the assistant turn after a session.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self._chat_template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
        if self._chat_template is PLAIN_TEMPLATE:
            logger.info("tokenizer has no chat template: using a plain 'role: content' one")
        self.contents = ContentTokenizer(tokenizer)  # user text -> ids, no control token
        self._layouts: dict[tuple[str, ...], tuple[int | str | _Slot, ...]] = {}
        self.system: list[dict[str, str]] = []
        if system_prompt is not None:
            self.system = [{"role": "system", "content": system_prompt}]
        elif self.injects_default_system():
            self.system = [{"role": "system", "content": ""}]
        self.system_turns = tuple(Turn(m["role"], m["content"]) for m in self.system)
        self._trimmed = self._trimmed_roles()
        self.passage_frame = self.frames([[*self.system_turns, Turn("assistant", "")]])[0]
        self.response_frame = self._response_frame_ids()

    def render(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> str:
        """The chat template's text of `messages` (no system message is added here)."""
        return self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=self._chat_template,
            date_string=_FIXED_DATE,
        )

    def injects_default_system(self) -> bool:
        """Whether the chat template adds its own system message when none is given.

        Compares [user] with [system=probe, user]: text found in the first rendering where the
        second holds the probe is an injected default system message.
        """
        user = {"role": "user", "content": _PROBE_USER}
        try:
            plain = self.render([user])
            with_system = self.render([{"role": "system", "content": _PROBE_SYSTEM}, user])
        except Exception:  # templates without a system role raise from Jinja
            return False
        prefix = 0
        while prefix < min(len(plain), len(with_system)) and plain[prefix] == with_system[prefix]:
            prefix += 1
        suffix = 0
        limit = min(len(plain), len(with_system)) - prefix
        while suffix < limit and plain[-1 - suffix] == with_system[-1 - suffix]:
            suffix += 1
        injected = plain[prefix : len(plain) - suffix]
        return _PROBE_SYSTEM in with_system and bool(injected.strip())

    def _trimmed_roles(self) -> frozenset[str]:
        """Roles whose content the template strips of surrounding whitespace (`| trim`).

        Llama 3 and Gemma templates do; earlier turns are then stripped as rendering would.
        """
        for probes in (_TRIM_PROBES, _TRIM_PROBES[1:]):
            try:
                text = self.render([{"role": r, "content": f" {p} "} for r, p in probes])
            except Exception:  # e.g. a template without a system role
                continue
            return frozenset(r for r, p in probes if p in text and f" {p} " not in text)
        return frozenset()

    def _layout(self, roles: tuple[str, ...]) -> tuple[int | str | _Slot, ...]:
        """Messages with these roles rendered: the template's added-token ids, its text, slots.

        A rendering depends on the roles only, so each role sequence is rendered once.
        """
        layout = self._layouts.get(roles)
        if layout is not None:
            return layout
        msgs = [{"role": r, "content": _SLOT_FORMAT.format(i)} for i, r in enumerate(roles)]
        try:
            text = self.render(msgs)
        except Exception as e:
            if roles[-1] != "assistant":
                raise
            # Some templates insist on user/assistant alternation: a lone passage is then a user
            # message.
            logger.warning(
                "chat template rejects a lone assistant message (%s): passages are "
                "rendered as user messages",
                e,
            )
            layout = self._layout((*roles[:-1], "user"))
        else:
            parts = _SLOT_RE.split(text)  # [text, "0", text, "1", ..., text]
            if parts[1::2] != [str(i) for i in range(len(roles))]:
                raise ValueError("the chat template alters message contents; cannot place them")
            items: list[int | str | _Slot] = []
            for i, frame in enumerate(parts[::2]):
                items += [_Slot(i - 1)] if i else []
                pieces = self.contents.split_added(frame)
                if self.contents.ids_of(pieces) != self._tok(frame):
                    logger.warning("template text %r tokenizes differently in pieces", frame)
                items += pieces
            layout = tuple(items)
        if len(self._layouts) >= _MAX_LAYOUTS:
            self._layouts.clear()
        self._layouts[roles] = layout
        return layout

    def _pieces(self, messages: Sequence[Turn]) -> tuple[list[int | str], list[int | str]]:
        """The rendering of `messages` before and after the last one's content.

        Each piece is a template added-token id or a run of text between two of them: template
        text joined with the earlier messages' contents, tokenized as one text as the tokenizer
        tokenizes the full rendering, but with no added token matched inside.
        """
        sides: tuple[list[int | str], list[int | str]] = ([], [])
        side, run = 0, []
        for item in self._layout(tuple(m.role for m in messages)):
            if isinstance(item, str):
                run.append(item)
            elif isinstance(item, _Slot) and item.index < len(messages) - 1:
                run.append(self.content_text(messages[item.index]))
            else:  # a template token, or the last content's slot: the run ends
                if run:
                    sides[side].append("".join(run))
                    run = []
                if isinstance(item, int):
                    sides[side].append(item)
                else:
                    side = 1
        if run:
            sides[side].append("".join(run))
        return sides

    def frames(self, sessions: Sequence[Sequence[Turn]]) -> list[Frame]:
        """Ids before and after the last message's content of each message list.

        The text runs missing from the cache are tokenized in one call.
        """
        pieces = [self._pieces(messages) for messages in sessions]
        ids = self.contents.ids_of_batch([side for pair in pieces for side in pair])
        return list(zip(ids[::2], ids[1::2], strict=True))

    def whole_ids(self, sessions: Sequence[Sequence[Turn]]) -> list[list[int]]:
        """Ids of each message list's whole rendering, its last content tokenized in its run.

        As `frames` with the last content between them, except at its edges: joined with the
        template text around it, as the tokenizer tokenizes the full text (SmolLM2's "user\\n" +
        "\\n\\nq" is "\\n\\n" + "\\n" + "q" there). No control string is matched in any content.

        Args:
            sessions: Message lists (the last content may be empty).

        Returns:
            Token ids per message list; the text runs missing from the cache are tokenized in
            one call.
        """
        runs: list[list[int | str]] = []
        for messages in sessions:
            pre, post = self._pieces(messages)
            head = pre.pop() if pre and isinstance(pre[-1], str) else ""
            tail = post.pop(0) if post and isinstance(post[0], str) else ""
            run = head + self.content_text(messages[-1]) + tail
            runs.append([*pre, *([run] if run else []), *post])
        return self.contents.ids_of_batch(runs)

    def content_text(self, message: Turn) -> str:
        """A message's content as the template renders it: stripped where it `| trim`s its role."""
        return message.content.strip() if message.role in self._trimmed else message.content

    def _split(self, text: str) -> Frame:
        if text.count(_SLOT) != 1:
            raise ValueError("the chat template alters message contents; cannot place the content")
        before, after = text.split(_SLOT)
        return self._tok(before), self._tok(after)

    def _response_frame_ids(self) -> Frame:
        """The assistant turn that follows a session: (header ids, end-of-turn ids).

        Read once from a dummy session: [session + assistant] minus [session].
        """
        session = self.system + [{"role": "user", "content": "Hi"}]
        head = self.render(session)
        full = self.render(session + [{"role": "assistant", "content": _SLOT}])
        if not full.startswith(head):
            logger.warning("chat template re-renders earlier turns: responses use passage format")
            return self.passage_frame
        return self._split(full[len(head) :])

    def _tok(self, text: str) -> list[int]:
        """Ids of template text (its special tokens such as <|im_start|> are parsed)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

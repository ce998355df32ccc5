"""A reply as it streams: its text, cut at stop strings, with the model's tool calls taken out.

Generated token ids go in one at a time (``Reply.add``); out come the text that is safe to show
and the tool calls that completed. Three stages, each holding back what it cannot decide yet:

1. ``ReplyDecoder``: ids to text, equal to ``tokenizer.decode`` of all of them (a partial
   UTF-8 character waits for its next bytes);
2. stop strings: text that could be the start of one waits until it cannot;
3. tool calls: mlx-lm's ``TextStateMachine`` splits the text at the model family's tool-call
   markers (mlx-lm's tool parser module for the chat template gives them); text between
   markers is parsed by that module's ``parse_tool_call`` when the end marker arrives (or when
   the reply ends inside a call).

The stored assistant message is ``content`` (the text outside tool calls) plus ``tool_calls``:
what an API client sends back, so that the next turn renders the same conversation. A call that
does not parse stays in the content, markers and all: nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from mlx_lm.generate import TextStateMachine
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolCall:
    """A call of a tool by the model."""

    id: str
    name: str
    arguments: str  # a JSON object text

    def message_part(self) -> dict[str, Any]:
        """The call as an assistant message carries it (OpenAI's shape, arguments as an object,
        which is what chat templates render)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.loads(self.arguments)}}


@dataclass(frozen=True)
class ToolFormat:
    """A model family's tool-call markers and parser (an ``mlx_lm.tool_parsers`` module)."""

    start: str
    end: str
    parse: Callable[[str, Any], Any]

    @classmethod
    def of(cls, tokenizer: Any) -> "ToolFormat | None":
        """The format mlx-lm inferred for this tokenizer's chat template, or None."""
        if not getattr(tokenizer, "has_tool_calling", False) or tokenizer.tool_parser is None:
            return None
        return cls(tokenizer.tool_call_start, tokenizer.tool_call_end or "", tokenizer.tool_parser)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ReplyDecoder:
    """A reply's text as it streams, equal to ``tokenizer.decode`` of its ids.

    The committed reply is rendered again next turn; text that decodes differently from the
    generated ids re-tokenizes into other ids, and the cache is re-prefilled from there.
    """

    def __init__(self, tokenizer: Any):
        self._detok = tokenizer.detokenizer  # a fresh copy per call
        if isinstance(self._detok, BPEStreamingDetokenizer):
            # mlx-lm drops a leading space of the first token (a display nicety); decode() keeps it.
            self._detok._maybe_trim_space = lambda text: text

    def add(self, token: int) -> str:
        """Feed one token; returns the text it completes (possibly empty)."""
        self._detok.add_token(token)
        return self._detok.last_segment

    def finish(self, *, cut: bool) -> str:
        """The text still held back. ``cut``: the reply ended at ``max_tokens``, possibly in the
        middle of a character, whose bytes are dropped rather than stored as U+FFFD."""
        self._detok.finalize()
        segment = self._detok.last_segment
        return segment.rstrip("\ufffd") if cut else segment


class Reply:
    """One reply's text, stop strings and tool calls (see the module doc).

    ``tool_format`` None: tool calls are not looked for (no tools, ``tool_choice`` "none", or a
    template without a tool format). ``prefix``: text the reply starts with that the prompt
    already holds (a forced tool-call marker); it counts as the model's own.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        stop: Sequence[str] = (),
        tool_format: ToolFormat | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        prefix: str = "",
    ):
        self._decoder = ReplyDecoder(tokenizer)
        self._stops = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._raw = ""  # decoded text not yet past the stop-string stage
        self._format = tool_format
        self._tools = list(tools or [])
        if tool_format is not None:
            machine = TextStateMachine({"normal": [(tool_format.start, "tool")],
                                        "tool": [(tool_format.end, "normal")] if tool_format.end else []})
            self._state = machine.make_state("normal")
        self._call_text: str | None = None  # inside a call: its text so far
        self.content = ""
        self.tool_calls: list[ToolCall] = []
        self.stopped = False  # a stop string was produced
        if prefix:
            self._route(prefix)

    def add(self, token: int) -> tuple[str, list[ToolCall]]:
        """Feed one generated token; returns the content it releases and the calls it completes.
        After a stop string (``stopped``), the reply is over: feed nothing more."""
        return self._release(self._decoder.add(token), final=False)

    def finish(self, *, cut: bool) -> tuple[str, list[ToolCall]]:
        """The reply ended (end of turn: ``cut`` False; max_tokens: True): release everything
        still held back."""
        if self.stopped:
            return "", []
        return self._release(self._decoder.finish(cut=cut), final=True)

    def message(self) -> dict[str, Any]:
        """The assistant message to store (and to render next turn)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [c.message_part() for c in self.tool_calls]
        return message

    # -- stages ---------------------------------------------------------------------------

    def _release(self, text: str, *, final: bool) -> tuple[str, list[ToolCall]]:
        """Stop strings: pass on the text that cannot be (the start of) one."""
        before, calls_before = len(self.content), len(self.tool_calls)
        if self._stops:
            self._raw += text  # what was held back (shorter than any stop string) and the new
            cut = _earliest(self._raw, self._stops)
            if cut is not None:
                self.stopped = True
                self._route(self._raw[:cut], final=True)
                self._raw = ""
            else:
                safe = len(self._raw) if final else max(0, len(self._raw) - self._hold)
                self._route(self._raw[:safe], final=final)
                self._raw = self._raw[safe:]
        else:
            self._route(text, final=final)
        return self.content[before:], self.tool_calls[calls_before:]

    def _route(self, text: str, *, final: bool = False) -> None:
        """Tool calls: content to ``content``, call text to the parser."""
        if self._format is None:
            self.content += text
            return
        self._state, segments = TextStateMachine.split(self._state, text)
        if final:
            self._state, rest, _ = TextStateMachine.flush(self._state)
            segments.append((self._state[0], rest))
        for state, piece in segments:
            if state == "tool":
                if self._call_text is None:
                    self._call_text = ""
                self._call_text += piece
            else:
                if self._call_text is not None:
                    self._close_call(ended=True)
                self.content += piece
        if final and self._call_text is not None:
            self._close_call(ended=False)

    def _close_call(self, *, ended: bool) -> None:
        text, self._call_text = self._call_text, None
        calls = self._parse(text)
        if calls is None:
            # Unparsable (cut by max_tokens, or not the format): kept as the model wrote it.
            self.content += self._format.start + text + (self._format.end if ended else "")
            return
        self.tool_calls += calls

    def _parse(self, text: str) -> list[ToolCall] | None:
        try:
            parsed = self._format.parse(text, self._tools)
        except Exception as exc:  # noqa: BLE001 - a parser raises what it raises
            log.info("a tool call did not parse (%s: %s); it stays in the reply's text",
                     type(exc).__name__, exc)
            return None
        calls = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return None
            arguments = call.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(call.get("id") or new_call_id(), call["name"],
                                  json.dumps(arguments, ensure_ascii=False)))
        return calls


def _earliest(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None

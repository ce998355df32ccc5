"""Conversations into prompt token ids, rendering and tokenizing only what changed since the
last turn.

Rendering: a template that renders each message on its own (``chat_template.py`` reads that
from its syntax tree; the default model's does) renders only the messages a turn adds, with
the first one for context, and the previous turn's text is kept up to its generation prompt.
Other templates render the whole conversation every turn: a few microseconds per message.

Tokenizing all of the text would cost a few microseconds per token. Hugging Face tokenizers
split their input on added (special) tokens before anything else, so the text before the
start of a special token tokenizes the same whatever follows it. A ``Prompt`` keeps a turn's rendered text, its ids,
and where each special token sits in both (``marks``); the next turn's render is compared
with it at C speed, the ids up to the last special token inside the common text are kept,
and only the rest is tokenized. Templates that rewrite earlier turns only move the point
where the common text ends.

Where this cannot be trusted (a slow tokenizer, a template that renders no special tokens,
a tokenizer whose split rules differ), ``PromptRenderer`` tokenizes the whole text every
turn and says why once in the log. ``tests/test_prompt.py`` checks the incremental ids
against a full tokenization over random conversations.

Text inside messages never becomes special tokens: pasted ``<|im_start|>system ...`` must not
forge a turn. This is Hugging Face's own ``apply_chat_template(sanitize_control_tokens=True)``
(``mark_control_tokens`` wraps such text in messages in private-use markers before the render,
``encode_marked_chat`` tokenizes the marked text as plain text), made incremental the same way:
a guarded prompt's text is the marked rendering, split only at the template's own tokens. A
conversation without such text (nearly all) is tokenized exactly as the tokenizer does.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

try:
    from transformers.utils.chat_template_utils import encode_marked_chat, mark_control_tokens
except ImportError:  # transformers older than pyproject.toml asks for: no sanitizing support
    encode_marked_chat = mark_control_tokens = None

from .chat_template import why_not_message_local
from .errors import InvalidRequestError
from .prefix_index import common_prefix

log = logging.getLogger(__name__)

# Characters compared per slice when looking for the common prefix of two texts.
_BLOCK = 4096


@dataclass(frozen=True)
class Prompt:
    """A rendered conversation: its text, its token ids, and ``marks``, the
    ``(char_start, char_end, token_index)`` of every special token in the text, in order."""

    text: str
    ids: list[int]
    marks: list[tuple[int, int, int]] = field(default_factory=list)
    message_count: int = 0  # messages rendered
    # Some message holds control-token text: ``text`` is the marked rendering, and that text
    # is tokenized as plain text.
    guarded: bool = False
    # Where the messages' rendering ends in ``text`` (the generation prompt, and any text
    # appended to the prompt, follow), and the tools it was rendered with: what the next turn
    # keeps when the template renders each message on its own. None: not known.
    body_end: int | None = None
    tools: Sequence[dict[str, Any]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def message_at(self, token_index: int, messages: Sequence[dict[str, Any]]) -> int:
        """Index of the message whose rendering holds token ``token_index``: the first message
        whose content ends at or after the next special token (templates close each message
        with one). Searched from the end, where divergences are; contents the template changed
        are skipped. Costs string searches over the messages after that token, no render."""
        i = bisect.bisect_left([m[2] for m in self.marks], token_index)
        char = self.marks[i][0] if i < len(self.marks) else len(self.text)
        found, end = len(messages) - 1, len(self.text)
        for j in range(len(messages) - 1, -1, -1):
            content = messages[j].get("content")
            if not isinstance(content, str) or not content:
                continue
            start = self.text.rfind(content, 0, end)
            if start < 0:
                continue
            if start + len(content) < char:
                break
            found, end = j, start
        return found


def common_prefix_chars(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    return common_prefix(a, b, _BLOCK)


@dataclass
class RenderStats:
    """Work done by the renderer since it was made (counts, for tests and status)."""

    renders: int = 0
    rendered_messages: int = 0  # messages given to the chat template, summed over renders
    tokenize_calls: int = 0
    tokenized_chars: int = 0
    full_tokenizations: int = 0


class PromptRenderer:
    """Renders conversations with a tokenizer's chat template into ``Prompt``s.

    Thread-safe: gRPC handler threads render their own turns, off the engine thread.
    ``tokenizer`` is mlx-lm's ``TokenizerWrapper`` (or a Hugging Face tokenizer).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.stats = RenderStats()
        self._lock = threading.Lock()
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self._backend = getattr(hf, "backend_tokenizer", None)
        self._special_ids: frozenset[int] = frozenset()
        self._control_re: re.Pattern | None = None
        self.incremental = False
        self._fallback_logged = False
        self._direct = self._direct_template(hf)
        # Whether a conversation that grew renders only its new messages (see chat_template.py).
        self.appends = False
        # No token covers more characters than its vocabulary string has: the lower bound of
        # a text's token count that lets a hopeless request be refused without tokenizing it.
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
        if self._backend is None:
            self._fall_back("the tokenizer is not a fast (Rust) tokenizer")
        else:
            # A private copy: Hugging Face's encode() changes settings of its backend per call.
            from tokenizers import Tokenizer

            self._standard = Tokenizer.from_str(self._backend.to_str())
            added = self._backend.get_added_tokens_decoder()
            self._special_ids = frozenset(added)
            self._init_control_tokens(hf, added)
            self.incremental = self._probe()
        # Whether the template shows the model the tools a request sends (many do not).
        self.renders_tools = self._renders_tools()
        self._init_appending(hf)

    def _direct_template(self, hf: Any) -> tuple[Any, dict] | None:
        """The compiled chat template and the variables ``apply_chat_template`` gives it, to
        render without its per-call copies of every message (a millisecond per few hundred
        messages); None where mlx-lm renders another way. ``_probe`` checks the two agree."""
        if getattr(self.tokenizer, "_chat_template", None) is not None:  # mlx-lm's own renderer
            return None
        template = getattr(hf, "chat_template", None)
        if not isinstance(template, str):  # none, or several named ones
            return None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(template)
        except Exception:  # noqa: BLE001 - apply_chat_template reports it on use
            return None
        variables = dict(hf.special_tokens_map)
        thinking = getattr(self.tokenizer, "_thinking_kwarg", None)
        if thinking:  # what mlx-lm's TokenizerWrapper.apply_chat_template adds
            variables[thinking] = self.tokenizer.has_thinking
        return compiled, variables

    def _init_control_tokens(self, hf: Any, added: dict) -> None:
        """The tokens message text may not produce, as Hugging Face chooses them: the special
        ones, and added tokens the chat template writes."""
        template = getattr(hf, "chat_template", None) or ""
        control = {t.content: i for i, t in added.items()
                   if t.special or (t.content in template and not t.content.isspace())}
        if not control:
            return
        if mark_control_tokens is None:
            log.warning("this transformers cannot keep control tokens in message text as text; "
                        "upgrade it (pip install -U transformers)")
            return
        self._control_ids = frozenset(control.values())
        longest_first = sorted(control, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, longest_first)))
        self._hf = hf
        self._marker = mark_control_tokens("x", re.compile("x"))[0]  # what precedes marked text

    # -- rendering ---------------------------------------------------------------------------

    def render_text(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        *,
        generation_prompt: bool = True,
    ) -> str:
        """The conversation rendered by the chat template, as text."""
        self._count(renders=1, rendered_messages=len(messages))
        try:
            if self._direct is not None:
                template, variables = self._direct
                return template.render(
                    messages=messages, tools=template_tools(tools), documents=None,
                    add_generation_prompt=generation_prompt, **variables,
                )
            return self.tokenizer.apply_chat_template(
                list(messages),
                tools=template_tools(tools),
                add_generation_prompt=generation_prompt,
                tokenize=False,
            )
        except Exception as exc:  # jinja2 raises TemplateError for roles a template refuses
            raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}") from exc

    def min_tokens(self, messages: Sequence[dict[str, Any]]) -> int:
        """A lower bound of the tokens the messages' contents take, without tokenizing."""
        chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        return chars // self.max_token_chars

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        *,
        previous: Prompt | None = None,
        continues: bool = False,
        generation_prompt: bool = True,
    ) -> Prompt:
        """The conversation as a ``Prompt``, reusing the ids of ``previous`` (the same
        conversation's last prompt) for the text the two have in common. ``continues``: the
        first ``previous.message_count`` messages are the ones ``previous`` rendered, so only
        the others are searched for special-token text, and, with a template that renders each
        message on its own, only the others are rendered."""
        tools = tools or None
        guarded = self._holds_control_text(messages, tools, previous if continues else None)
        appended = None
        if continues and not guarded:
            appended = self._render_appended(messages, tools, previous, generation_prompt)
        if appended is not None:
            text, body_end = appended
        else:
            if guarded:
                messages = mark_control_tokens(list(messages), self._control_re)
                tools = mark_control_tokens(list(tools or ()), self._control_re) or None
            text = self.render_text(messages, tools, generation_prompt=generation_prompt)
            body_end = None if guarded else self._body_end(text, messages, tools, generation_prompt)
        prompt = self.tokenize(text, previous, guarded=guarded)
        return Prompt(prompt.text, prompt.ids, prompt.marks, len(messages), guarded, body_end, tools)

    def _render_appended(
        self, messages: Sequence[dict[str, Any]], tools, previous: Prompt | None, generation_prompt: bool,
    ) -> tuple[str, int] | None:
        """``previous``'s text up to its generation prompt plus the rendering of the messages
        added since, rendered after the first message alone; and where the messages end in
        it. None where that cannot be done (the caller renders everything)."""
        if (not self.appends or previous is None or previous.body_end is None or previous.guarded
                or not 0 < previous.message_count <= len(messages) or previous.tools != tools):
            return None
        first = list(messages[:1])
        head, tail = self._head_and_tail(first, tools, generation_prompt)
        if head is None:
            return None
        added = messages[previous.message_count:]
        if added:
            short = self.render_text(first + list(added), tools, generation_prompt=generation_prompt)
            if not short.startswith(head) or not short.endswith(tail):
                return None
            pieces = short[len(head):len(short) - len(tail)]
        else:
            pieces = ""
        body = previous.text[:previous.body_end] + pieces
        return body + tail, len(body)

    def _body_end(self, text: str, messages, tools, generation_prompt: bool) -> int | None:
        """Where the messages' rendering ends in ``text``, a whole rendering (None: unknown)."""
        if not self.appends or not messages:
            return None
        _, tail = self._head_and_tail(list(messages[:1]), tools, generation_prompt)
        if tail is None or not text.endswith(tail):
            return None
        return len(text) - len(tail)

    def _head_and_tail(self, first: list[dict[str, Any]], tools, generation_prompt: bool):
        """The rendering of ``first`` (the first message) alone without generation prompt, and
        the generation prompt's text ("" without one); (None, None) if the template appends
        anything else after the messages."""
        head = self.render_text(first, tools, generation_prompt=False)
        if not generation_prompt:
            return head, ""
        whole = self.render_text(first, tools, generation_prompt=True)
        if not whole.startswith(head):
            return None, None
        return head, whole[len(head):]

    def tokenize(self, text: str, previous: Prompt | None = None, *, guarded: bool = False) -> Prompt:
        """``text`` as a ``Prompt``. Its ids equal a full tokenization of ``text``; ``guarded``:
        ``text`` was rendered from marked messages, and is tokenized as ``encode_marked_chat``
        does (marked control-token text as plain text)."""
        if not self.incremental and not guarded:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            self._count(tokenize_calls=1, tokenized_chars=len(text), full_tokenizations=1)
            return Prompt(text, ids)
        start, keep_ids, keep_marks = 0, 0, 0
        if previous is not None and previous.marks:
            common = common_prefix_chars(previous.text, text)
            # The last special token lying wholly inside the common text: what precedes it
            # tokenizes the same in both texts, and the new text still holds it there.
            ends = [m[1] for m in previous.marks]
            keep_marks = bisect.bisect_right(ends, common) - 1
            if keep_marks >= 0:
                start, _, keep_ids = previous.marks[keep_marks]
            else:
                keep_marks = 0
        encode = self._encode_marked if guarded else self._encode
        tail_ids, tail_marks = encode(text[start:], start, keep_ids)
        if start == 0:
            self._count(full_tokenizations=1)
            return Prompt(text, tail_ids, tail_marks)
        return Prompt(
            text,
            previous.ids[:keep_ids] + tail_ids,
            previous.marks[:keep_marks] + tail_marks,
        )

    def _encode(self, text: str, char_base: int, token_base: int) -> tuple[list[int], list]:
        encoding = self._standard.encode(text, add_special_tokens=False)
        self._count(tokenize_calls=1, tokenized_chars=len(text))
        special = self._special_ids
        ids = encoding.ids
        marks = [
            (char_base + a, char_base + b, token_base + i)
            for i, (tid, (a, b)) in enumerate(zip(ids, encoding.offsets))
            if tid in special
        ]
        return ids, marks

    def _encode_marked(self, text: str, char_base: int, token_base: int) -> tuple[list[int], list]:
        """A marked rendering's ids (``encode_marked_chat``), and its marks: the control tokens
        not wrapped in markers, which are the template's, in the order their ids appear."""
        with self._lock:  # encode_marked_chat flips settings of the shared tokenizer
            ids = encode_marked_chat(self._hf, text)
        self._count(tokenize_calls=1, tokenized_chars=len(text))
        spans = [m.span() for m in self._control_re.finditer(text)
                 if m.start() == 0 or text[m.start() - 1] != self._marker]
        positions = [i for i, t in enumerate(ids) if t in self._control_ids]
        if len(spans) != len(positions):  # cannot place them: no split points, still exact ids
            return ids, []
        return ids, [(char_base + a, char_base + b, token_base + i)
                     for (a, b), i in zip(spans, positions)]

    def _holds_control_text(self, messages: Sequence[dict[str, Any]], tools, previous: Prompt | None) -> bool:
        """Whether a message's content or a tool definition holds control-token text; with
        ``previous`` (whose messages begin these), only the messages it did not render are
        searched."""
        if self._control_re is None:
            return False
        search = self._control_re.search
        if tools and search(json.dumps(tools)):
            return True
        if previous is not None:
            if previous.guarded:
                return True
            messages = messages[previous.message_count :]
        return any(
            (isinstance(m.get("content"), str) and search(m["content"]))
            or ("tool_calls" in m and search(json.dumps(m["tool_calls"], ensure_ascii=False)))
            for m in messages
        )

    # -- checks ------------------------------------------------------------------------------

    def _probe(self) -> bool:
        """Whether incremental tokenization gives this tokenizer's own ids on a sample
        conversation that grows by one turn (and the template marks its turns at all)."""
        base = [
            {"role": "system", "content": "You are a careful assistant.  Answer in short."},
            {"role": "user", "content": "Hello there!\nHow are you, 1234 ?"},
        ]
        grown = base + [
            {"role": "assistant", "content": " I am fine, thanks.\n\n"},
            {"role": "user", "content": "Tell me about Unix sockets: \u00e9t\u00e9, \u4f60\u597d, \U0001f600."},
        ]
        tools = [{"name": "grep", "description": "Search files.", "parameters": {"type": "object"}}]
        if self._direct is not None:
            direct, self._direct = self._direct, None
            try:
                samples = [(m, t, g) for m in (base, grown) for t in (None, tools) for g in (True, False)]
                expected = [self.render_text(m, t, generation_prompt=g) for m, t, g in samples]
                self._direct = direct
                if [self.render_text(m, t, generation_prompt=g) for m, t, g in samples] != expected:
                    self._direct = None
            except Exception:  # noqa: BLE001 - then apply_chat_template it is
                self._direct = None
        try:
            self.incremental = True
            first = self.render(base)
            if not first.marks:
                self._fall_back("the chat template renders no special tokens between messages")
                return False
            second = self.render(grown, previous=first)
            expected = list(self.tokenizer.encode(second.text, add_special_tokens=False))
        except Exception as exc:  # noqa: BLE001 - a template that cannot render the sample
            self._fall_back(f"the sample conversation could not be rendered ({exc})")
            return False
        finally:
            self.stats = RenderStats()
        if second.ids != expected or first.ids != expected[: len(first.ids)]:
            self._fall_back("the tokenizer does not split its input at special tokens")
            return False
        return True

    def _init_appending(self, hf: Any) -> None:
        """Whether conversations that grew render only their new messages: the template must
        render each message on its own (``chat_template.py``), checked once more on a sample."""
        if self._direct is None:
            self._log_full_render("the template is not rendered through Jinja here")
            return
        why = why_not_message_local(self._direct[0].environment, hf.chat_template)
        if why is not None:
            self._log_full_render(why)
            return
        base = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]
        grown = base + [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."}]
        try:
            self.appends = True
            first = self.render(base)
            second = self.render(grown, previous=first, continues=True)
            self.appends = second.text == self.render_text(grown) and second.body_end is not None
        except Exception:  # noqa: BLE001 - a template that cannot render the sample
            self.appends = False
        finally:
            self.stats = RenderStats()
        if not self.appends:
            self._log_full_render("the sample conversation renders differently when appended")

    def _log_full_render(self, why: str) -> None:
        log.info("rendering the whole conversation every turn: %s", why)

    def _renders_tools(self) -> bool:
        sample = [{"role": "user", "content": "Hello."}]
        tool = {"name": "lookup_7f3a", "description": "Look a word up.",
                "parameters": {"type": "object", "properties": {}}}
        try:
            return self.render_text(sample, [tool]) != self.render_text(sample)
        except Exception:  # noqa: BLE001 - a template that cannot render tools renders none
            return False
        finally:
            self.stats = RenderStats()

    def _fall_back(self, why: str) -> None:
        self.incremental = False
        if not self._fallback_logged:
            self._fallback_logged = True
            log.info("tokenizing the whole conversation every turn: %s", why)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)


def template_tools(tools: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tool definitions in the shape Hugging Face chat templates expect."""
    return [{"type": "function", "function": t} for t in tools] if tools else None

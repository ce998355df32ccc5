"""Seeded random prose, code-like text and tool definitions for the benchmarks' workloads, sized
in tokens of the model's tokenizer: the same text for every system of a run."""

from __future__ import annotations

import json
import random
from typing import Any, Sequence

_WORDS = (
    "the a an of to in for with on at by from as is are was be this that these those it its "
    "function method class module package buffer cache request response handler parser token "
    "stream socket thread queue event value index offset length count error result config "
    "option field record table column row file path directory layout widget editor cursor "
    "selection range line column diagnostic symbol reference definition import export type "
    "interface struct enum trait closure iterator generator promise future callback channel "
    "should would could must may might will can does did has have had make makes build builds "
    "return returns call calls read reads write writes parse parses check checks update updates "
    "quickly slowly correctly safely always never often sometimes again instead because when "
    "while before after during unless until although however therefore meanwhile otherwise "
    "small large empty full stale fresh nested flat async sync local remote shared private "
    "user session project workspace branch commit diff patch merge rebase review test suite"
).split()
_IDENTS = (
    "parse_header load_config render_view apply_patch fetch_rows open_stream close_socket "
    "encode_frame decode_frame flush_cache evict_entry resolve_path walk_tree index_symbols "
    "format_range merge_spans split_lines count_tokens schedule_task cancel_task retry_call "
    "validate_input normalize_path to_json from_json emit_event on_change on_save on_open"
).split()
_TYPES = "Buffer Request Response Session Editor Range Span Token Cache Entry Frame Config Workspace".split()


class TextMaker:
    """Seeded random prose and code-like text, sized in tokens of the model's tokenizer."""

    def __init__(self, seed: int, count_tokens):
        self.rng = random.Random(seed)
        self.count = count_tokens

    def sentence(self) -> str:
        n = self.rng.randint(8, 18)
        words = [self.rng.choice(_WORDS) for _ in range(n)]
        if self.rng.random() < 0.5:
            words.insert(self.rng.randrange(n), f"`{self.rng.choice(_IDENTS)}()`")
        return " ".join(words).capitalize() + "."

    def code_line(self) -> str:
        r = self.rng
        kind = r.randrange(5)
        a, b = r.choice(_IDENTS), r.choice(_IDENTS)
        t = r.choice(_TYPES)
        if kind == 0:
            return f"def {a}(self, {b.split('_')[-1]}: {t}) -> {r.choice(_TYPES)}:"
        if kind == 1:
            return f"    result = self.{a}({b.split('_')[0]}, limit={r.randint(1, 4096)})"
        if kind == 2:
            return f"    if not {b.split('_')[-1]}.{a}():  # {r.choice(_WORDS)} {r.choice(_WORDS)}"
        if kind == 3:
            return f"    return {t}({a}=self.{b}, offset={r.randint(0, 999)})"
        return f"class {t}{r.choice(_TYPES)}({t}):"

    def _fill(self, target_tokens: int, piece, sep: str) -> str:
        parts: list[str] = []
        while True:
            parts.append(piece())
            text = sep.join(parts)
            if self.count(text) >= target_tokens:
                return text

    def prose(self, target_tokens: int) -> str:
        return self._fill(target_tokens, self.sentence, " ")

    def code(self, target_tokens: int) -> str:
        return self._fill(target_tokens, self.code_line, "\n")

    def user_message(self, target_tokens: int) -> str:
        """A question with a code excerpt, about ``target_tokens`` tokens."""
        ask = f"In `{self.rng.choice(_IDENTS)}.py`, " + self.sentence()
        code_budget = max(target_tokens - self.count(ask) - 25, 10)
        code = self.code(code_budget)
        text = f"{ask}\n```python\n{code}\n```\n"
        tail = self.prose(max(target_tokens - self.count(text), 1))
        return text + tail

    def tools(self, budget_tokens: int) -> list[dict[str, Any]]:
        """IDE-like tool definitions (JSON schema) whose JSON takes about ``budget_tokens``."""
        tools: list[dict[str, Any]] = []
        while not tools or self.count(tools_json(tools)) < budget_tokens:
            i = len(tools)
            name = f"{self.rng.choice(_IDENTS)}_{i}"
            props = {}
            for _ in range(self.rng.randint(2, 5)):
                props[self.rng.choice(_IDENTS).split("_")[-1] + f"_{len(props)}"] = {
                    "type": self.rng.choice(["string", "integer", "boolean"]),
                    "description": self.sentence(),
                }
            tools.append({
                "name": name,
                "description": " ".join(self.sentence() for _ in range(2)),
                "parameters": {"type": "object", "properties": props, "required": sorted(props)[:1]},
            })
        return tools

    def system_prompt(self, target_tokens: int, tools: Sequence[dict[str, Any]] = ()) -> str:
        """An IDE assistant's system prompt: instructions, the tool JSON, project context."""
        head = ("You are a coding assistant inside an IDE. Answer briefly, cite files, and call a "
                "tool when you need to read or change the workspace.\n")
        if tools:
            head += "You can call these tools (JSON schema):\n" + tools_json(tools) + "\n"
        head += "Project context:\n"
        rest = max(target_tokens - self.count(head), 1)
        return head + self.code(rest // 2) + "\n" + self.prose(max(target_tokens - self.count(head) - rest // 2, 1))


def tools_json(tools: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(tools))

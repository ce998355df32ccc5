"""Whether a chat template renders each message on its own, read from its syntax tree.

A conversation's rendering is the template's head (before its loop over the messages), one
piece per message, and its tail (the generation prompt). When the piece of a message depends
only on that message, on whether it is the first, and on the first message (where templates
find the system prompt), the rendering of a conversation that grew by some messages is the
old rendering up to its tail, plus the pieces of the new messages, plus the tail: the new
pieces are the rendering of a short conversation, the first message and the new ones, minus
its head and first piece. ``PromptRenderer`` renders that way, in time independent of the
history, for the templates this module accepts, and renders everything otherwise.

A template is accepted when, in its Jinja syntax tree:

- one top-level ``for`` loops over ``messages`` (no ``else``, filter or recursion), and
  ``messages`` appears nowhere else but as ``messages[0]``;
- the loop body asks its loop nothing but ``loop.first`` (``loop.last``, indices and
  neighbours such as ``messages[loop.index0 - 1]`` make a message's piece depend on others),
  and neither ``break`` nor ``continue`` it;
- after the loop there is only ``{% if add_generation_prompt %}...{% endif %}``, and
  ``add_generation_prompt`` is used nowhere else;
- nothing keeps state across messages (``namespace``) or calls a global function whose value
  can change between renders (``strftime_now``: today's date); no ``include``/``import``.

Qwen2.5's and most tool-calling templates look at neighbouring messages (consecutive tool
results share a turn), and Qwen3's drops the reasoning of replies before the last user
message: they are rendered whole every turn.
"""

from __future__ import annotations

from typing import Any

from jinja2 import nodes

# Global functions whose value depends only on their arguments.
_PURE_GLOBALS = frozenset({"range", "dict", "raise_exception"})


def why_not_message_local(environment: Any, source: str) -> str | None:
    """None when ``source`` renders each message on its own (see the module docstring), else
    why not, in a few words."""
    try:
        tree = environment.parse(source)
    except Exception as exc:  # noqa: BLE001 - a template this environment cannot parse
        return f"its syntax is not plain Jinja ({exc})"
    loops = [n for n in tree.body if isinstance(n, nodes.For) and _is_messages(n.iter)]
    if len(loops) != 1:
        return "it loops over the messages more than once" if loops else "it has no top-level loop over the messages"
    loop = loops[0]
    if loop.else_ or loop.test is not None or loop.recursive or not isinstance(loop.target, nodes.Name):
        return "its loop over the messages has an else, a filter, recursion or several targets"
    tail = tree.body[tree.body.index(loop) + 1:]
    for node in tail:
        if not _is_generation_prompt(node) and not _renders_nothing(node):
            return "it renders more than the generation prompt after the messages"
    macros = {m.name for m in tree.find_all(nodes.Macro)}
    checker = _Checker(loop, macros, {id(n.test) for n in tail if isinstance(n, nodes.If)})
    checker.visit(tree, None, in_loop=False, nested=False)
    return checker.why


def _is_messages(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.name == "messages"


def _is_generation_prompt(node: nodes.Node) -> bool:
    return (isinstance(node, nodes.If) and isinstance(node.test, nodes.Name)
            and node.test.name == "add_generation_prompt" and not node.elif_ and not node.else_)


def _renders_nothing(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Output) and all(
        isinstance(n, nodes.TemplateData) and n.data == "" for n in node.nodes)


class _Checker:
    """Walks the tree once and keeps the first reason found (``why``)."""

    def __init__(self, loop: nodes.For, macros: set[str], generation_tests: set[int]):
        self.loop = loop
        self.macros = macros
        self.generation_tests = generation_tests  # ids of the tail's add_generation_prompt tests
        self.why: str | None = None

    def visit(self, node: nodes.Node, parent: nodes.Node | None, *, in_loop: bool, nested: bool) -> None:
        if self.why is not None:
            return
        self.why = self._check(node, parent, in_loop=in_loop, nested=nested)
        for child in node.iter_child_nodes():
            if node is self.loop:
                inner = child is not node.iter and child is not node.target
                self.visit(child, node, in_loop=inner, nested=False)
            elif isinstance(node, nodes.For) and in_loop:
                # Inside a loop of the message's own items, ``loop`` is that inner loop.
                self.visit(child, node, in_loop=True, nested=nested or any(child is b for b in node.body))
            else:
                self.visit(child, node, in_loop=in_loop, nested=nested)

    def _check(self, node: nodes.Node, parent: nodes.Node | None, *, in_loop: bool, nested: bool) -> str | None:
        if isinstance(node, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
            return "it includes or imports other templates"
        if isinstance(node, (nodes.Break, nodes.Continue)) and in_loop and not nested:
            return "it breaks out of its loop over the messages"
        if not isinstance(node, nodes.Name):
            if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name):
                name = node.node.name
                if name not in _PURE_GLOBALS and name not in self.macros:
                    return f"it calls {name}(), whose value may change between renders"
            return None
        if node.name == "messages":
            first = (isinstance(parent, nodes.Getitem) and parent.node is node
                     and isinstance(parent.arg, nodes.Const) and parent.arg.value == 0)
            if node is not self.loop.iter and not first:
                return "a message's rendering looks at other messages than the first"
        elif node.name == "loop" and in_loop and not nested:
            if not (isinstance(parent, nodes.Getattr) and parent.attr == "first"):
                return "a message's rendering depends on its place in the conversation"
        elif node.name == "add_generation_prompt" and id(node) not in self.generation_tests:
            return "add_generation_prompt is used outside the generation prompt"
        elif node.name == "namespace":
            return "it keeps state across messages (namespace)"
        return None

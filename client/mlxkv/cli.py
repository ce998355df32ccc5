"""The ``mlxkv`` command: chat, ask, status and conversation management against the daemon."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import platformdirs
from google.protobuf import json_format

from mlxkv.autostart import DaemonNotInstalledError, start_daemon
from mlxkv.client import Client
from mlxkv.conversation import Conversation, Turn
from mlxkv.convert import tool_to_proto
from mlxkv.display import format_conversations, format_models, format_stats, format_status, format_tool_call
from mlxkv.errors import DaemonUnavailableError, MlxkvError, NotFoundError

EXIT_ERROR = 1
EXIT_UNAVAILABLE = 2
EXIT_INTERRUPTED = 130
# How long `--start` waits for a daemon it started: converting the default model the first
# time and loading it take tens of seconds on a slow machine.
START_TIMEOUT_S = 300.0


class CliError(Exception):
    """An expected failure: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --- transcripts kept across invocations ----------------------------------------------------


class ConversationStore:
    """Transcripts of named conversations as JSON files, so that ``mlxkv ask --conversation``
    continues across invocations and survives a daemon restart. File names are hashes of the
    ids: an id is user input and never becomes a path."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @classmethod
    def default(cls) -> ConversationStore:
        """The store under the user's data directory."""
        return cls(Path(platformdirs.user_data_dir("mlxkv", appauthor=False)) / "conversations")

    def path_for(self, conversation_id: str) -> Path:
        """The file of a conversation id."""
        digest = hashlib.sha256(conversation_id.encode("utf-8")).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def load(self, client: Client, conversation_id: str) -> Conversation | None:
        """The saved conversation, or None if there is none."""
        path = self.path_for(conversation_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read the transcript of {conversation_id!r} ({path}): {exc}") from None
        if data.get("conversation_id") != conversation_id:
            raise CliError(f"{path} holds another conversation ({data.get('conversation_id')!r})")
        return Conversation.from_dict(client, data)

    def save(self, conversation: Conversation) -> Path:
        """Write atomically: a crash mid-write leaves the previous transcript intact."""
        path = self.path_for(conversation.conversation_id)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(conversation.to_dict(), f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def remove(self, conversation_id: str) -> bool:
        """Delete a saved transcript; True if there was one."""
        try:
            self.path_for(conversation_id).unlink()
        except FileNotFoundError:
            return False
        return True


# --- formatting -----------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
            "tool_choice": args.tool_choice, "model": args.model, "speculative": args.speculative}


def load_tools(path: str | os.PathLike[str] | None) -> list[dict[str, Any]] | None:
    """The tools of ``--tools FILE``: a JSON list of ``{"name", "description", "parameters"}``;
    None without the option."""
    if path is None:
        return None
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the tools in {path}: {exc}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise CliError(f"{path} must hold a JSON list of tools ({{\"name\", \"description\", \"parameters\"}})")
    for i, tool in enumerate(tools):
        try:
            tool_to_proto(tool)
        except (TypeError, ValueError) as exc:
            raise CliError(f"{path}: tool {i}: {exc}") from None
    return tools


def _stream_turn(conv: Conversation, text: str, args: argparse.Namespace, out: TextIO) -> Turn:
    """One turn: its text streamed to ``out``, then a line per tool call the model made."""
    streamed: list[str] = []

    def show(text: str) -> None:
        streamed.append(text)
        out.write(text)
        out.flush()

    def restart() -> None:
        streamed.clear()
        out.write("\n")
        print("mlxkv: the daemon restarted mid-answer; answering again", file=sys.stderr)

    turn = conv.send(text, on_text=show, on_restart=restart, **_options(args))
    shown = "".join(streamed)
    if not turn.tool_calls or (shown and not shown.endswith("\n")):
        out.write("\n")
    for call in turn.tool_calls:
        out.write(format_tool_call(call) + "\n")
    out.flush()
    if turn.tools_ignored:
        print("mlxkv: warning: the model's chat template does not render tools: the model did not see them",
              file=sys.stderr)
    if args.stats:
        print(format_stats(turn), file=sys.stderr)
    return turn


def _open_conversation(client: Client, store: ConversationStore | None, args: argparse.Namespace) -> Conversation:
    tools = load_tools(args.tools)
    conv = store.load(client, args.conversation) if store is not None and args.conversation else None
    if conv is None:
        return client.conversation(args.conversation or None, system=args.system, tools=tools)
    if args.system is not None and _system_of(conv) != args.system:
        # A new system prompt is an edit of the first message: re-send everything.
        rest = conv.messages[1:] if _system_of(conv) is not None else conv.messages
        conv.reset([{"role": "system", "content": args.system}, *rest])
    if tools is not None and tools != conv.tools:
        # Tools are rendered at the top of the prompt: new ones are an edit too.
        conv.reset(conv.messages, tools=tools)
    return conv


def _system_of(conv: Conversation) -> str | None:
    if conv.messages and conv.messages[0]["role"] == "system":
        return conv.messages[0]["content"]
    return None


def cmd_ask(client: Client, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise CliError("nothing to ask: the text is empty")
    if not args.conversation:
        conv = client.conversation("", system=args.system, tools=load_tools(args.tools))
        _stream_turn(conv, text, args, sys.stdout)
        return 0
    store = ConversationStore.default()
    conv = _open_conversation(client, store, args)
    _stream_turn(conv, text, args, sys.stdout)
    store.save(conv)
    return 0


def _read_line(interactive: bool) -> str | None:
    """The next user line, or None at EOF."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def cmd_chat(client: Client, args: argparse.Namespace) -> int:
    store = ConversationStore.default() if args.conversation else None
    conv = _open_conversation(client, store, args)
    initial = [m for m in conv.messages[:1] if m["role"] == "system"]
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        turns = sum(1 for m in conv.messages if m["role"] == "assistant")
        resumed = f", {turns} turns so far" if turns else ""
        print(f"conversation {conv.conversation_id}{resumed}; /reset clears it, /exit quits", file=sys.stderr)
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if line is None or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            conv.reset(initial)
            if store is not None:
                store.save(conv)
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            _stream_turn(conv, line, args, sys.stdout)
        except KeyboardInterrupt:
            # Closing the stream cancels the daemon's generation; nothing was committed.
            print("\n(cancelled)", file=sys.stderr)
            continue
        if store is not None:
            store.save(conv)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    status = client.status()
    if args.json:
        print(json_format.MessageToJson(status, always_print_fields_with_no_presence=True))
    else:
        print(format_status(status))
    return 0


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    models = client.list_models()
    if args.json:
        print(json.dumps([json_format.MessageToDict(m, always_print_fields_with_no_presence=True)
                          for m in models], indent=2))
    else:
        print(format_models(models))
    return 0


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    """LoadModel, with the daemon's loading progress on stderr while it waits."""
    done = threading.Event()

    def show_progress() -> None:
        last = ""
        while not done.wait(0.5):
            try:
                status = client.status()
            except MlxkvError:
                continue
            line = {"switching": f"switching to {status.model}: writing caches to disk",
                    "loading": f"loading {status.model}: {status.load_progress:.0%}"}.get(status.model_state, "")
            if line and line != last and sys.stderr.isatty():
                print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
                last = line
        if last:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    watcher = threading.Thread(target=show_progress, daemon=True)
    watcher.start()
    try:
        loaded = client.load_model(args.model)
    finally:
        done.set()
        watcher.join()
    how = (f"loaded in {loaded.switch_s + loaded.load_s:.1f}s" if loaded.loaded_now else "already loaded")
    print(f"{loaded.model.name}: {how}")
    return 0


def cmd_unload(client: Client, args: argparse.Namespace) -> int:
    unloaded = client.unload_model()
    if unloaded.model:
        print(f"{unloaded.model}: unloaded ({unloaded.caches_moved} caches moved to disk)")
    else:
        print("no model was loaded")
    return 0


def cmd_conversations_ls(client: Client, args: argparse.Namespace) -> int:
    conversations = client.list_conversations()
    if args.json:
        print(json.dumps([json_format.MessageToDict(c) for c in conversations], indent=2))
    elif conversations:
        print(format_conversations(conversations))
    else:
        print("no conversations", file=sys.stderr)
    return 0


def cmd_conversations_rm(client: Client, args: argparse.Namespace) -> int:
    store = ConversationStore.default()
    code = 0
    for conversation_id in args.ids:
        try:
            client.delete_conversation(conversation_id)
            on_daemon = True
        except NotFoundError:
            on_daemon = False
        # The saved transcript goes too: otherwise the next `ask --conversation` resurrects it.
        saved = store.remove(conversation_id)
        if not (on_daemon or saved):
            print(f"mlxkv: error: no conversation {conversation_id}", file=sys.stderr)
            code = EXIT_ERROR
    return code


# --- argument parsing -----------------------------------------------------------------------


def _add_turn_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversation", "-c", metavar="ID",
                        help="a named conversation, continued across invocations")
    parser.add_argument("--system", "-s", metavar="TEXT", help="the system prompt")
    parser.add_argument("--stats", action="store_true", help="print cache and speed stats per turn to stderr")
    parser.add_argument("--model", "-m", metavar="NAME|DIR",
                        help="the model to answer (`mlxkv models`; default: the daemon's loaded one)")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="the answer's token limit")
    parser.add_argument("--speculative", choices=("off", "prompt-lookup", "draft"),
                        help="prompt lookup: greedy answers that copy the conversation (code edits) "
                             "verify several tokens per step; draft: tokens drafted by the daemon's "
                             "--draft-model (default: the daemon's setting)")
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (default 0: greedy)")
    parser.add_argument("--seed", type=int, metavar="N", help="random seed for sampling")
    parser.add_argument("--tools", metavar="FILE",
                        help='functions the model may call: a JSON list of {"name", "description", '
                             '"parameters": <JSON schema>}; its calls are printed as "[tool call] name({...})"')
    parser.add_argument("--tool-choice", metavar="CHOICE",
                        help="auto (default), none, required, or the name of the tool the model must call")


def build_parser() -> argparse.ArgumentParser:
    """The ``mlxkv`` argument parser."""
    # Global options are accepted before and after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="the daemon's socket (default: $MLXKV_SOCKET or the per-user default)")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="log the client's protocol decisions to stderr")
    common.add_argument("--start", action="store_true", default=argparse.SUPPRESS,
                        help="when no daemon answers, start `mlxkvd serve` in the background "
                             "(it keeps running) and wait for it")

    parser = argparse.ArgumentParser(prog="mlxkv", parents=[common],
                                     description="Talk to the mlxkv inference daemon.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", parents=[common], help="an interactive multi-turn chat")
    _add_turn_options(chat)
    chat.set_defaults(func=cmd_chat)

    ask = sub.add_parser("ask", parents=[common], help="one turn; `-` reads the text from stdin")
    ask.add_argument("text", metavar="TEXT")
    _add_turn_options(ask)
    ask.set_defaults(func=cmd_ask)

    status = sub.add_parser("status", parents=[common], help="the daemon's model, memory and caches")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)

    models = sub.add_parser("models", parents=[common], help="the local models a turn can use (* loaded)")
    models.add_argument("--json", action="store_true", help="print them as JSON")
    models.set_defaults(func=cmd_models)
    load = sub.add_parser("load", parents=[common],
                          help="load a model now (the previous one's caches go to disk)")
    load.add_argument("model", metavar="NAME|DIR", nargs="?", default="",
                      help="a name from `mlxkv models` or a model directory (default: the resident model)")
    load.set_defaults(func=cmd_load)
    unload = sub.add_parser("unload", parents=[common], help="free the loaded model's memory")
    unload.set_defaults(func=cmd_unload)

    convs = sub.add_parser("conversations", aliases=["conv"], parents=[common],
                           help="list or delete the daemon's conversations")
    convs_sub = convs.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = convs_sub.add_parser("ls", parents=[common], help="list conversations")
    ls.add_argument("--json", action="store_true", help="print them as JSON")
    ls.set_defaults(func=cmd_conversations_ls)
    rm = convs_sub.add_parser("rm", parents=[common], help="delete conversations (and their saved transcripts)")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.set_defaults(func=cmd_conversations_rm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlxkv`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="mlxkv: %(levelname)s %(name)s: %(message)s")
    func: Callable[[Client, argparse.Namespace], int] = args.func
    try:
        with Client(getattr(args, "socket", None)) as client:
            if getattr(args, "start", False):
                ensure_daemon(client)
            return func(client, args)
    except DaemonUnavailableError as err:
        return _fail(str(err), EXIT_UNAVAILABLE)
    except NotFoundError as err:
        return _fail(err.details, EXIT_ERROR)
    except MlxkvError as err:
        return _fail(f"{err.details} ({err.code.name})", EXIT_ERROR)
    except CliError as err:
        return _fail(str(err), err.code)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `mlxkv ask ... | head`: the reader left; not an error worth a message.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the exit-time flush
        return EXIT_ERROR


def ensure_daemon(client: Client, timeout: float = START_TIMEOUT_S) -> None:
    """Start a daemon on the client's socket unless one answers, and wait until it serves."""
    try:
        client.status()  # fails fast when nothing answers
        return
    except DaemonUnavailableError:
        pass
    try:
        proc, log = start_daemon(client.socket_path)
    except DaemonNotInstalledError as err:
        raise CliError(str(err), EXIT_UNAVAILABLE) from None
    print(f"mlxkv: started mlxkvd (pid {proc.pid}) on {client.socket_path}, loading the model; "
          f"log: {log}", file=sys.stderr)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.wait_ready(timeout=1.0)
            return
        except DaemonUnavailableError:
            if proc.poll() is not None:
                raise CliError(f"mlxkvd exited with code {proc.returncode} before serving; "
                               f"see {log}", EXIT_UNAVAILABLE) from None
            if time.monotonic() >= deadline:
                raise CliError(f"mlxkvd (pid {proc.pid}) is not serving after {timeout:g} s; "
                               f"see {log}", EXIT_UNAVAILABLE) from None


def _fail(message: str, code: int) -> int:
    print(f"mlxkv: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

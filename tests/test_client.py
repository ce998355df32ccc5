"""The client library and CLI without a daemon and without MLX.

The protocol logic (resend on FAILED_PRECONDITION, retry on UNAVAILABLE, commit on Done) is
tested against a real gRPC server on a temporary Unix socket running a small hand-written
servicer; the real daemon is covered by the end-to-end tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from mlxkv import Client, Conversation, DaemonUnavailableError, MlxkvError, NotFoundError, Turn
from mlxkv import cli
from mlxkv.convert import message_from_proto, message_to_proto, tool_from_proto, tool_to_proto
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc
from conftest import serve_fake


# --- a tiny daemon stand-in -----------------------------------------------------------------


class FakeInference(pb_grpc.InferenceServicer):
    """Keeps revisions like the daemon does and answers "answer N" in two deltas.

    ``forget()`` simulates a restart: every conversation is gone, so the next delta turn gets
    FAILED_PRECONDITION. ``fail_next`` makes the next Generate fail with a given code, after
    streaming ``fail_after_delta`` (one delta) or before anything.
    """

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.revisions: dict[str, int] = {}
        self.counter = 0
        self.fail_next: grpc.StatusCode | None = None
        self.fail_after_delta = False
        self.deleted: list[str] = []
        self._lock = threading.Lock()

    def forget(self) -> None:
        self.revisions.clear()

    def Generate(self, request, context):
        with self._lock:
            self.requests.append(request)
            fail, self.fail_next = self.fail_next, None
            cid = request.conversation_id
            if cid and not request.reset and self.revisions.get(cid) != request.base_revision:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"conversation {cid} is not at that revision")
            if any(m.content == "bad" for m in request.messages):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad message")
            self.counter += 1
            n = self.counter
        yield pb.GenerateResponse(start=pb.Start(
            conversation_id=cid, prompt_tokens=10 * n, cached_tokens=4, prefill_tokens=10 * n - 4,
            cache_source=pb.CACHE_SOURCE_CONVERSATION))
        yield pb.GenerateResponse(delta=pb.Delta(text="answer ", token_ids=[1, 2]))
        if fail is not None:
            context.abort(fail, "simulated failure")
        yield pb.GenerateResponse(delta=pb.Delta(text=str(n), token_ids=[3]))
        revision = 0
        if cid:
            revision = 1000 + n
            self.revisions[cid] = revision
        yield pb.GenerateResponse(done=pb.Done(
            finish_reason=pb.FINISH_REASON_STOP, revision=revision, text=f"answer {n}",
            usage=pb.Usage(prompt_tokens=10 * n, cached_tokens=4, prefill_tokens=10 * n - 4, completion_tokens=3),
            timings=pb.Timings(time_to_first_token_s=0.25, prefill_tokens_per_s=100.0,
                               decode_tokens_per_s=20.0, total_s=0.5)))

    def GetStatus(self, request, context):
        return pb.Status(
            model="fake/model", backend="cpu", model_loaded=True, weights_dtype="bfloat16", uptime_s=3725,
            requests=len(self.requests), conversations=len(self.revisions), tokens_saved=812, rss_bytes=3 << 20,
            cache_tiers=[pb.CacheTier(name="memory", entries=2, bytes=2048, budget_bytes=1 << 30, hits=3, misses=1)])

    def ListConversations(self, request, context):
        return pb.ListConversationsResponse(conversations=[
            pb.Conversation(conversation_id=cid, revision=rev, tokens=42, cache_tier="memory", cache_bytes=4096,
                            updated_at=1_700_000_000.0)
            for cid, rev in sorted(self.revisions.items())])

    def GetConversation(self, request, context):
        if request.conversation_id not in self.revisions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no conversation {request.conversation_id}")
        return pb.Conversation(conversation_id=request.conversation_id,
                               revision=self.revisions[request.conversation_id])

    def DeleteConversation(self, request, context):
        if self.revisions.pop(request.conversation_id, None) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no conversation {request.conversation_id}")
        self.deleted.append(request.conversation_id)
        return pb.DeleteConversationResponse()


@pytest.fixture
def daemon(sock: Path):
    servicer = FakeInference()
    server = serve_fake(sock, servicer)
    yield servicer
    server.stop(None)


def _contents(request: pb.GenerateRequest) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.messages]


# --- conversions ----------------------------------------------------------------------------


def test_message_round_trip_keeps_optional_fields_only_when_set():
    tool_msg = {"role": "tool", "content": '{"ok": true}', "name": "lookup", "tool_call_id": "call_1"}
    proto = message_to_proto(tool_msg)
    assert (proto.role, proto.content, proto.name, proto.tool_call_id) == ("tool", '{"ok": true}', "lookup", "call_1")
    assert message_from_proto(proto) == tool_msg
    assert message_from_proto(message_to_proto({"role": "user", "content": "hi"})) == {"role": "user", "content": "hi"}


@pytest.mark.parametrize("bad", [{"content": "no role"}, {"role": "user", "content": 3},
                                 {"role": "user", "content": "x", "tool_calls": []}])
def test_invalid_messages_are_rejected(bad):
    with pytest.raises(ValueError):
        message_to_proto(bad)


def test_tool_parameters_become_json_text():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    proto = tool_to_proto({"name": "weather", "description": "Weather now", "parameters": schema})
    assert proto.name == "weather" and proto.description == "Weather now"
    assert json.loads(proto.parameters_json) == schema
    assert tool_from_proto(proto) == {"name": "weather", "description": "Weather now", "parameters": schema}
    wrapped = tool_to_proto({"type": "function", "function": {"name": "weather", "parameters": schema}})
    assert wrapped.name == "weather" and json.loads(wrapped.parameters_json) == schema


def test_request_carries_sampling_stop_tools_and_greedy_default(client, daemon):
    tools = [{"name": "f", "description": "d", "parameters": {"type": "object"}}]
    conv = client.conversation("c", system="sys", tools=tools, max_tokens=7)
    conv.send("hi", stop="END", top_p=0.9, seed=5)
    conv.send("again", temperature=0.7)
    first, second = daemon.requests
    assert first.max_tokens == 7 and list(first.stop) == ["END"]
    assert first.sampling.temperature == 0.0 and first.sampling.top_p == pytest.approx(0.9)
    assert first.sampling.HasField("seed") and first.sampling.seed == 5
    assert [t.name for t in first.tools] == ["f"]
    # A delta turn with an empty tool list keeps the daemon's tools.
    assert list(second.tools) == [] and second.sampling.temperature == pytest.approx(0.7)
    assert not second.sampling.HasField("seed") and second.max_tokens == 7


# --- the conversation protocol against the stand-in daemon ---------------------------------


def test_resend_after_daemon_lost_the_conversation(client, daemon):
    conv = client.conversation("conv-1", system="be brief")
    t1 = conv.send("hello")
    assert daemon.requests[0].reset and _contents(daemon.requests[0]) == [("system", "be brief"), ("user", "hello")]
    assert (t1.text, t1.resent, conv.revision) == ("answer 1", False, t1.revision)

    daemon.forget()  # the daemon restarted: it no longer knows conv-1
    t2 = conv.send("second")
    rejected, resent = daemon.requests[1], daemon.requests[2]
    assert not rejected.reset and rejected.base_revision == t1.revision
    assert _contents(rejected) == [("user", "second")]
    assert resent.reset and _contents(resent) == [
        ("system", "be brief"), ("user", "hello"), ("assistant", "answer 1"), ("user", "second")]
    assert t2.resent is True and t2.text == "answer 2"
    assert conv.messages == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "answer 1"}, {"role": "user", "content": "second"},
        {"role": "assistant", "content": "answer 2"}]

    t3 = conv.send("third")
    delta = daemon.requests[3]
    assert not delta.reset and delta.base_revision == t2.revision and _contents(delta) == [("user", "third")]
    assert t3.resent is False and conv.revision == t3.revision == 1003


def test_turn_fields_come_from_start_deltas_and_done(client):
    turn = client.conversation("c").send("hi")
    assert isinstance(turn, Turn)
    assert turn.token_ids == [1, 2, 3] and turn.finish_reason == "stop" and turn.cache_source == "conversation"
    assert (turn.prompt_tokens, turn.cached_tokens, turn.prefill_tokens, turn.completion_tokens) == (10, 4, 6, 3)
    assert turn.time_to_first_token_s == pytest.approx(0.25) and turn.decode_tokens_per_s == pytest.approx(20.0)
    assert turn.done is not None and turn.done.revision == turn.revision == 1001


def test_failed_turn_commits_nothing_and_keeps_the_status_code(client, daemon):
    conv = client.conversation("c")
    conv.send("ok")
    before = (list(conv.messages), conv.revision)
    with pytest.raises(MlxkvError) as info:
        conv.send("bad")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (conv.messages, conv.revision) == before
    conv.send("next")
    assert daemon.requests[-1].base_revision == before[1] and not daemon.requests[-1].reset


def test_precondition_after_a_reset_is_not_retried_forever(client, daemon):
    conv = client.conversation("c")
    daemon.fail_next = grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(MlxkvError) as info:
        conv.send("hi")  # already a reset: resending would not help
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(daemon.requests) == 1 and conv.messages == []


def test_stream_then_last_turn_and_closing_early_cancels(client, daemon):
    conv = client.conversation("c")
    assert list(conv.stream("hi")) == ["answer ", "1"]
    assert conv.last_turn is not None and conv.last_turn.text == "answer 1" and conv.revision == 1001
    stream = conv.stream("more")
    assert next(stream) == "answer "
    stream.close()  # the caller gave up: nothing committed
    assert len(conv.messages) == 2 and conv.revision == 1001


def test_unavailable_mid_answer_restarts_the_turn_in_full(client, daemon):
    conv = client.conversation("c")
    conv.send("one")
    daemon.fail_next = grpc.StatusCode.UNAVAILABLE
    seen: list[str] = []
    restarts: list[bool] = []
    turn = conv.send("two", on_text=seen.append, on_restart=lambda: restarts.append(True))
    assert restarts == [True] and seen == ["answer ", "answer ", "3"]
    assert turn.resent and turn.text == "answer 3" and daemon.requests[-1].reset
    assert [m["content"] for m in conv.messages] == ["one", "answer 1", "two", "answer 3"]


def test_real_restart_of_the_server_is_transparent(tmp_path):
    path = tmp_path / "r.sock"
    first = FakeInference()
    server = serve_fake(path, first)
    with Client(path, timeout=10, retry_unavailable_s=10.0) as client:
        conv = client.conversation("c")
        conv.send("one")
        server.stop(None)
        second = FakeInference()  # a new process: it knows nothing

        def restart_later() -> None:
            time.sleep(0.5)
            nonlocal server
            server = serve_fake(path, second)

        thread = threading.Thread(target=restart_later)
        thread.start()
        try:
            turn = conv.send("two")
        finally:
            thread.join()
            server.stop(None)
    assert turn.resent and second.requests[-1].reset
    assert _contents(second.requests[-1]) == [("user", "one"), ("assistant", "answer 1"), ("user", "two")]


class StallingInference(FakeInference):
    """Answers a turn's Start, then stalls until ``release`` is set: a daemon mid-prefill."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()

    def Generate(self, request, context):
        self.requests.append(request)
        yield pb.GenerateResponse(start=pb.Start(conversation_id=request.conversation_id))
        self.started.set()
        self.release.wait(30)


def _first_turn_through_a_restart(path: Path, *, retry_s: float, stalled_s: float = 0.0):
    """A fresh client's very first call is a turn; the daemon answers Start, stalls for
    ``stalled_s``, dies, and a new one (knowing nothing) comes up half a second later.
    Returns the turn (or the error), the conversation and the new daemon."""
    stalling = StallingInference()
    server = serve_fake(path, stalling)
    second = FakeInference()
    result: dict[str, object] = {}
    with Client(path, timeout=30, retry_unavailable_s=retry_s) as client:
        conv = client.conversation("c")

        def turn() -> None:
            try:
                result["turn"] = conv.send("one")
            except MlxkvError as exc:
                result["error"] = exc

        worker = threading.Thread(target=turn)
        worker.start()
        try:
            assert stalling.started.wait(10)
            time.sleep(stalled_s)
            server.stop(None)
            time.sleep(0.5)
            server = serve_fake(path, second)
            worker.join(30)
        finally:
            stalling.release.set()
            server.stop(None)
    assert not worker.is_alive()
    return result.get("turn") or result.get("error"), conv, second


def test_a_first_turn_that_saw_the_daemon_waits_for_its_restart(tmp_path):
    turn, conv, second = _first_turn_through_a_restart(tmp_path / "r.sock", retry_s=10.0)
    assert isinstance(turn, Turn), turn
    assert turn.text == "answer 1" and conv.revision == 1001
    assert second.requests[-1].reset and _contents(second.requests[-1]) == [("user", "one")]
    assert conv.messages == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "answer 1"}]


def test_the_restart_window_starts_when_the_daemon_goes_away_not_with_the_turn(tmp_path):
    # The turn ran longer than the window before the daemon died: it still gets all of it.
    turn, conv, second = _first_turn_through_a_restart(tmp_path / "r.sock", retry_s=2.0, stalled_s=2.5)
    assert isinstance(turn, Turn), turn
    assert turn.text == "answer 1" and second.requests[-1].reset


def test_regenerate_drops_the_last_answer_and_resets(client, daemon):
    conv = client.conversation("c")
    conv.send("q")
    turn = conv.regenerate()
    request = daemon.requests[-1]
    assert request.reset and _contents(request) == [("user", "q")]
    assert conv.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": turn.text}]


def test_reset_makes_the_next_turn_send_everything(client, daemon):
    conv = client.conversation("c")
    conv.send("q")
    conv.reset([{"role": "user", "content": "edited"}, {"role": "assistant", "content": "fine"}])
    conv.send("next")
    request = daemon.requests[-1]
    assert request.reset and _contents(request) == [("user", "edited"), ("assistant", "fine"), ("user", "next")]


def test_ask_is_one_shot(client, daemon):
    turn = client.ask("hi", system="sys")
    request = daemon.requests[-1]
    assert request.conversation_id == "" and request.reset
    assert _contents(request) == [("system", "sys"), ("user", "hi")] and turn.text == "answer 1"
    assert daemon.revisions == {}


def test_management_calls_and_not_found(client, daemon):
    client.conversation("keep").send("x")
    assert [c.conversation_id for c in client.list_conversations()] == ["keep"]
    assert client.get_conversation("keep").revision == 1001
    assert client.status().model == "fake/model"
    assert client.wait_ready(timeout=2).backend == "cpu"
    client.delete_conversation("keep")
    with pytest.raises(NotFoundError) as info:
        client.delete_conversation("keep")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


# --- no daemon ------------------------------------------------------------------------------


def test_missing_socket_raises_unavailable_with_hint(tmp_path):
    path = tmp_path / "missing.sock"
    with Client(path) as client:
        with pytest.raises(DaemonUnavailableError) as info:
            client.status()
        started = time.monotonic()
        with pytest.raises(DaemonUnavailableError):
            client.conversation("c").send("hi")
        # A client that never reached a daemon fails fast instead of waiting out the retries.
        assert time.monotonic() - started < 3
    message = str(info.value)
    assert str(path) in message and "mlxkvd serve" in message and "mlxkvd install" in message
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and not isinstance(info.value, grpc.RpcError)


def test_stale_socket_is_reported_as_refused(tmp_path):
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening, closed: what a killed daemon leaves
    with Client(path) as client, pytest.raises(DaemonUnavailableError) as info:
        client.list_conversations()
    assert "refused" in str(info.value)


def test_wait_ready_gives_up_after_its_timeout(tmp_path):
    with Client(tmp_path / "none.sock") as client, pytest.raises(DaemonUnavailableError) as info:
        client.wait_ready(timeout=0.3)
    assert "not ready after 0.3s" in str(info.value)


def test_cli_status_without_daemon_exits_2_with_hint(tmp_path, capsys):
    path = tmp_path / "missing.sock"
    assert cli.main(["--socket", str(path), "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlxkv: error: ") and "mlxkvd serve" in err and str(path) in err
    assert "Traceback" not in err


# --- persistence ----------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip(sock):
    client = Client(sock)
    conv = Conversation(client, "c-1", messages=[{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}],
                        tools=[{"name": "f", "description": "", "parameters": {}}], revision=7, max_tokens=9)
    restored = Conversation.from_dict(client, json.loads(json.dumps(conv.to_dict())))
    assert restored.to_dict() == conv.to_dict()
    assert (restored.conversation_id, restored.revision, restored.defaults) == ("c-1", 7, {"max_tokens": 9})
    assert restored.messages == conv.messages and restored.tools == conv.tools
    client.close()


def test_store_file_name_is_a_hash_and_writes_atomically(tmp_path, sock):
    store = cli.ConversationStore(tmp_path / "convs")
    evil_id = "../../etc/passwd"
    path = store.path_for(evil_id)
    assert path.parent == tmp_path / "convs"
    assert path.name == hashlib.sha256(evil_id.encode()).hexdigest()[:32] + ".json"
    client = Client(sock)
    conv = Conversation(client, evil_id, messages=[{"role": "user", "content": "q"}], revision=3)
    assert store.save(conv) == path
    assert os.listdir(tmp_path / "convs") == [path.name]  # no temp file left behind
    loaded = store.load(client, evil_id)
    assert loaded is not None and loaded.to_dict() == conv.to_dict()
    assert store.load(client, "other") is None
    assert store.remove(evil_id) and not path.exists()
    client.close()


# --- the CLI against the stand-in daemon ----------------------------------------------------


def test_cli_ask_continues_a_conversation_across_invocations(sock, daemon, data_dir, capsys):
    assert cli.main(["--socket", str(sock), "ask", "first", "--conversation", "proj", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == "answer 1\n"
    assert "[cached 4 · prefilled 6 · ttft 0.25s · 20.0 tok/s · from conversation]" in err
    saved = data_dir / (hashlib.sha256(b"proj").hexdigest()[:32] + ".json")
    assert json.loads(saved.read_text())["revision"] == 1001

    daemon.forget()  # the daemon restarted between invocations: the file has the transcript
    assert cli.main(["ask", "second", "-c", "proj", "--socket", str(sock)]) == 0
    assert capsys.readouterr().out == "answer 2\n"
    assert _contents(daemon.requests[-1]) == [("user", "first"), ("assistant", "answer 1"), ("user", "second")]
    assert json.loads(saved.read_text())["revision"] == 1002


def test_cli_ask_reads_stdin_and_one_shot_saves_nothing(sock, daemon, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    assert cli.main(["--socket", str(sock), "ask", "-"]) == 0
    assert capsys.readouterr().out == "answer 1\n"
    assert daemon.requests[-1].conversation_id == "" and _contents(daemon.requests[-1]) == [("user", "from stdin\n")]
    assert not data_dir.exists()


def test_cli_chat_from_a_pipe(sock, daemon, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nmore\n/reset\nfresh\n/exit\nnever\n"))
    assert cli.main(["--socket", str(sock), "chat", "--system", "sys"]) == 0
    assert capsys.readouterr().out == "answer 1\nanswer 2\nanswer 3\n"
    first, second, third = daemon.requests
    assert first.reset and not second.reset and _contents(second) == [("user", "more")]
    assert third.reset and _contents(third) == [("system", "sys"), ("user", "fresh")]


def test_cli_status_table_and_json(sock, daemon, capsys):
    assert cli.main(["--socket", str(sock), "status"]) == 0
    out = capsys.readouterr().out
    assert "fake/model" in out and "bfloat16" in out and "1h 2m 5s" in out and "3.0 MiB" in out
    assert "memory" in out and "75.0%" in out
    assert cli.main(["--socket", str(sock), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "fake/model"


def test_cli_conversations_ls_and_rm(sock, daemon, data_dir, capsys):
    Client(sock).conversation("a1").send("x")
    assert cli.main(["--socket", str(sock), "conversations", "ls"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["id", "revision", "tokens", "tier", "bytes", "updated"]
    assert "a1" in out and "1001" in out
    assert cli.main(["--socket", str(sock), "conversations", "rm", "a1"]) == 0 and daemon.deleted == ["a1"]
    assert cli.main(["--socket", str(sock), "conversations", "rm", "nope"]) == 1
    assert "mlxkv: error: no conversation nope" in capsys.readouterr().err


# --- argument parsing -----------------------------------------------------------------------


def test_parse_chat_and_ask():
    parser = cli.build_parser()
    chat = parser.parse_args(["--socket", "/s", "chat", "--conversation", "x", "--system", "sys", "--stats",
                              "--max-tokens", "5", "--temperature", "0.5", "--seed", "3"])
    assert (chat.func, chat.socket, chat.conversation, chat.system) == (cli.cmd_chat, "/s", "x", "sys")
    assert (chat.stats, chat.max_tokens, chat.temperature, chat.seed) == (True, 5, 0.5, 3)
    ask = parser.parse_args(["ask", "-", "-c", "y", "--socket", "/t", "-v"])
    assert (ask.func, ask.text, ask.conversation, ask.socket, ask.verbose) == (cli.cmd_ask, "-", "y", "/t", True)
    assert ask.stats is False and ask.max_tokens is None


def test_parse_status_and_conversations():
    parser = cli.build_parser()
    status = parser.parse_args(["status", "--json"])
    assert status.func is cli.cmd_status and status.json and not hasattr(status, "socket")
    ls = parser.parse_args(["conversations", "ls"])
    assert ls.func is cli.cmd_conversations_ls
    rm = parser.parse_args(["conversations", "rm", "a", "b"])
    assert rm.func is cli.cmd_conversations_rm and rm.ids == ["a", "b"]


@pytest.mark.parametrize("argv", [[], ["ask"], ["conversations"], ["conversations", "rm"], ["frobnicate"]])
def test_parse_rejects_incomplete_commands(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err

"""Hostile and bad input: each gets its exact status code (or a clean exit at startup), and the
daemon keeps serving everyone else (issue #6, part 4). tests/test_e2e_errors.py covers the
ordinary bad requests; these are the ones it does not."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from conftest import Daemon
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlxkv import Client
from mlxkv.v1 import inference_pb2 as pb
from mlxkv.v1 import inference_pb2_grpc as pb_grpc

SYSTEM = "You are a terse assistant. Reply with a few words."


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_dir):
    """A daemon with a 1 MiB request limit and its own cache dir (disk tier on)."""
    root = tmp_path_factory.mktemp("hostile")
    d = Daemon(
        socket=Path(tempfile.mkdtemp(prefix="mlxkv-")) / "hostile.sock",
        cache_dir=root / "cache",
        log_path=root / "daemon.log",
        extra_args=["--model", str(model_dir), "--max-message-bytes", "1MiB"],
    ).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def stub(daemon):
    with grpc.insecure_channel(
        f"unix://{daemon.socket}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        yield pb_grpc.InferenceStub(channel), health_pb2_grpc.HealthStub(channel)


def user(text: str) -> pb.Message:
    return pb.Message(role="user", content=text)


def generate(inference, **fields) -> list[pb.GenerateResponse]:
    return list(inference.Generate(pb.GenerateRequest(**fields), timeout=300))


def assert_status(code: grpc.StatusCode, call, fragment: str = "") -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert fragment in (info.value.details() or "")


def assert_still_serving(daemon, reference) -> None:
    """Health says SERVING and a real greedy turn equals the reference."""
    with grpc.insecure_channel(f"unix://{daemon.socket}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="mlxkv.v1.Inference"), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with Client(daemon.socket) as client:
        turn = client.ask("Name a fruit.", max_tokens=6)
    assert turn.token_ids == reference.generate([{"role": "user", "content": "Name a fruit."}], 6)


def test_request_over_the_receive_limit_is_resource_exhausted(daemon, stub, reference):
    inference, _ = stub
    assert_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda: generate(inference, messages=[user("x" * (2 * 1024 * 1024))], max_tokens=2),
    )
    assert_still_serving(daemon, reference)


NAN, INF = math.nan, math.inf
BAD_SAMPLING = [
    ("negative top_k", pb.SamplingParams(top_k=-5), "top_k"),
    ("most negative top_k", pb.SamplingParams(top_k=-(2**31)), "top_k"),
    ("NaN min_p", pb.SamplingParams(min_p=NAN), "min_p"),
    ("min_p of 1", pb.SamplingParams(min_p=1.0), "min_p"),
    ("negative min_p", pb.SamplingParams(min_p=-0.5), "min_p"),
    ("NaN top_p", pb.SamplingParams(top_p=NAN), "top_p"),
    ("infinite top_p", pb.SamplingParams(top_p=INF), "top_p"),
    ("NaN temperature", pb.SamplingParams(temperature=NAN), "temperature"),
    ("infinite temperature", pb.SamplingParams(temperature=INF), "temperature"),
]


@pytest.mark.parametrize("name,sampling,fragment", BAD_SAMPLING, ids=[b[0] for b in BAD_SAMPLING])
def test_absurd_sampling_values_are_invalid_argument(stub, name, sampling, fragment):
    inference, _ = stub
    assert_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: generate(inference, messages=[user("x")], max_tokens=2, sampling=sampling),
        fragment,
    )


EXTREME_BUT_VALID = [
    ("top_k above the vocabulary", pb.SamplingParams(temperature=0.7, top_k=2**31 - 1, seed=1)),
    ("top_k of one", pb.SamplingParams(temperature=0.7, top_k=1, seed=1)),
    ("huge temperature", pb.SamplingParams(temperature=1e30, seed=1)),
    ("tiny temperature", pb.SamplingParams(temperature=1e-30, seed=1)),
    ("min_p just under 1", pb.SamplingParams(temperature=0.7, min_p=0.999999, seed=1)),
    ("largest seed", pb.SamplingParams(temperature=0.7, seed=2**64 - 1)),
]


def test_extreme_but_valid_sampling_values_generate(daemon, stub, reference):
    inference, _ = stub
    for name, sampling in EXTREME_BUT_VALID:
        events = generate(inference, messages=[user("Say hi.")], max_tokens=3, sampling=sampling)
        assert events[0].HasField("start") and events[-1].HasField("done"), name
        assert 1 <= events[-1].done.usage.completion_tokens <= 3, name
    # None of them left the sampler broken: a sampled turn after them still works.
    events = generate(inference, messages=[user("Say hi.")], max_tokens=3,
                      sampling=pb.SamplingParams(temperature=0.8, top_k=40, seed=7))
    assert events[-1].HasField("done")
    assert_still_serving(daemon, reference)


TRAVERSAL_IDS = ["../../x", "/etc/passwd", "..\\..\\windows", "kv/../../escape", ".", "~root/.ssh"]


def test_path_like_conversation_ids_stay_inside_the_kv_dir(daemon, reference):
    root = daemon.cache_dir
    outside_before = {p for p in root.parent.rglob("*") if "kv" not in p.relative_to(root.parent).parts}
    with Client(daemon.socket) as client:
        for cid in TRAVERSAL_IDS:
            conv = client.conversation(cid, system=SYSTEM)
            turn = conv.send("Hi!", max_tokens=4)
            expected = reference.generate(
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}], 4
            )
            assert turn.token_ids == expected and turn.revision == 1, cid
            assert client.get_conversation(cid).conversation_id == cid
        # Idle: the caches are written behind to the disk tier.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if next(t for t in client.status().cache_tiers if t.name == "disk").entries >= len(TRAVERSAL_IDS):
                break
            time.sleep(0.2)
        files = sorted((root / "kv").iterdir())
        assert len(files) >= len(TRAVERSAL_IDS)
        for path in files:
            stem = path.name.removesuffix(".safetensors")
            assert len(stem) == 64 and all(c in "0123456789abcdef" for c in stem), path.name
        outside_after = {p for p in root.parent.rglob("*") if "kv" not in p.relative_to(root.parent).parts}
        assert outside_after == outside_before
        assert not Path("/x").exists() and not (root.parent / "x").exists()
        for cid in TRAVERSAL_IDS:
            client.delete_conversation(cid)
        assert len(list((root / "kv").iterdir())) == len(files) - len(TRAVERSAL_IDS)


def test_garbage_on_the_socket_does_not_disturb_other_clients(daemon, reference):
    with Client(daemon.socket) as client:
        conv = client.conversation(system=SYSTEM)
        first = conv.send("Hi!", max_tokens=4)
        payloads = [
            b"\x00" * 64,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 4096,  # a preface, then junk frames
            bytes(range(256)) * 64,
        ]
        for payload in payloads:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(5)
            raw.connect(str(daemon.socket))
            raw.sendall(payload)
            try:
                raw.recv(4096)
            except (OSError, socket.timeout):
                pass
            raw.close()
        # A client that connects and then says nothing, held open while others are served.
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(str(daemon.socket))
        try:
            assert_still_serving(daemon, reference)
            turn = conv.send("Bye!", max_tokens=4)
            assert turn.revision == first.revision + 1 and turn.cache_source == "conversation"
        finally:
            idle.close()
    assert "Traceback" not in daemon.log()


def serve_once(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``mlxkvd serve`` expecting it to fail at startup."""
    return subprocess.run(
        [sys.executable, "-m", "mlxkvd", "serve",
         "--socket", str(Path(tempfile.mkdtemp(prefix="mlxkv-")) / "bad.sock"),
         "--cache-dir", str(tmp_path / "cache"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "MLXKV_CONFIG": ""},
    )


def assert_clean_failure(result: subprocess.CompletedProcess, fragment: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode not in (0, None), output
    assert fragment in output, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if " ERROR " in line or "CRITICAL" in line]
    assert len(errors) == 1, output  # one clear line, not a cascade


def test_unknown_model_path_exits_with_a_clear_message(tmp_path):
    result = serve_once(tmp_path, "--model", "/nonexistent/model")
    assert_clean_failure(result, "/nonexistent/model is not a usable model directory: it does not exist")


def _missing_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _truncated_weights(d: Path) -> None:
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _garbage_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x00" * 4096)


def _corrupt_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def _missing_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").unlink()


# Each breakage, and what the error says: the catalogue's checks name what is missing or
# unreadable before loading; the rest fails in the loader.
BROKEN_MODELS = {
    "missing weights": (_missing_weights, "is not a usable model directory: it has no .safetensors weights"),
    "truncated weights": (_truncated_weights, "cannot load model from"),
    "garbage weights": (_garbage_weights, "cannot load model from"),
    "corrupt config.json": (_corrupt_config, "is not a usable model directory: its config.json is not valid JSON"),
    "missing tokenizer": (_missing_tokenizer, "cannot load model from"),
}


@pytest.mark.parametrize("breakage", list(BROKEN_MODELS))
def test_broken_model_directory_exits_with_a_clear_message(model_dir, tmp_path, breakage):
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    breaks, says = BROKEN_MODELS[breakage]
    breaks(broken)
    result = serve_once(tmp_path, "--model", str(broken))
    assert_clean_failure(result, f"{broken}" if says.startswith("is ") else f"{says} {broken}")
    assert says in result.stderr

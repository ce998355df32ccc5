"""Errors and access control of the HTTP gateway: each error in the shape of the API that was
called (the SDKs raise their typed errors), the API key, the body cap, where it listens; and
the gRPC service goes on serving throughout."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anthropic
import openai
import pytest

import httpd
from conftest import wait_for
from mlxkv import Client
from mlxkvd.lifecycle import EXIT_HTTP

pytestmark = pytest.mark.model

CAP = 64 * 1024  # --max-message-bytes, the smallest allowed
USER = [{"role": "user", "content": "Hi"}]
# Every route, with the API whose error shape it answers in.
ROUTES = [
    ("GET", "/v1/models", "openai"),
    ("GET", f"/v1/models/{httpd.MODEL}", "openai"),
    ("POST", "/v1/chat/completions", "openai"),
    ("POST", "/v1/responses", "openai"),
    ("GET", "/v1/responses/resp_1", "openai"),
    ("DELETE", "/v1/responses/resp_1", "openai"),
    ("POST", "/v1/mlxkv/warm", "openai"),
    ("POST", "/v1/messages", "anthropic"),
    ("POST", "/v1/messages/count_tokens", "anthropic"),
    ("GET", "/no/such/route", "openai"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir, model_dir):
    d = httpd.start(tmp_path_factory.mktemp("errors"), cache_dir, "--max-message-bytes", "64KiB")
    yield d
    d.daemon.stop()


def oai(served, key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key or served.key, max_retries=0, timeout=60)


def ant(served, key=None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key=key or served.key, max_retries=0, timeout=60)


def assert_shape(api: str, body: dict, error_type: str) -> str:
    """The error's message, after checking the body is ``api``'s error shape with that type."""
    if api == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == error_type or body["error"]["code"] == error_type
        return body["error"]["message"]
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    return body["error"]["message"]


def test_malformed_json_is_400_in_each_shape(served):
    auth = {"Authorization": f"Bearer {served.key}"}
    for path, api in [("/v1/chat/completions", "openai"), ("/v1/responses", "openai"), ("/v1/messages", "anthropic"),
                      ("/v1/messages/count_tokens", "anthropic")]:
        for body in (b'{"model": ', b"[1, 2]"):
            status, reply = served.request("POST", path, body, auth)
            assert status == 400
            assert_shape(api, reply, "invalid_request_error")


def test_without_a_valid_key_only_health_answers(served):
    assert served.request("GET", "/health") == (200, {"status": "ok", "model": httpd.MODEL})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
                    {"Authorization": served.key}):  # no Bearer scheme
        for method, path, api in ROUTES:
            status, body = served.request(method, path, b"{}" if method == "POST" else None, headers)
            assert status == 401, (path, headers)
            assert_shape(api, body, "invalid_api_key" if api == "openai" else "authentication_error")
    with pytest.raises(openai.AuthenticationError):
        oai(served, "wrong").chat.completions.create(model=httpd.MODEL, messages=USER, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        oai(served, "wrong").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        ant(served, "wrong").messages.create(model=httpd.MODEL, messages=USER, max_tokens=4)
    with pytest.raises(anthropic.AuthenticationError):
        ant(served, "wrong").messages.count_tokens(model=httpd.MODEL, messages=USER)
    # Either header carries the key, whichever API is called.
    assert served.request("GET", "/v1/models", None, {"x-api-key": served.key})[0] == 200
    assert served.request("GET", "/v1/models", None, {"Authorization": f"bearer {served.key}"})[0] == 200


def test_unknown_model_is_404(served):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            oai(served).chat.completions.create(model="gpt-4o", messages=USER, max_tokens=4, stream=stream)
        assert caught.value.code == "model_not_found"
        with pytest.raises(anthropic.NotFoundError) as caught:
            ant(served).messages.create(model="claude-sonnet-4-5", messages=USER, max_tokens=4, stream=stream)
        assert caught.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        oai(served).models.retrieve("gpt-4o")
    with pytest.raises(anthropic.NotFoundError):
        ant(served).messages.count_tokens(model="claude-sonnet-4-5", messages=USER)
    with pytest.raises(anthropic.NotFoundError):
        ant(served).models.retrieve("claude-sonnet-4-5")


def test_body_over_the_cap_is_413(served):
    big = [{"role": "user", "content": "x" * (CAP + 1)}]
    with pytest.raises(openai.APIStatusError) as caught:
        oai(served).chat.completions.create(model=httpd.MODEL, messages=big, max_tokens=4)
    assert caught.value.status_code == 413
    assert_shape("openai", caught.value.response.json(), "request_too_large")
    with pytest.raises(openai.APIStatusError) as caught:
        oai(served).responses.create(model=httpd.MODEL, input=big, max_output_tokens=4)
    assert caught.value.status_code == 413
    with pytest.raises(anthropic.ContentTooLargeError) as caught:
        ant(served).messages.create(model=httpd.MODEL, messages=big, max_tokens=4)
    assert_shape("anthropic", caught.value.response.json(), "request_too_large")
    # A chunked body (no Content-Length) is cut off as it arrives, not read whole first.
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    chunks = (b"x" * 16384 for _ in range(64))  # 1 MiB
    conn.request("POST", "/v1/messages", body=chunks, encode_chunked=True,
                 headers={"x-api-key": served.key, "Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    assert response.status == 413
    assert_shape("anthropic", json.loads(response.read()), "request_too_large")
    conn.close()


def test_context_overflow_is_400_with_a_clear_message(served):
    long = [{"role": "user", "content": "hello " * 10_000}]  # over 8192 tokens, under the 64 KiB cap
    with pytest.raises(openai.BadRequestError, match="context window is 8192") as caught:
        oai(served).chat.completions.create(model=httpd.MODEL, messages=long, max_tokens=4)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context window is 8192") as caught:
        oai(served).responses.create(model=httpd.MODEL, input=long, max_output_tokens=4, stream=True)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(anthropic.BadRequestError, match="context window is 8192"):
        ant(served).messages.create(model=httpd.MODEL, messages=long, max_tokens=4, stream=True)


def test_requests_the_model_cannot_serve_are_400(served):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]}]
    for options, match in [({"messages": USER, "n": 2}, "n must be 1"),
                           ({"messages": image}, "text only"),
                           ({"messages": [{"role": "function", "content": "x"}]}, "role"),
                           ({"messages": USER, "temperature": -1}, "temperature")]:
        with pytest.raises(openai.BadRequestError, match=match):
            oai(served).chat.completions.create(model=httpd.MODEL, max_tokens=4, **options)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        ant(served).post("/v1/messages", cast_to=object, body={"model": httpd.MODEL, "messages": USER})
    image = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                       "data": ""}}]}]
    with pytest.raises(anthropic.BadRequestError, match="text only"):
        ant(served).messages.create(model=httpd.MODEL, messages=image, max_tokens=4)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_disconnects_cancels_its_turn(served, stream):
    cancelled = served.daemon.log().count("cancelled: generated=")
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    body = {"model": httpd.MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "stream": stream, "temperature": 0}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {served.key}", "Content-Type": "application/json"})
    if stream:
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the first token is out
    else:
        time.sleep(1.0)  # generating: no response before all 400 tokens
    conn.close()
    wait_for(lambda: served.daemon.log().count("cancelled: generated=") > cancelled, timeout=30)
    reply = oai(served).chat.completions.create(model=httpd.MODEL, messages=USER, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: it only picks the outgoing address
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_loopback_gateway_is_not_reachable_from_other_addresses(served):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, served.port), timeout=5).close()


def test_grpc_is_served_throughout(served):
    """Last of the daemon's tests: after every bad request above, a gRPC turn still works."""
    with Client(served.daemon.socket, timeout=60) as client:
        assert client.ask("Hi", max_tokens=4).completion_tokens >= 1


# --- starting: where it listens and its key, before the model is loaded ----------------------


def _serve(tmp_path: Path, cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    sock = Path(tempfile.mkdtemp(prefix="mlxkv-")) / "d.sock"
    return subprocess.run(
        [sys.executable, "-m", "mlxkvd", "serve", "--socket", str(sock), "--cache-dir", str(cache_dir), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "MLXKV_CONFIG": ""},
    )


@pytest.mark.parametrize("address", ["0.0.0.0", "[::]", "example.com"])
def test_a_non_loopback_address_needs_the_force_flag(tmp_path, cache_dir, address):
    proc = _serve(tmp_path, cache_dir, "--http", f"{address}:{httpd.free_port()}",
                  "--http-api-key-file", str(tmp_path / "api-key"))
    assert proc.returncode == EXIT_HTTP
    assert "not a loopback address" in proc.stderr and "--http-allow-any-address" in proc.stderr


def test_the_force_flag_listens_on_every_address(tmp_path, make_daemon):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    port = httpd.free_port()
    make_daemon("--http", f"0.0.0.0:{port}", "--http-allow-any-address", "--http-api-key-file", str(tmp_path / "k"))
    key = (tmp_path / "k").read_text().strip()
    client = openai.OpenAI(base_url=f"http://{address}:{port}/v1", api_key=key, max_retries=0, timeout=60)
    assert [m.id for m in wait_for(lambda: _models(client))] == [httpd.MODEL]


def _models(client):
    try:
        return list(client.models.list())
    except openai.APIConnectionError:
        return None


def test_a_key_file_others_can_read_is_refused_and_left_alone(tmp_path, cache_dir):
    key_file = tmp_path / "api-key"
    key_file.write_text("secret\n")
    key_file.chmod(0o640)
    proc = _serve(tmp_path, cache_dir, "--http", f"127.0.0.1:{httpd.free_port()}", "--http-api-key-file", str(key_file))
    assert proc.returncode == EXIT_HTTP
    assert "can be read or written by others" in proc.stderr and "chmod 600" in proc.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o640


def test_api_key_command_makes_the_key_once(tmp_path):
    key_file = tmp_path / "new" / "api-key"

    def api_key() -> str:
        proc = subprocess.run([sys.executable, "-m", "mlxkvd", "api-key", "--http-api-key-file", str(key_file)],
                              capture_output=True, text=True, env={**os.environ, "MLXKV_CONFIG": ""}, check=True)
        return proc.stdout.strip()

    key = api_key()
    assert len(key) >= 40 and key_file.read_text() == key + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert api_key() == key

"""Smoke tests of the benchmarks: they run end to end and report sane figures.

No timing is asserted: the machines are shared and noisy. These run the real default model,
a real daemon and a real ``mlx_lm.server``, so they take minutes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.model]


def _run(module: str, out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXKV_") or k == "MLXKV_BLAS_PRELOADED"}
    return subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_multiturn_quick(tmp_path):
    proc = _run("bench.multiturn", tmp_path, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "multiturn.json").read_text())
    assert (tmp_path / "multiturn.png").stat().st_size > 0
    assert "## ide_chat" in (tmp_path / "multiturn.md").read_text()
    assert report["systems"] == ["stateless", "mlx_lm_server", "mlxkvd"]
    assert set(report["workloads"]) == {"ide_chat", "restart", "many_chats", "shared_prefix"}
    for name, workload in report["workloads"].items():
        steps = len(workload["schedule"])
        for system in report["systems"]:
            result = workload["results"][system]
            assert len(result["turns"]) == steps, (name, system)
            assert result["peak_rss_bytes"] > 100 * 2**20, (name, system)
            for turn in result["turns"]:
                assert _positive(turn["ttft_s"]), (name, system, turn)
                assert turn["total_s"] >= turn["ttft_s"], (name, system, turn)
                assert _positive(turn["prompt_tokens"]), (name, system, turn)
                assert turn["completion_tokens"] >= 1, (name, system, turn)
                assert turn["reused_tokens"] is not None and turn["prefilled_tokens"] is not None
                assert turn["prefilled_tokens"] + turn["reused_tokens"] == turn["prompt_tokens"]
        for turn in workload["results"]["stateless"]["turns"]:
            assert turn["reused_tokens"] == 0
    ide = report["workloads"]["ide_chat"]
    # Turns after the first reuse the conversation's cache on both caching servers.
    for system in ("mlxkvd", "mlx_lm_server"):
        for turn in ide["results"][system]["turns"][1:]:
            assert turn["reused_tokens"] > 0, (system, turn)
    assert all(t.get("limit_ttft_s", 0) > 0 for t in ide["results"]["stateless"]["turns"][1:])
    # After the restart, mlxkvd got the conversation back (transparent re-send).
    restart = report["workloads"]["restart"]
    first_after = restart["results"]["mlxkvd"]["turns"][restart["restart_after"]]
    assert first_after["resent"] is True
    summary = ide["summary"]
    for key in ("last_turn_stateless_over_mlxkvd", "last_turn_mlx_lm_server_over_mlxkvd",
                "mlxkvd_over_limit_median"):
        assert _positive(summary[key]), key
    assert report["headline"]


def test_turn_latency_quick(tmp_path):
    proc = _run("bench.turn_latency", tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "turn_latency.json").read_text())
    s = report["summary"]
    for key in ("a_cached_ttft_s", "b_scratch_daemon_ttft_s", "b_scratch_in_process_ttft_s",
                "b_daemon_over_a", "c_socket_decode_tps", "c_in_process_generation_tps",
                "c_socket_over_in_process", "daemon_peak_rss_bytes"):
        assert _positive(s[key]), key
    for rep in report["repetitions"]:
        # (a) reused the history; (b) really started from scratch; both asked the same prompt.
        assert rep["cached"]["reused_tokens"] > 0.8 * rep["prompt_tokens"]
        assert rep["scratch_daemon"]["reused_tokens"] == 0
        assert rep["in_process_prompt_tokens"] == rep["prompt_tokens"]
    assert (tmp_path / "turn_latency.md").read_text().startswith("# mlxkv turn latency")


def test_turn_overhead_quick(tmp_path):
    proc = _run("bench.turn_overhead", tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "turn_overhead.json").read_text())
    assert [s["size"] for s in report["sizes"]] == [1000, 4000]
    for size in report["sizes"]:
        assert size["first_turn_mlxkvd_prompt_tokens"] == size["first_turn_prompt_tokens"]
        assert len(size["turns"]) == 2
        for turn in size["turns"]:
            for system in ("mlxkvd", "mlx_lm_server", "limit"):
                assert _positive(turn[system]["ttft_s"]), (system, turn)
            kv, limit = turn["mlxkvd"], turn["limit"]
            # The limit replays the very prompt mlxkvd rendered, onto the same history.
            assert kv["prompt_tokens"] == turn["prompt_tokens"]
            # A cached turn: the history reused, about the new message prefilled.
            assert kv["cached_tokens"] + kv["prefill_tokens"] == kv["prompt_tokens"]
            assert kv["cached_tokens"] > 0.5 * kv["prompt_tokens"], turn
            assert 0 < limit["prefill_tokens"] < 0.5 * turn["prompt_tokens"], turn
            assert limit["ttft_s"] == min(limit["two_pass_s"], limit["one_pass_s"])
            assert turn["mlx_lm_server"]["cached_tokens"] > 0, turn
            for system in ("mlxkvd", "mlx_lm_server"):
                assert math.isfinite(turn["overhead_ms"][system])
    assert isinstance(report["verdict"]["met"], bool)
    assert (tmp_path / "turn_overhead.md").read_text().startswith("# mlxkv per-turn overhead")


def test_write_behind_quick(tmp_path):
    proc = _run("bench.write_behind", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "write_behind.json").read_text())
    assert [r["tokens"] for r in report["rows"]] == [500, 2000]
    for row in report["rows"]:
        assert row["file_bytes"] > 0
        for key in ("at_once_held_s", "background_held_s", "background_in_place_s"):
            assert _positive(row[key]), (key, row)
        # The file is in place only after the call that started it returned.
        assert row["background_in_place_s"] >= row["background_held_s"]
    assert (tmp_path / "write_behind.md").read_text().startswith("# Write-behind")

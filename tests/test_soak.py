"""A bounded soak: many turns over more conversations than the memory budget holds (eviction
to disk and back, disk eviction too); the daemon's RSS does not grow beyond its budgets
(issue #6, part 6). bench/reliability.py runs the full 500-turn version."""

from __future__ import annotations

import os

from conftest import tier

from mlxkv import Client

CONVERSATIONS = 20
TURNS = int(os.environ.get("MLXKV_SOAK_TURNS", "150"))
WARMUP_TURNS = 50
MAX_TOKENS = 3
SYSTEM = "You are a terse assistant. Reply with a few words."
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
# Room for three conversations of up to 512 tokens (six of the shorter ones, under 256).
MEMORY_BUDGET = 3 * 512 * KV_BYTES_PER_TOKEN
DISK_BUDGET = 64 * 1024 * 1024
MARGIN = 150 * 1024 * 1024
CHECK_EVERY = 25  # turns compared with the no-cache reference


def test_soak_rss_stays_within_budgets(make_daemon, reference, tmp_path):
    daemon = make_daemon(
        "--max-cache-bytes", str(MEMORY_BUDGET),
        "--max-disk-bytes", str(DISK_BUDGET),
        cache=tmp_path / "cache",
    )
    rss = []
    with Client(daemon.socket) as client:
        chats = [client.conversation(system=SYSTEM) for _ in range(CONVERSATIONS)]
        for n in range(TURNS):
            conv = chats[n % CONVERSATIONS]
            history = [dict(m) for m in conv.messages]
            question = f"Turn {n}: name a number near {n}."
            turn = conv.send(question, max_tokens=MAX_TOKENS)
            if n % CHECK_EVERY == CHECK_EVERY - 1:
                history.append({"role": "user", "content": question})
                assert turn.token_ids == reference.generate(history, MAX_TOKENS), n
            status = client.status()
            assert tier(status, "memory").bytes <= MEMORY_BUDGET
            assert tier(status, "disk").bytes <= DISK_BUDGET
            rss.append(status.rss_bytes)
        status = client.status()
    assert status.requests == TURNS and status.requests_failed == 0
    memory, disk = tier(status, "memory"), tier(status, "disk")
    assert memory.entries < CONVERSATIONS and disk.hits > 0, "the soak should have gone through the disk tier"
    warm = rss[WARMUP_TURNS - 1]
    assert rss[-1] <= warm + MEMORY_BUDGET + MARGIN, (warm, rss[-1])
    assert max(rss[WARMUP_TURNS:]) <= warm + MEMORY_BUDGET + MARGIN, (warm, max(rss))
    assert "Traceback" not in daemon.log()

"""How the ``mlxkv`` command shows things in a terminal: a turn's statistics, tool calls, the
daemon's status, the model catalogue and the stored conversations, as text and tables."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from mlxkv.conversation import ToolCall, Turn

CACHE_SOURCE_LABELS = {
    "none": "no cache",
    "conversation": "from conversation",
    "shared_prefix": "from shared prefix",
    "disk": "from disk",
    "checkpoint": "from turn checkpoint",
}


def format_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """3725 -> '1h 2m 5s'."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{s}s")
    return " ".join(parts)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def format_stats(turn: Turn) -> str:
    """The per-turn line of ``--stats``."""
    parts = [
        f"cached {turn.cached_tokens}",
        f"prefilled {turn.prefill_tokens}",
        f"ttft {turn.time_to_first_token_s:.2f}s",
        f"{turn.decode_tokens_per_s:.1f} tok/s",
        CACHE_SOURCE_LABELS.get(turn.cache_source, turn.cache_source),
    ]
    if turn.drafted_tokens:
        parts.append(f"drafts {turn.accepted_tokens}/{turn.drafted_tokens} accepted")
    if turn.resent:
        parts.append("transcript re-sent")
    if turn.cache_miss_reason:
        parts.append(turn.cache_miss_reason)
    return "[" + " · ".join(parts) + "]"


def format_tool_call(call: ToolCall) -> str:
    """The line printed for a tool call the model made: ``[tool call] name({...})``."""
    return f"[tool call] {call.name}({call.arguments_json})"


def format_status(status: Any) -> str:
    """The ``mlxkv status`` report: a summary table, then one row per cache tier."""
    state = status.model_state or ("loaded" if status.model_loaded else "unloaded")
    if state == "loading":
        state = f"loading {status.load_progress:.0%}"
    summary = [
        ("model", status.model + ("" if state == "loaded" else f" ({state})")),
        ("directory", status.model_path or "-"),
        ("backend", status.backend),
        ("weights dtype", status.weights_dtype or "-"),
        ("context length", status.context_length or "-"),
        ("version", status.version or "-"),
        ("socket", status.socket or "-"),
        ("uptime", format_duration(status.uptime_s)),
        ("requests", f"{status.requests} ({status.requests_failed} failed, {status.active_requests} active)"),
        ("conversations", status.conversations),
        ("tokens saved", status.tokens_saved),
        ("tokens prefilled", status.tokens_prefilled),
        ("tokens generated", status.tokens_generated),
        ("speculative", f"{status.tokens_accepted}/{status.tokens_drafted} drafts accepted"
                        + (f" (draft model {status.draft_model})" if status.draft_model else "")),
        ("rss", format_bytes(status.rss_bytes)),
    ]
    width = max(len(k) for k, _ in summary)
    lines = [f"{k.ljust(width)}  {v}" for k, v in summary]
    if status.cache_tiers:
        rows = []
        for tier in status.cache_tiers:
            lookups = tier.hits + tier.misses
            rate = f"{100 * tier.hits / lookups:.1f}%" if lookups else "-"
            budget = format_bytes(tier.budget_bytes) if tier.budget_bytes else "-"
            in_flight = format_bytes(tier.in_flight_bytes) if tier.in_flight_bytes else "-"
            rows.append((tier.name, tier.entries, format_bytes(tier.bytes), in_flight, budget,
                         tier.hits, tier.misses, rate))
        header = ("tier", "entries", "bytes", "in flight", "budget", "hits", "misses", "hit rate")
        lines += ["", format_table(header, rows)]
    return "\n".join(lines)


def format_models(models: Sequence[Any]) -> str:
    """The ``mlxkv models`` table."""
    rows = [
        (
            ("* " if m.loaded else "  ") + m.name,
            m.source,
            format_bytes(m.size_bytes) if m.ready else f"{format_bytes(m.size_bytes)} (not converted)",
            m.quantization or "-",
            m.context_length or "-",
            m.path,
        )
        for m in models
    ]
    return format_table(("  name", "source", "size", "quantization", "context", "path"), rows)


def format_conversations(conversations: Sequence[Any]) -> str:
    """The ``mlxkv conversations ls`` table."""
    rows = [
        (
            c.conversation_id,
            c.revision,
            c.tokens,
            c.cache_tier or "-",
            format_bytes(c.cache_bytes),
            dt.datetime.fromtimestamp(c.updated_at).strftime("%Y-%m-%d %H:%M:%S") if c.updated_at else "-",
        )
        for c in conversations
    ]
    return format_table(("id", "revision", "tokens", "tier", "bytes", "updated"), rows)


# --- commands -------------------------------------------------------------------------------

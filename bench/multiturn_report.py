"""The report of ``bench.multiturn``: its markdown tables, headline ratios and TTFT plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench import common


def markdown(report: dict) -> str:
    lines = [f"# mlxkv multi-turn benchmark ({'quick' if report['quick'] else 'full'})", ""]
    meta = report["meta"]
    lines.append(f"Model {meta['model']} (float32 weights, OpenBLAS preloaded: {meta['blas_preloaded']}), "
                 f"{meta['cpus']} CPUs, load average at start {meta['loadavg_at_start']}. "
                 "TTFT is measured by the client, in seconds; warm-up excluded.")
    lines.append("")
    systems = report["systems"]
    for name, wl in report["workloads"].items():
        res = wl["results"]
        lines.append(f"## {name}")
        lines.append("")
        lines.append(wl["description"])
        lines.append("")
        headers = ["step", "conv", "turn"]
        for s in systems:
            headers += [f"{s} TTFT", f"{s} prefilled/reused"]
        if name == "ide_chat" and "stateless" in systems:
            headers += ["limit TTFT (prefilled)"]
        rows = []
        for i, (chat, turn) in enumerate(wl["schedule"]):
            row: list[Any] = [i + 1, chat + 1, turn + 1]
            for s in systems:
                t = (res.get(s) or {}).get("turns") or []
                if i < len(t):
                    row += [t[i]["ttft_s"], f"{common.fmt(t[i]['prefilled_tokens'])}/{common.fmt(t[i]['reused_tokens'])}"]
                else:
                    row += [None, None]
            if name == "ide_chat" and "stateless" in systems:
                t = (res.get("stateless") or {}).get("turns") or []
                lim = t[i].get("limit_ttft_s") if i < len(t) else None
                row += [f"{common.fmt(lim)} ({t[i].get('limit_prefill_tokens')})" if lim else "-"]
            rows.append(row)
        lines.append(common.markdown_table(headers, rows))
        lines.append("")
        rows = []
        for s in systems:
            r = res.get(s)
            if not r:
                continue
            t = r["turns"]
            rows.append([s, common.median([x["ttft_s"] for x in t]),
                         common.median([x["decode_tps"] for x in t if x["completion_tokens"] > 1]),
                         sum(x["completion_tokens"] for x in t), sum(x["total_s"] for x in t),
                         f"{r['peak_rss_bytes'] / 2**20:.0f}", r.get("copied_from") or ""])
        lines.append(common.markdown_table(
            ["system", "median TTFT s", "median decode tok/s", "tokens generated", "sum of turn times s",
             "peak RSS MiB", "note"], rows))
        lines.append("")
        summary = {k: v for k, v in wl["summary"].items() if k != "per_step"}
        lines.append(common.markdown_table(["figure", "value"], [[k, v] for k, v in summary.items()]))
        lines.append("")
    lines.append("## Headline ratios")
    lines.append("")
    lines.append(common.markdown_table(["ratio", "measured", "target"], report["headline"]))
    lines.append("")
    return "\n".join(lines)


def headline(report: dict) -> list[list[Any]]:
    wl = report["workloads"]
    rows = []
    if "ide_chat" in wl:
        s = wl["ide_chat"]["summary"]
        rows.append([f"IDE chat turn {s['last_turn']}: stateless TTFT / mlxkvd TTFT",
                     s["last_turn_stateless_over_mlxkvd"], ">= 10x"])
        rows.append([f"IDE chat turn {s['last_turn']}: mlx_lm.server TTFT / mlxkvd TTFT",
                     s["last_turn_mlx_lm_server_over_mlxkvd"], "-"])
        rows.append(["IDE chat turns 2+: median mlx_lm.server / mlxkvd TTFT",
                     s["median_cached_turn_mlx_lm_server_over_mlxkvd"], "-"])
        rows.append(["IDE chat turns 2+: median mlxkvd TTFT / in-process warm-cache TTFT (physical limit)",
                     s.get("mlxkvd_over_limit_median"), "<= 1.15x"])
        rows.append(["IDE chat: median decode tok/s mlxkvd (socket) / in-process",
                     s.get("decode_mlxkvd_over_in_process_median"), ">= 0.95x"])
        rows.append(["IDE chat: median decode tok/s mlx_lm.server (HTTP) / in-process",
                     s.get("decode_mlx_lm_server_over_in_process_median"), "-"])
    if "restart" in wl:
        s = wl["restart"]["summary"]
        rows.append([f"Restart, turn {s.get('restart_step')} (first after restart): mlx_lm.server / mlxkvd TTFT",
                     s.get("restart_turn_mlx_lm_server_over_mlxkvd"), "-"])
        rows.append([f"Restart, turn {s.get('restart_step')}: stateless / mlxkvd TTFT",
                     s.get("restart_turn_stateless_over_mlxkvd"), "-"])
    if "many_chats" in wl:
        s = wl["many_chats"]["summary"]
        rows.append(["Many chats, turns 2+: median mlx_lm.server / mlxkvd TTFT",
                     s["later_turns_mlx_lm_server_over_mlxkvd"], "-"])
        rows.append(["Many chats, turns 2+: median stateless / mlxkvd TTFT",
                     s["later_turns_stateless_over_mlxkvd"], "-"])
    if "shared_prefix" in wl:
        s = wl["shared_prefix"]["summary"]
        rows.append(["Shared prefix, conversations 2+: median mlx_lm.server / mlxkvd TTFT",
                     s["convs_2_on_mlx_lm_server_over_mlxkvd"], "-"])
        rows.append(["Shared prefix, conversations 2+: median stateless / mlxkvd TTFT",
                     s["convs_2_on_stateless_over_mlxkvd"], "-"])
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        wl = report["workloads"][name]
        for system in report["systems"]:
            turns = (wl["results"].get(system) or {}).get("turns") or []
            if turns:
                ax.plot([t["step"] for t in turns], [t["ttft_s"] for t in turns], marker="o", ms=3, label=system)
        if name == "ide_chat":
            turns = (wl["results"].get("stateless") or {}).get("turns") or []
            pts = [(t["step"], t["limit_ttft_s"]) for t in turns if t.get("limit_ttft_s")]
            if pts:
                ax.plot(*zip(*pts), linestyle="--", color="gray", label="in-process warm cache (limit)")
        if wl.get("restart_after") is not None:
            ax.axvline(wl["restart_after"] + 0.5, color="red", linestyle=":", label="restart")
        ax.set_title(name)
        ax.set_xlabel("turn (in sending order)")
        ax.set_ylabel("time to first token, s")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"mlxkv multi-turn TTFT ({'quick' if report['quick'] else 'full'}), {report['meta']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

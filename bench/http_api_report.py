"""The report of ``bench.http_api``: its markdown."""

from __future__ import annotations

from typing import Any

from bench import common

TARGET_OVERHEAD_MS = 2.0


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    ms = lambda s: None if s is None else s * 1000  # noqa: E731
    lines = [
        f"# mlxkv HTTP gateway{' (quick)' if report['quick'] else ''}", "",
        f"{m['cpus']} CPUs, {m['platform']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'] or ())}; mlx {m.get('mlx')}, "
        f"mlx-lm {m.get('mlx_lm')}, openai {m.get('openai')}; OpenBLAS preloaded: {m['blas_preloaded']}; daemon code: "
        f"{m['git']}. Wall time {report['wall_s']:.0f} s.", "",
    ]
    if report.get("overhead"):
        a = report["args"]
        lines += [
            "## Overhead: OpenAI API (HTTP) against the socket (gRPC), same turns", "",
            f"One daemon per model; per path, conversations of {a['block_turns']} measured turns (after one "
            "unmeasured turn), the paths interleaved turn by turn in rotating order. A system prompt with tools of "
            f"~{a['history']} tokens, then every turn adds one sentence and generates 1 token, greedy. TTFT client "
            "side, ms: **gRPC** = `mlxkv` client, call to the first delta with a token; **SDK** = the official `openai` "
            "SDK (streamed, one kept-alive client, `prompt_cache_key`), call to the first chunk; **SDK from sent** = "
            "the same from the moment the SDK hands the request to its HTTP client (before it, **SDK prepare**: the "
            "SDK's Python request building, which grows with the number of messages); **plain HTTP** = the same "
            "request body on a kept-alive `http.client` connection, call to the first chunk: the gateway without "
            f"the SDK. OpenBLAS threads per server: {a['blas_threads']}.", "",
        ]
        rows = []
        for o in report["overhead"]:
            s = o["summary"]
            rows.append([o["model"], s["n"], f"{s['history_tokens'][0]}-{s['history_tokens'][1]}",
                         f"{s['request_messages'][0]}-{s['request_messages'][1]}",
                         s["grpc_median_ms"], s["raw_median_ms"], s["http_median_ms"], s["http_sent_median_ms"],
                         s["sdk_prepare_median_ms"], s["grpc_p90_ms"], s["raw_p90_ms"], s["http_p90_ms"],
                         f"{s['same_prefill']}/{s['n']}"])
        lines.append(common.markdown_table(
            ["model", "turns", "prompt tokens", "messages sent", "gRPC median", "plain HTTP median", "SDK median",
             "SDK from sent median", "SDK prepare median", "gRPC p90", "plain HTTP p90", "SDK p90",
             "same tokens prefilled"], rows))
        lines += ["", f"Differences to gRPC, ms (target: HTTP - gRPC <= {TARGET_OVERHEAD_MS:g} ms at the median):", ""]
        rows = []
        names = {"raw": "plain HTTP", "http_sent": "SDK from sent", "http": "SDK"}
        for o in report["overhead"]:
            s = o["summary"]
            for path, name in names.items():
                lo, hi = s[f"{path}_paired_difference_ci95_ms"]
                rows.append([o["model"], name, s[f"{path}_minus_grpc_median_ms"], s[f"{path}_paired_difference_median_ms"],
                             f"{lo:.2f} to {hi:.2f}", s[f"{path}_minus_grpc_p90_ms"],
                             "met" if s["met"][path] else "not met"])
        lines.append(common.markdown_table(
            ["model", "path", "median - gRPC median", "median of per-turn differences", "its 95% interval (bootstrap)",
             "p90 - gRPC p90", "target"], rows))
        lines += ["", "The interval is that of the median of the per-turn differences (2,000 bootstrap resamples): "
                  f"where it is much wider than {TARGET_OVERHEAD_MS:g} ms, this run's noise does not resolve the "
                  "difference, whatever the verdict.", ""]
    ide = report.get("ide_chat")
    if ide:
        s = ide["summary"]
        lines += [
            "## IDE chat: mlxkvd's OpenAI API against mlx_lm.server's", "",
            f"Model {ide['model']} (float32 for both), system prompt with tools {ide['system_tokens']} tokens, user "
            f"messages {min(ide['user_tokens'])}-{max(ide['user_tokens'])} tokens, max_tokens {ide['max_tokens']}, "
            "greedy, the `openai` SDK streaming the full history to both. TTFT = first chunk with text, ms. Turn 1 "
            f"is cold; turn {ide['restart']['turn']} comes after both servers were restarted (no warm-up). "
            f"OpenBLAS threads per server: {report['args']['blas_threads']}.", "",
        ]
        rows = []
        for t in ide["turns"] + [ide["restart"]]:
            k, lm = t["mlxkvd"], t["mlx_lm_server"]
            rows.append([f"{t['turn']}{' (after restart)' if t is ide['restart'] else ''}", k["prompt_tokens"],
                         ms(k["ttft_text_s"]), f"{k['cached_tokens']}/{k['prefilled_tokens']}",
                         ms(lm["ttft_text_s"]), f"{lm['cached_tokens']}/{lm['prefilled_tokens']}",
                         t["mlx_lm_server_over_mlxkvd"], ms(k.get("server_cpu_to_text_s")),
                         ms(lm.get("server_cpu_to_text_s")), t.get("cpu_mlx_lm_server_over_mlxkvd"),
                         "yes" if t["same_reply"] else "no"])
        lines.append(common.markdown_table(
            ["turn", "prompt tokens", "mlxkvd TTFT", "mlxkvd reused/prefilled", "mlx_lm.server TTFT",
             "mlx_lm.server reused/prefilled", "mlx_lm.server / mlxkvd", "mlxkvd CPU", "mlx_lm.server CPU",
             "CPU ratio", "same reply"], rows))
        lines += ["", "**CPU**: the server process's CPU time (all threads) from the request to the first text, ms: "
                  "the work each server did for the first token, which the load of a shared machine does not change "
                  "the way it changes wall time."]
        verdict = {True: "met", False: "not met", None: "not measured"}[s["mlxkvd_no_slower_every_cached_turn"]]
        lines += ["", f"Cached turns (2-{ide['turns'][-1]['turn']}): mlx_lm.server / mlxkvd "
                  f"{common.fmt(s['cached_turn_ratio_min'])}-{common.fmt(s['cached_turn_ratio_max'])} (median "
                  f"{common.fmt(s['cached_turn_ratio_median'])}); target mlxkvd no slower on any cached turn: "
                  f"**{verdict}**. After the restart: mlx_lm.server / mlxkvd **{common.fmt(s['restart_ratio'])}x**."
                  + (f" CPU time to the first text, mlx_lm.server / mlxkvd: cached turns "
                     f"{common.fmt(s['cached_turn_cpu_ratio_min'])}-{common.fmt(s['cached_turn_cpu_ratio_max'])} "
                     f"(median {common.fmt(s['cached_turn_cpu_ratio_median'])}), after the restart "
                     f"{common.fmt(s['restart_cpu_ratio'])}." if s.get("cached_turn_cpu_ratio_median") else ""), ""]
    return "\n".join(lines) + "\n"

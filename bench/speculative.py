"""Decode speed with and without speculative decoding: ``python -m bench.speculative``.

Two workloads on the default model, greedy, through one daemon (one-shot turns, so that no turn
reuses another's reply):

  code edit  a source file of this repository (``--file``, 150-300 lines) in the prompt and a
             request for the whole file back with one function renamed; the first
             ``--max-tokens`` (256) tokens of the answer are timed.
  prose      an open question, ``--prose-tokens`` (128) tokens.

Three modes: off, prompt-lookup, and draft, with a draft model made from the default model by
skipping layers (``bench.drafts``: no smaller model shares its tokenizer here; it costs 24/30 of
the target per draft token and agrees on about a third, so it shows the mechanism's cost, not
the speed of a real small draft). Each workload runs ``--repeats`` (2) times per mode, the
order reversed every other repeat to cancel drift. Decode tokens/s is the daemon's
(``Done.timings``: tokens after the first over the time after it); the acceptance rate is
accepted / drafted draft tokens. Each mode's replies are compared token by token with off's. Writes ``speculative.json`` and ``speculative.md``
under ``--out``; ``--quick``: 48 and 24 tokens, one repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench import common

REPO = Path(__file__).resolve().parents[1]
MODES = ("off", "prompt-lookup", "draft")
SPECULATIVE = MODES[1:]
SYSTEM = "You are a coding assistant. Answer with code only."
PROSE = "Why do some programming languages use garbage collection while others do not? Explain."


def workloads(args: argparse.Namespace) -> dict[str, tuple[list[dict[str, str]], int]]:
    code = (REPO / args.file).read_text()
    edit = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Here is {args.file}:\n```python\n{code}\n```\n"
                                        f"Rewrite the whole file with `{args.rename}` renamed to "
                                        f"`{args.rename}_v2`. Output the full file."}]
    return {"code_edit": (edit, args.max_tokens),
            "prose": ([{"role": "user", "content": PROSE}], args.prose_tokens)}


def run_turn(client: Any, messages: list[dict[str, str]], max_tokens: int, mode: str) -> dict[str, Any]:
    conv = client.conversation("", speculative=mode, max_tokens=max_tokens)
    conv.messages = messages[:-1]
    turn = conv.send(messages[-1]["content"])
    return {"mode": mode, "prompt_tokens": turn.prompt_tokens, "tokens": len(turn.token_ids), "decode_tok_s": turn.decode_tokens_per_s,
            "drafted": turn.drafted_tokens, "accepted": turn.accepted_tokens, "ids": turn.token_ids}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        drafted = sum(r["drafted"] for r in mine)
        out[mode] = {"decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in mine),
                     "decode_tok_s": [r["decode_tok_s"] for r in mine],
                     "tokens": [r["tokens"] for r in mine],
                     "acceptance": sum(r["accepted"] for r in mine) / drafted if drafted else None,
                     "drafted": drafted}
    plain = [r["ids"] for r in rows if r["mode"] == "off"]
    for mode in SPECULATIVE:
        out[mode]["speedup"] = common.ratio(out[mode]["decode_tok_s_median"], out["off"]["decode_tok_s_median"])
        pairs = list(zip(plain, [r["ids"] for r in rows if r["mode"] == mode]))
        out[mode]["same_reply"] = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
    return out


def report_md(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [f"# Speculative decoding ({'quick' if report['quick'] else 'full'})", "",
             f"Default model (SmolLM2-135M-Instruct), greedy, one daemon, {meta.get('cpus')} CPUs "
             f"({meta.get('platform', '')}); code {meta['code']}. Code edit: `{report['file']}` "
             f"({report['file_lines']} lines, {report['prompt_tokens']['code_edit']} prompt tokens), "
             f"first {report['max_tokens']['code_edit']} tokens of the rewrite; prose: "
             f"{report['max_tokens']['prose']} tokens. {report['repeats']} repeats per mode, alternating.", ""]
    rows = []
    for name, s in report["workloads"].items():
        row = [name, common.fmt(s["off"]["decode_tok_s_median"], 1)]
        for mode in SPECULATIVE:
            acc = s[mode]["acceptance"]
            row += [common.fmt(s[mode]["decode_tok_s_median"], 1), f"**{common.fmt(s[mode]['speedup'])}x**",
                    f"{acc:.0%} of {s[mode]['drafted']}" if acc is not None else "-", s[mode]["same_reply"]]
        rows.append(row)
    lines.append(common.markdown_table(
        ("workload", "off tok/s", "prompt-lookup tok/s", "speed-up", "accepted", "same reply",
         "draft tok/s", "speed-up", "accepted", "same reply"), rows))
    lines += ["", f"Draft model: `{report['draft_model']}`, {report['draft_layers']} of the default model's "
              "layers (the first and the last ones; `bench/drafts.py`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "reports")
    parser.add_argument("--file", default="server/mlxkvd/conversations.py", help="the file to edit (repo path)")
    parser.add_argument("--rename", default="begin_turn", help="the function the edit renames")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prose-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="48 and 24 tokens, one repeat (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.prose_tokens, args.repeats = 48, 24, 1
    workdir = common.start(args.out, "speculative")
    from mlxkv import Client

    from bench.drafts import FIRST, LAST, layer_skip_draft

    default_dir, _ = common.model_dirs()
    draft_dir = layer_skip_draft(default_dir, workdir / "skip-draft")
    daemon = common.DaemonProcess(common.short_socket_dir() / "sp.sock", workdir / "mlxkvd", workdir / "mlxkvd.log",
                                  model=default_dir,
                                  extra_args=["--max-disk-bytes", "0", "--draft-model", str(draft_dir)])
    loads = workloads(args)
    report: dict[str, Any] = {
        "quick": args.quick, "file": args.file, "file_lines": len((REPO / args.file).read_text().splitlines()),
        "repeats": args.repeats, "meta": {**common.machine_info(), "code": common.git_state()},
        "prompt_tokens": {}, "draft_model": draft_dir.name, "draft_layers": FIRST + LAST,
        "max_tokens": {name: n for name, (_, n) in loads.items()}, "workloads": {}, "turns": {},
    }
    try:
        daemon.start()
        with Client(daemon.socket_path, timeout=1800) as client:
            for name, (messages, max_tokens) in loads.items():
                rows = []
                for i in range(args.repeats):
                    for mode in MODES if i % 2 == 0 else reversed(MODES):
                        t0 = time.perf_counter()
                        rows.append(run_turn(client, messages, max_tokens, mode))
                        r = rows[-1]
                        print(f"{name} {mode}: {r['tokens']} tokens, {r['decode_tok_s']:.1f} tok/s decode, "
                              f"{r['accepted']}/{r['drafted']} drafts accepted ({time.perf_counter() - t0:.1f} s)",
                              flush=True)
                report["workloads"][name] = summarize(rows)
                report["prompt_tokens"][name] = rows[0]["prompt_tokens"]
                report["turns"][name] = [{k: v for k, v in r.items() if k != "ids"} for r in rows]
    finally:
        daemon.stop()
    common.write_json(args.out / "speculative.json", report)
    (args.out / "speculative.md").write_text(report_md(report))
    print(report_md(report))


if __name__ == "__main__":
    main()

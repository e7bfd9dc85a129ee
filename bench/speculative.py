"""Speculative decoding: deepseek-serve plain / prompt lookup (ngram) / draft model, and llama.cpp's
`llama-server` without and with a draft model (`-md`), on the same GGUF files and threads.

    .venv/bin/python bench/speculative.py [--quick] [--rounds 3] [--streams 1,8]
        [--workloads code_edit,summarise,chat] [--modes plain,ngram,draft,llama,llama-md]
        [--model PACK|FILE] [--draft-model PACK|FILE] [--threads 2] [--max-tokens 0] [--out DIR]
        [--llama-server PATH] [--ours-env DS_X=Y ...] [--llama-arg ARG ...]

Workloads (fixed prompts, temperature 0, seed 0): "code_edit" (rewrite a given 60-line function with
one change: most of the answer copies the input), "summarise" (a 500-word text), "chat" (open
questions: little to copy). One stream = one request at a time; N streams = N different requests of
the workload at once (each stream has its own change / question). Every server is started alone, warmed
up with one request, measured on every workload and stream count, and stopped; the server order is
reversed every round, and the table shows the median over rounds. Requests are streamed: the decode
rate (the ratios) is tokens after the first over the time after the first, summed over the streams;
end to end is all tokens over the wall time, prompt processing included. `same` says whether a mode's
greedy answers equal plain's (llama.cpp's last bits can flip a near-tie between batch shapes).

The target model defaults to the qwen2.5-coder-1.5b-instruct pack and the draft to the 0.5B pack
(both pulled into the model cache when missing). llama-server: `bench/build_llama_server.sh`.
Prints a Markdown table with ratios; writes summary.json under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common import free_port, wait_ready

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MODES = ("plain", "ngram", "draft", "llama", "llama-md")
OURS = {"plain": "off", "ngram": "ngram", "draft": "draft"}

FUNCTION = '''def merge_intervals(intervals, tolerance=0, keep_empty=False):
    """Merge overlapping or touching intervals.

    Each interval is a (start, end) pair with start <= end. Two intervals are
    merged when the gap between them is at most `tolerance`. Empty intervals
    (start == end) are dropped unless `keep_empty` is set.
    """
    if not intervals:
        return []
    cleaned = []
    for item in intervals:
        if len(item) != 2:
            raise ValueError(f"interval {item!r} does not have two ends")
        start, end = item
        if start > end:
            raise ValueError(f"interval {item!r} starts after it ends")
        if start == end and not keep_empty:
            continue
        cleaned.append((start, end))
    if not cleaned:
        return []
    cleaned.sort(key=lambda pair: (pair[0], pair[1]))
    merged = [list(cleaned[0])]
    for start, end in cleaned[1:]:
        last = merged[-1]
        if start - last[1] <= tolerance:
            if end > last[1]:
                last[1] = end
        else:
            merged.append([start, end])
    result = []
    for start, end in merged:
        result.append((start, end))
    total = 0
    for start, end in result:
        total += end - start
    longest = max(result, key=lambda pair: pair[1] - pair[0])
    stats = {
        "count": len(result),
        "covered": total,
        "longest": longest,
        "input_count": len(intervals),
        "dropped": len(intervals) - len(cleaned),
    }
    if stats["count"] > 1:
        gaps = []
        for left, right in zip(result, result[1:]):
            gaps.append(right[0] - left[1])
        stats["smallest_gap"] = min(gaps)
        stats["largest_gap"] = max(gaps)
    else:
        stats["smallest_gap"] = None
        stats["largest_gap"] = None
    if result:
        first_start = result[0][0]
        last_end = result[-1][1]
        stats["span"] = last_end - first_start
        stats["density"] = total / stats["span"] if stats["span"] else 1.0
    else:
        stats["span"] = 0
        stats["density"] = 0.0
    return result, stats
'''

CHANGES = (
    "Rename the parameter `tolerance` to `max_gap` everywhere.",
    "Make the function raise TypeError when `intervals` is not a list or tuple.",
    "Rename the local variable `cleaned` to `valid` everywhere.",
    "Add a type hint to every parameter and to the return value.",
    "Rename the local variable `merged` to `combined` everywhere.",
    "Make `keep_empty` a keyword-only parameter.",
    "Rename the local variable `stats` to `summary` everywhere.",
    "Change the error message for a reversed interval to say 'has its ends reversed'.",
)

TEXT = """The lighthouse at Point Carrow was built in 1871 after three ships were lost on the reef in a
single winter. The first keeper, a former ship's carpenter named Elias Venn, lived in the tower with
his wife and two children, and kept a logbook that still survives in the county archive. His entries
are short and practical: the weather at dawn and dusk, the oil used, the ships seen, the repairs made.
Only rarely does he write about anything else, and those few lines are the ones visitors remember. In
the spring of 1874 he noted that his daughter had counted forty-one seals on the lower rocks, and in
the autumn of 1880 he wrote that the lamp had burned through a storm that lasted four days while the
family slept in turns beside it.

The light itself changed several times. The original lamp burned colza oil and was magnified by a
fixed lens that threw a steady beam about fourteen miles. In 1902 the lens was replaced by a rotating
one that gave a white flash every ten seconds, so that sailors could tell Point Carrow from the
harbour light further north. Paraffin replaced oil in the same year, and electricity arrived only in
1953, carried along the cliff on wooden poles that the winter gales knocked down more than once. Each
change reduced the work of the keepers a little, and each was resisted by at least one of them, who
worried that a light they did not tend by hand would fail when it was needed most.

Keeping the light was never only about the lamp. The keepers painted the tower every two years,
cleared the path of fallen rock, recorded rainfall for the weather office and rowed out to ships in
trouble when the lifeboat could not launch. Their families grew vegetables in walled gardens to keep
the salt wind off, kept goats and hens, and walked six miles to the nearest school. Letters from the
period describe the isolation as the hardest part: in bad winters no boat or cart could reach the
point for weeks, and news of the wider world arrived late and all at once.

Automation came in 1989. The last keeper, Margaret Hale, handed over the keys to an engineer from the
lighthouse authority and moved to the village, where she lived for another twenty years and gave talks
to schoolchildren about life on the point. The tower now runs unattended, monitored from a control room
two hundred miles away, and its light is a small electric lamp inside the old lens. The keepers'
cottages were sold in 1995 and became a small museum and a café, run by volunteers during the summer.

The museum keeps Venn's logbook open at the page about the four-day storm, next to a photograph of
Hale polishing the lens on her last day. Visitors often ask whether the light is still needed now that
ships carry satellite navigation. The authority's answer is that electronics fail and that a light on
a headland is the one signal every sailor can read without any equipment at all. So the flash still
sweeps the reef every ten seconds, as it has for more than a century, whether or not anyone is
watching from the tower."""

SUMMARY_ASKS = (
    "Summarise this text in one paragraph.",
    "Summarise this text in five bullet points.",
    "Summarise the history of the light itself described in this text.",
    "Summarise what this text says about the keepers' families.",
    "Write a short summary of this text for a museum leaflet.",
    "Summarise this text in three sentences.",
    "Summarise this text for a child of ten.",
    "List the dates in this text with what happened at each, then summarise it in two sentences.",
)

QUESTIONS = (
    "Write a short story about a robot who learns to paint.",
    "What are the trade-offs between SQL and NoSQL databases? Explain with examples.",
    "Give me a week-long plan to start running, for a complete beginner.",
    "Explain how a hash table works and why lookups are fast on average.",
    "Write a letter to a friend describing a trip to the mountains.",
    "What should I consider when choosing a first programming language to learn?",
    "Describe how photosynthesis works to a high-school student.",
    "Write a short dialogue between a detective and a suspect in a museum theft.",
)


def workload_messages(workload: str, i: int) -> list[dict[str, str]]:
    if workload == "code_edit":
        change = CHANGES[i % len(CHANGES)]
        text = f"{change} Reply with the whole rewritten function only, in one code block.\n\n```python\n{FUNCTION}```"
    elif workload == "summarise":
        text = f"{SUMMARY_ASKS[i % len(SUMMARY_ASKS)]}\n\n{TEXT}"
    elif workload == "chat":
        text = QUESTIONS[i % len(QUESTIONS)]
    else:
        text = "Say hello."
    return [{"role": "user", "content": text}]


def resolve(value: str) -> Path:
    """A pack name or a GGUF path -> the local GGUF file (a pack is pulled when missing)."""
    from deepseek_serve.config import load_settings
    from deepseek_serve.models.resolve import resolve_model

    settings = load_settings(_env_file=None)
    return resolve_model(value, cache_dir=settings.models_dir).path


def physical_cores() -> int:
    from deepseek_serve.engine.runners.llamacpp.backend import physical_cores as cores

    return cores()


class Server:
    """One server process (ours in a speculative mode, or llama-server with or without a draft)."""

    def __init__(self, mode: str, args: argparse.Namespace, out: Path) -> None:
        self.mode = mode
        self.port = free_port()
        self.log = out / f"{mode}.log"
        if mode.startswith("llama"):
            cmd = [
                args.llama_server, "-m", str(args.model_path), "-t", str(args.threads), "-tb", str(args.threads),
                "-np", str(args.parallel), "-c", str(args.context), "--host", "127.0.0.1", "--port", str(self.port),
                "--no-webui", *args.llama_arg,
            ]  # fmt: skip
            if mode == "llama-md":
                cmd += ["-md", str(args.draft_path), "-td", str(args.threads), "-tbd", str(args.threads)]
            env = dict(os.environ)
            self.ready_url = f"http://127.0.0.1:{self.port}/health"
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
            settings = {
                "DS_MODEL": str(args.model_path), "DS_N_THREADS": str(args.threads),
                "DS_MAX_BATCH_SIZE": str(args.parallel), "DS_CONTEXT_LENGTH": str(args.context),
                "DS_RESPONSE_CACHE": "false", "DS_AUTH": "off", "DS_LOG_LEVEL": "warning",
                "DS_DATA_DIR": str(out / f"{mode}.data"), "DS_SPECULATIVE": OURS[mode],
            }  # fmt: skip
            if mode == "draft":
                settings["DS_DRAFT_MODEL"] = str(args.draft_path)
            settings.update(kv.split("=", 1) for kv in args.ours_env)
            env.update(settings)
            cmd = [str(VENV_BIN / "deepseek-serve"), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
            cmd = [" ".join(f"{k}={v}" for k, v in settings.items()), *cmd]
            self.ready_url = f"http://127.0.0.1:{self.port}/health/ready"
        self.command = " ".join(cmd)
        argv = cmd if mode.startswith("llama") else cmd[1:]
        self.proc = subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env)
        wait_ready(self.ready_url, self.proc, self.log, timeout_s=900, poll_s=0.5)
        self.model = "model"
        if not mode.startswith("llama"):
            self.model = httpx.get(f"http://127.0.0.1:{self.port}/v1/models").json()["data"][0]["id"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def one_request(
    client: httpx.AsyncClient, server: Server, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    """One streamed chat completion: its tokens, text, seconds to the first token and in all."""
    body = {
        "model": server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    started = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    chunks_with_text = 0
    usage: dict[str, Any] = {}
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            for choice in doc.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.monotonic()
                    parts.append(text)
                    chunks_with_text += 1
            if doc.get("usage"):
                usage = doc["usage"]
    ended = time.monotonic()
    spec = usage.get("speculative_tokens") or {}
    tokens = int(usage.get("completion_tokens", chunks_with_text))
    return {
        "seconds": ended - started,
        "first_token_s": (first or ended) - started,
        "decode_s": ended - (first or ended),
        "tokens": tokens,
        "text": "".join(parts),
        "drafted": int(spec.get("drafted", 0)),
        "accepted": int(spec.get("accepted", 0)),
    }


async def measure(server: Server, workload: str, streams: int, max_tokens: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=3600) as client:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(one_request(client, server, workload_messages(workload, i), max_tokens) for i in range(streams))
        )
        wall = time.monotonic() - started
    tokens = sum(a["tokens"] for a in answers)
    # decode rate: tokens after the first over the time after the first, summed over the streams
    decode = sum((a["tokens"] - 1) / a["decode_s"] for a in answers if a["decode_s"] > 0 and a["tokens"] > 1)
    return {
        "tok_s": tokens / wall,
        "decode_tok_s": decode,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_s": statistics.mean(a["first_token_s"] for a in answers),
        "drafted": sum(a["drafted"] for a in answers),
        "accepted": sum(a["accepted"] for a in answers),
        "texts": [a["text"] for a in answers],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="target: pack name or GGUF file")
    ap.add_argument("--draft-model", default="qwen2.5-coder-0.5b-instruct", help="draft: pack name or GGUF file")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--workloads", default="code_edit,summarise,chat")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=0, help="0 = 700 for code_edit, 400 otherwise")
    ap.add_argument("--threads", type=int, default=0, help="0 = physical cores")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--parallel", type=int, default=8, help="DS_MAX_BATCH_SIZE = llama-server -np")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 48 tokens (unless given)")
    ap.add_argument("--llama-server", default="", help="llama-server binary (default: bench/build_llama_server.sh)")
    ap.add_argument("--ours-env", action="append", default=[], help="extra DS_X=Y setting for deepseek-serve")
    ap.add_argument("--llama-arg", action="append", default=[], help="extra llama-server argument")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the running server on the way out
    if args.quick:
        args.rounds, args.max_tokens = 1, args.max_tokens or 48
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    workloads = [w for w in args.workloads.split(",") if w]
    levels = [int(s) for s in args.streams.split(",")]
    args.threads = args.threads or physical_cores()
    args.model_path = resolve(args.model)
    args.draft_path = resolve(args.draft_model) if {"draft", "llama-md"} & set(modes) else None
    if any(m.startswith("llama") for m in modes) and not args.llama_server:
        build = REPO / "bench" / "build_llama_server.sh"
        args.llama_server = subprocess.run([str(build)], check=True, capture_output=True, text=True).stdout.strip()
    out = args.out or Path(tempfile.mkdtemp(prefix="speculative-"))
    out.mkdir(parents=True, exist_ok=True)

    def budget(workload: str) -> int:
        return args.max_tokens or (700 if workload == "code_edit" else 400)

    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    commands: dict[str, str] = {}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            server = Server(mode, args, out)
            commands[mode] = server.command
            try:
                asyncio.run(measure(server, "warmup", 1, 16))  # unmeasured; a prompt no workload shares
                for workload in workloads:
                    for streams in levels:
                        res = asyncio.run(measure(server, workload, streams, budget(workload)))
                        runs.setdefault((mode, workload, streams), []).append(res)
                        rate = f", accepted {res['accepted']}/{res['drafted']}" if res["drafted"] else ""
                        print(
                            f"round {r + 1} {mode} {workload} x{streams}: decode {res['decode_tok_s']:.2f} tok/s, "
                            f"end to end {res['tok_s']:.2f} tok/s ({res['tokens']} tokens in {res['wall_s']:.1f} s, "
                            f"first token {res['ttft_s']:.1f} s{rate})",
                            flush=True,
                        )
            finally:
                server.stop()

    def med(mode: str, workload: str, streams: int, key: str = "decode_tok_s") -> float:
        return statistics.median(x[key] for x in runs[(mode, workload, streams)])

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"{args.threads} threads; commit {commit.stdout.strip()}; target {args.model_path.name}, draft "
        f"{args.draft_path.name if args.draft_path else '-'}; {args.parallel} slots, context {args.context}; "
        f"temperature 0, seed 0; median of {args.rounds} round(s)\n"
    )
    has = set(modes).__contains__
    print("decode tok/s: tokens after the first / time after the first, summed over the streams (ratios on it);")
    print("end to end: all tokens / wall time of the batch of requests, prompt processing included\n")
    print(
        "| workload | streams | mode | decode tok/s | vs plain | vs llama | vs llama-md | end to end tok/s "
        "| first token | accepted/drafted | same as plain |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    table = []
    for workload in workloads:
        for streams in levels:
            for mode in modes:
                tok = med(mode, workload, streams)
                xs = runs[(mode, workload, streams)]

                def ratio(base: str, tok: float = tok, workload: str = workload, streams: int = streams) -> str:
                    return f"{tok / med(base, workload, streams):.2f}x" if has(base) else "-"

                drafted = sum(x["drafted"] for x in xs)
                accepted = sum(x["accepted"] for x in xs)
                rate = f"{accepted}/{drafted} ({accepted / drafted:.0%})" if drafted else "-"
                same = "-"
                if has("plain") and mode != "plain":
                    same = "yes" if xs[0]["texts"] == runs[("plain", workload, streams)][0]["texts"] else "no"
                e2e = med(mode, workload, streams, "tok_s")
                ttft = med(mode, workload, streams, "ttft_s")
                print(
                    f"| {workload} | {streams} | {mode} | {tok:.2f} | {ratio('plain')} | {ratio('llama')} | "
                    f"{ratio('llama-md')} | {e2e:.2f} | {ttft:.2f} s | {rate} | {same} |"
                )
                table.append(
                    {
                        "workload": workload, "streams": streams, "mode": mode, "decode_tok_s": tok,
                        "end_to_end_tok_s": e2e, "first_token_s": ttft, "same_as_plain": same,
                    }
                )  # fmt: skip
    summary = {
        "table": table,
        "runs": {f"{m}-{w}-x{s}": xs for (m, w, s), xs in runs.items()},
        "commands": commands,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "commit": commit.stdout.strip(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()

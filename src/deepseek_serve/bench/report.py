"""Results on disk: a JSON document per run, a Markdown report and PNG plots made from it.

JSON layout (`schema` 1):
    {"schema": 1, "meta": {...run settings, machine, commit, command...},
     "phases": [{"label", "mode", "value", "elapsed_s", "server_peak_rss_bytes",
                 "loadavg_before", "loadavg_after", "metrics": {...}, "requests": [...]}]}
Latency summaries in `metrics` are in seconds; the Markdown report shows milliseconds.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from deepseek_serve.bench.runner import PhaseResult

SCHEMA_VERSION = 1
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E"}


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, memory and OS of this machine (best effort, Linux first)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_bytes = None
    try:
        mem_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_bytes": mem_bytes,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def git_commit() -> str | None:
    """Short commit of the working tree the command runs in, with `-dirty` if it has changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def run_document(meta: dict[str, Any], phases: list[PhaseResult]) -> dict[str, Any]:
    """The JSON-ready document of a run; `meta` gains date, machine, commit and command."""
    full_meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine_info(),
        "commit": git_commit(),
        "command": shlex.join(["deepseek-serve", *sys.argv[1:]]) if sys.argv else None,
        **meta,
    }
    return {
        "schema": SCHEMA_VERSION,
        "meta": full_meta,
        "phases": [
            {
                "label": p.phase.label,
                "mode": p.phase.mode,
                "value": p.phase.value,
                "elapsed_s": p.elapsed_s,
                "server_peak_rss_bytes": p.server_peak_rss_bytes,
                "loadavg_before": p.loadavg_before,
                "loadavg_after": p.loadavg_after,
                "metrics": p.metrics,
                "requests": [r.to_dict() for r in p.requests],
            }
            for p in phases
        ],
    }


def write_json(document: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


def load_json(path: Path) -> dict[str, Any]:
    """Read a results file; ValueError if it is not one."""
    try:
        document = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA_VERSION or "phases" not in document:
        raise ValueError(f"{path}: not a deepseek-serve bench results file (schema {SCHEMA_VERSION})")
    return document


def _ms(summary: dict[str, Any] | None, key: str) -> str:
    return "-" if not summary else f"{summary[key] * 1000:.1f}"


def _mib(value: int | None) -> str:
    return "-" if not value else f"{value / 2**20:.0f}"


def phase_rows(document: dict[str, Any]) -> list[list[str]]:
    """One row per phase: the headline numbers (latencies in ms)."""
    rows = []
    for p in document["phases"]:
        m = p["metrics"]
        errors = ", ".join(f"{k}: {v}" for k, v in m["errors_by_status"].items()) or "-"
        rows.append(
            [
                p["label"],
                str(m["num_requests"]),
                f"{m['error_rate'] * 100:.1f}%",
                errors,
                f"{m['request_throughput']:.2f}",
                f"{m['output_token_throughput']:.1f}",
                _ms(m["ttft"], "mean"),
                _ms(m["ttft"], "p50"),
                _ms(m["ttft"], "p99"),
                _ms(m["tpot"], "mean"),
                _ms(m["tpot"], "p99"),
                _ms(m["itl"], "p50"),
                _ms(m["itl"], "p99"),
                _ms(m["e2e"], "p50"),
                _ms(m["e2e"], "p99"),
                _mib(p.get("server_peak_rss_bytes")),
            ]
        )
    return rows


PHASE_HEADERS = [
    "phase",
    "requests",
    "errors",
    "errors by status",
    "req/s",
    "out tok/s",
    "TTFT mean",
    "TTFT p50",
    "TTFT p99",
    "TPOT mean",
    "TPOT p99",
    "ITL p50",
    "ITL p99",
    "E2E p50",
    "E2E p99",
    "server RSS MiB",
]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_plots(document: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput.png (throughput against concurrency or rate) and latency.png (percentiles per phase)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    phases = document["phases"]
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, xlabel in (("closed", "concurrency"), ("open", "offered rate (req/s)")):
        sel = [p for p in phases if p["mode"] == mode]
        if not sel:
            continue
        xs = [p["value"] for p in sel]
        ax.plot(xs, [p["metrics"]["output_token_throughput"] for p in sel], "o-", label=f"output tokens/s ({xlabel})")
        ax.set_xlabel(xlabel)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Throughput: {document['meta'].get('label') or document['meta'].get('workload', '')}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, len(LATENCY_METRICS), figsize=(4 * len(LATENCY_METRICS), 4))
    width = 0.8 / max(len(phases), 1)
    for ax, metric in zip(axes, LATENCY_METRICS, strict=True):
        for j, p in enumerate(phases):
            summary = p["metrics"][metric]
            values = [summary[k] * 1000 if summary else 0.0 for k in ("p50", "p90", "p99")]
            ax.bar([i + j * width for i in range(3)], values, width, label=p["label"])
        ax.set_xticks([i + width * (len(phases) - 1) / 2 for i in range(3)], ["p50", "p90", "p99"])
        ax.set_title(f"{LATENCY_NAMES[metric]} (ms)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


def write_markdown(document: dict[str, Any], out_dir: Path, plots: list[Path] | None = None) -> Path:
    """report.md: run settings, machine, commit, command, the phase table and links to the plots."""
    meta = document["meta"]
    machine = meta.get("machine") or {}
    mem = machine.get("memory_bytes")
    lines = [
        f"# Benchmark: {meta.get('label') or meta.get('workload')}",
        "",
        f"- date: {meta.get('date')}",
        f"- machine: {machine.get('cpu')}, {machine.get('logical_cores')} logical cores, {mem / 2**30:.1f} GiB RAM"
        if mem
        else f"- machine: {machine.get('cpu')}",
        f"- commit: {meta.get('commit')}",
        f"- command: `{meta.get('command')}`",
        f"- server: {meta.get('base_url')}, model `{meta.get('model')}`",
        f"- workload: {meta.get('workload')} ({meta.get('endpoint')}), max_tokens {meta.get('max_tokens')}, "
        f"temperature {meta.get('temperature')}, ignore_eos {meta.get('ignore_eos')}, "
        f"seed {meta.get('seed')}",
        "",
        "Latencies in milliseconds. TTFT: time to first token; TPOT: time per output token after the first;",
        "ITL: gap between streamed chunks; E2E: whole request.",
        "",
        markdown_table(PHASE_HEADERS, phase_rows(document)),
        "",
    ]
    loads = [(p["label"], p.get("loadavg_before"), p.get("loadavg_after")) for p in document["phases"]]
    lines.append(
        "Load average (1 min) before/after each phase: "
        + ", ".join(f"{label}: {b[0]:.2f}/{a[0]:.2f}" for label, b, a in loads if b and a)
    )
    lines.append("")
    for path in plots or []:
        lines.append(f"![{path.stem}]({path.name})")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_report(document: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """results.json, report.md, throughput.png and latency.png in `out_dir`."""
    json_path = write_json(document, out_dir / "results.json")
    plots = write_plots(document, out_dir)
    md_path = write_markdown(document, out_dir, plots)
    return {"json": json_path, "markdown": md_path, **{p.stem: p for p in plots}}

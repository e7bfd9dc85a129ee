"""Results files, Markdown report, PNG plots and `bench --compare` of the load generator.

The phase results here are built by hand (no server): these tests check what the report and the
comparison compute from given numbers; test_bench_e2e.py measures a real server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepseek_serve.bench.client import RequestResult
from deepseek_serve.bench.compare import compare, compare_markdown
from deepseek_serve.bench.report import load_json, run_document, write_report
from deepseek_serve.bench.runner import Phase, PhaseResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def phase(concurrency: int, ttft: float, e2e: float, tokens: int, elapsed: float, failed: int = 0) -> PhaseResult:
    requests = [
        RequestResult(
            index=i,
            sent_at=0.0,
            ok=True,
            ttft=ttft * (1 + i / 10),
            e2e=e2e,
            prompt_tokens=30,
            output_tokens=tokens,
            usage_reported=True,
            itl=[(e2e - ttft) / (tokens - 1)] * (tokens - 1),
        )
        for i in range(concurrency * 2)
    ]
    requests += [RequestResult(index=100 + i, sent_at=0.0, status="503", error="down") for i in range(failed)]
    return PhaseResult(
        Phase("closed", concurrency, num_requests=len(requests)),
        elapsed,
        requests,
        server_peak_rss_bytes=300 * 2**20,
        loadavg_before=(1.0, 1.0, 1.0),
        loadavg_after=(2.0, 1.0, 1.0),
    )


def document(label: str, speed: float) -> dict:
    meta = {
        "label": label,
        "workload": "short",
        "base_url": "http://x/v1",
        "model": "m",
        "max_tokens": 16,
        "endpoint": "chat",
        "temperature": 0.0,
        "ignore_eos": True,
        "seed": 0,
    }
    return run_document(
        meta,
        [
            phase(1, 0.2 / speed, 2.0 / speed, 16, 4.0 / speed),
            phase(4, 0.4 / speed, 3.0 / speed, 16, 6.0 / speed, failed=1),
        ],
    )


def test_report_files_exist_and_are_valid(tmp_path: Path) -> None:
    doc = document("baseline", 1.0)
    paths = write_report(doc, tmp_path / "run")
    loaded = load_json(paths["json"])
    assert [p["label"] for p in loaded["phases"]] == ["c=1", "c=4"]
    assert loaded["meta"]["machine"]["logical_cores"] >= 1 and loaded["meta"]["date"].endswith("UTC")
    assert len(loaded["phases"][1]["requests"]) == 9
    assert loaded["phases"][1]["metrics"]["errors_by_status"] == {"503": 1}
    # output tokens/s of phase c=1: 2 requests x 16 tokens over 4 s
    assert loaded["phases"][0]["metrics"]["output_token_throughput"] == pytest.approx(8.0)

    md = paths["markdown"].read_text()
    assert "| c=1 | 2 | 0.0% | - |" in md
    assert "| c=4 | 9 | 11.1% | 503: 1 |" in md
    assert "![throughput](throughput.png)" in md and "![latency](latency.png)" in md
    assert "300" in md  # server RSS MiB

    import matplotlib.image as mpimg

    for name in ("throughput", "latency"):
        data = paths[name].read_bytes()
        assert data.startswith(PNG_MAGIC)
        image = mpimg.imread(paths[name])
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # not a blank canvas


def test_load_json_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a deepseek-serve bench results file"):
        load_json(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        load_json(bad)


def test_compare_ratios_and_better_side() -> None:
    rows = compare(document("baseline", 1.0), document("fast", 5.0))
    by_key = {(r.phase, r.metric): r for r in rows}
    tput = by_key[("c=1", "output tokens/s")]
    assert tput.a == pytest.approx(8.0) and tput.b == pytest.approx(40.0)
    assert tput.ratio == pytest.approx(5.0) and tput.better == "B"
    ttft = by_key[("c=4", "TTFT p99 (ms)")]
    assert ttft.ratio == pytest.approx(0.2) and ttft.better == "B"
    same = by_key[("c=4", "error rate")]
    assert same.ratio == pytest.approx(1.0) and same.better == "="
    tiny = compare_markdown(compare(document("baseline", 1.0), document("much faster", 200.0)))
    assert "| c=4 | TTFT p99 (ms) | 677.2 | 3.386 | 0.005x | B |" in tiny
    reverse = {(r.phase, r.metric): r for r in compare(document("fast", 5.0), document("baseline", 1.0))}
    assert reverse[("c=1", "output tokens/s")].better == "A"
    md = compare_markdown(rows, "baseline", "fast")
    assert "| c=1 | output tokens/s | 8.000 | 40.0 | 5.00x | fast |" in md


def test_cli_compare(tmp_path: Path) -> None:
    from deepseek_serve.cli import app

    a = write_report(document("baseline", 1.0), tmp_path / "a")["json"]
    b = write_report(document("fast", 2.0), tmp_path / "b")["json"]
    runner = CliRunner()
    out = runner.invoke(app, ["bench", "--compare", str(a), str(b), "--markdown"])
    assert out.exit_code == 0, out.output
    assert "| c=1 | output tokens/s | 8.000 | 16.0 | 2.00x | fast |" in out.output
    out = runner.invoke(app, ["bench", "--compare", str(a), str(tmp_path / "missing.json")])
    assert out.exit_code != 0
    assert "missing.json" in out.output

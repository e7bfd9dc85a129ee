"""Compare two results files phase by phase: value in A, value in B, ratio B/A, which is better."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deepseek_serve.bench.report import markdown_table

# (key, label, higher_is_better); latency keys are "<metric>.<stat>" in seconds
COMPARED: tuple[tuple[str, str, bool], ...] = (
    ("request_throughput", "requests/s", True),
    ("output_token_throughput", "output tokens/s", True),
    ("error_rate", "error rate", False),
    ("ttft.mean", "TTFT mean (ms)", False),
    ("ttft.p50", "TTFT p50 (ms)", False),
    ("ttft.p99", "TTFT p99 (ms)", False),
    ("tpot.mean", "TPOT mean (ms)", False),
    ("tpot.p99", "TPOT p99 (ms)", False),
    ("itl.p50", "ITL p50 (ms)", False),
    ("itl.p99", "ITL p99 (ms)", False),
    ("e2e.p50", "E2E p50 (ms)", False),
    ("e2e.p99", "E2E p99 (ms)", False),
)


@dataclass(frozen=True)
class CompareRow:
    phase: str
    metric: str
    a: float | None
    b: float | None
    higher_is_better: bool

    @property
    def ratio(self) -> float | None:
        """b / a; None when either is missing or a is 0."""
        if self.a is None or self.b is None or self.a == 0:
            return None
        return self.b / self.a

    @property
    def better(self) -> str:
        """ "A", "B" or "=" (equal, or not comparable)."""
        if self.a is None or self.b is None or self.a == self.b:
            return "="
        return "B" if (self.b > self.a) == self.higher_is_better else "A"


def _value(metrics: dict[str, Any], key: str) -> float | None:
    if "." not in key:
        value = metrics.get(key)
    else:
        name, stat = key.split(".")
        summary = metrics.get(name)
        value = summary.get(stat) * 1000 if summary and summary.get(stat) is not None else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[CompareRow]:
    """Rows for every phase label present in both documents, in A's order."""
    b_phases = {p["label"]: p for p in b["phases"]}
    rows: list[CompareRow] = []
    for pa in a["phases"]:
        pb = b_phases.get(pa["label"])
        if pb is None:
            continue
        for key, label, higher in COMPARED:
            rows.append(CompareRow(pa["label"], label, _value(pa["metrics"], key), _value(pb["metrics"], key), higher))
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def format_rows(rows: list[CompareRow]) -> list[list[str]]:
    return [[r.phase, r.metric, _fmt(r.a), _fmt(r.b), _ratio(r.ratio), r.better] for r in rows]


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"  # 0.0052x, not 0.01x


COMPARE_HEADERS = ["phase", "metric", "A", "B", "B/A", "better"]


def compare_markdown(rows: list[CompareRow], name_a: str = "A", name_b: str = "B") -> str:
    headers = ["phase", "metric", name_a, name_b, f"{name_b}/{name_a}", "better"]
    body = format_rows(rows)
    for row in body:
        row[5] = {"A": name_a, "B": name_b}.get(row[5], row[5])
    return markdown_table(headers, body)

"""Prometheus text exposition (format 0.0.4), written by hand: a few gauges and
histograms computed from the database on each scrape."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

LATENCY_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
PERCENTILE_BUCKETS = (10, 25, 50, 75, 90, 95, 99, 100)
SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _histogram(name: str, values: Sequence[float], buckets: Iterable[float], **labels: str) -> list[str]:
    lines = []
    for bound in buckets:
        lines.append(f"{name}_bucket{_labels(**labels, le=f'{bound:g}')} {sum(1 for v in values if v <= bound)}")
    lines.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {len(values)}")
    lines.append(f"{name}_sum{_labels(**labels)} {sum(values):.6g}")
    lines.append(f"{name}_count{_labels(**labels)} {len(values)}")
    return lines


def exposition(snapshot: dict[str, Any], uptime_s: float) -> str:
    out = [
        "# HELP headscreen_up The console process answers.", "# TYPE headscreen_up gauge", "headscreen_up 1",
        "# HELP headscreen_uptime_seconds Seconds since the web console started.",
        "# TYPE headscreen_uptime_seconds gauge", f"headscreen_uptime_seconds {uptime_s:.1f}",
        "# HELP headscreen_instances_received Instances stored and recorded (not purged).",
        "# TYPE headscreen_instances_received gauge", f"headscreen_instances_received {snapshot['instances']}",
        "# HELP headscreen_ingest_rejections Instances or associations refused.",
        "# TYPE headscreen_ingest_rejections gauge", f"headscreen_ingest_rejections {snapshot['rejections']}",
        "# HELP headscreen_results Results written (studies completed by a model).",
        "# TYPE headscreen_results gauge", f"headscreen_results {snapshot['results']}",
        "# HELP headscreen_studies Studies by state.", "# TYPE headscreen_studies gauge",
    ]
    out += [f"headscreen_studies{_labels(state=s)} {n}" for s, n in sorted(snapshot["studies"].items())]
    out += ["# HELP headscreen_jobs Jobs by state.", "# TYPE headscreen_jobs gauge"]
    out += [f"headscreen_jobs{_labels(state=s)} {n}" for s, n in sorted(snapshot["jobs"].items())]
    out += ["# HELP headscreen_deliveries Result deliveries by outcome.", "# TYPE headscreen_deliveries gauge"]
    out += [f"headscreen_deliveries{_labels(state=s)} {n}" for s, n in sorted(snapshot["deliveries"].items())]
    out += ["# HELP headscreen_stage_seconds Pipeline stage durations of recent results.",
            "# TYPE headscreen_stage_seconds histogram"]
    for stage, values in sorted(snapshot["timings"].items()):
        out += _histogram("headscreen_stage_seconds", values, LATENCY_BUCKETS, stage=stage)
    out += ["# HELP headscreen_score_percentile Percentile of recent anomaly scores against the reference.",
            "# TYPE headscreen_score_percentile histogram"]
    out += _histogram("headscreen_score_percentile", snapshot["percentiles"], PERCENTILE_BUCKETS)
    out += ["# HELP headscreen_anomaly_score Recent anomaly scores by model bundle.",
            "# TYPE headscreen_anomaly_score histogram"]
    for bundle, values in sorted(snapshot["scores"].items()):
        out += _histogram("headscreen_anomaly_score", values, SCORE_BUCKETS, bundle=bundle)
    return "\n".join(out) + "\n"

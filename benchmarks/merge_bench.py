"""Merges `wanfast bench` JSON files of runs too long to hold in one machine loan (a 40-step 720p
generation takes ~14 min for wanfast and ~17 min for Diffusers; one machine is held 30 min at most) and
recomputes the ratios against the Diffusers rows. Prints the table, writes the merged JSON.

    python benchmarks/merge_bench.py ours.json peer.json --json merged.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wanfast.tools.bench_report import annotate_ratios, format_table


def merge(reports: list[dict], labels: list[str] | None = None) -> dict:
    """``labels``: one per report, appended to its wanfast engine names (runs of the same engine name with
    different settings, e.g. ``default[fp8]`` and ``default[fp8+sage8]``)."""
    if labels:
        for rep, label in zip(reports, labels, strict=True):
            for r in rep["measurements"]:
                r["engine"] = f"{r['engine']}[{label}]" if r["impl"] == "wanfast" else r["engine"]
            rep["config"]["compare"] = [f"{c}[{label}]" for c in rep["config"]["compare"]]
            for e in rep["engines"]:
                e["name"] = f"{e['name']}[{label}]" if e["impl"] == "wanfast" else e["name"]
    records = [dict(r, run=i) for i, rep in enumerate(reports) for r in rep["measurements"]]
    for r in records:
        r.pop("vs_diffusers", None), r.pop("memory_vs_diffusers", None), r.pop("vs_first", None)
    compare = [c for rep in reports for c in rep["config"]["compare"]]
    annotate_ratios(records, compare[0] if compare else "diffusers")
    first = reports[0]
    return {
        **first,
        "config": {**first["config"], "compare": compare},
        "engines": [e for rep in reports for e in rep["engines"]],
        "measurements": records,
        "checks": [c for rep in reports for c in rep["checks"]],
        "runs": [
            {"date": rep["date"], "environment": rep["environment"], "config": rep["config"]}
            for rep in reports
        ],  # fmt: skip
        "notes": first["notes"] + ["merged from separate runs ('run' indexes 'runs'): same device kind"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--labels", help="comma-separated, one per report, appended to its wanfast engine names")
    args = ap.parse_args()
    labels = args.labels.split(",") if args.labels else None
    merged = merge([json.loads(p.read_text()) for p in args.reports], labels)
    print(format_table(merged))
    args.json.write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()

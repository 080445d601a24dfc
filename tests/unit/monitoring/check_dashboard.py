#!/usr/bin/env python3
"""The Grafana dashboard and the alert rules in monitoring/ query only metrics the runtime
exports (the catalogue in docs/metrics.md), and the dashboard covers every area it should.

  check_dashboard.py REPO_ROOT
"""
import json
import re
import sys
from pathlib import Path

root = Path(sys.argv[1])
catalogue = set()
for line in (root / "docs/metrics.md").read_text().splitlines():
    catalogue.update(re.findall(r"`(moe_[a-z_]+)`", line) if line.startswith("|") else [])

def metric_names(expr):
    names = set()
    for name in re.findall(r"\bmoe_[a-z_]+", expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in catalogue:
                name = name[: -len(suffix)]
        names.add(name)
    return names

failures = []
dashboard = json.loads((root / "monitoring/grafana/moe-runtime.json").read_text())
rows = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
for area in ("Serving", "Experts", "Cluster", "Transport", "Training"):
    if area not in rows:
        failures.append(f"the dashboard has no {area} row")
queries = 0
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        queries += 1
        for name in metric_names(target["expr"]) - catalogue:
            failures.append(f"panel '{panel['title']}' queries {name}, which docs/metrics.md does not list")
        if target["expr"].count("(") != target["expr"].count(")"):
            failures.append(f"panel '{panel['title']}': unbalanced parentheses in {target['expr']}")
rules = 0
for line in (root / "monitoring/prometheus/alerts.yml").read_text().splitlines():
    m = re.match(r"\s*expr:\s*(.+)", line)
    if not m:
        continue
    rules += 1
    for name in metric_names(m.group(1)) - catalogue:
        failures.append(f"alert rule queries {name}, which docs/metrics.md does not list")
for f in failures:
    print("FAIL:", f)
if queries == 0 or rules == 0:
    print("FAIL: no dashboard queries or alert rules found")
    sys.exit(1)
print(f"{queries} dashboard queries and {rules} alert rules name only catalogued metrics")
sys.exit(1 if failures else 0)

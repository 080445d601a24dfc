#!/usr/bin/env python3
"""The Grafana dashboard and the alert rules in monitoring/ query only metrics the runtime
exports (the catalogue in docs/metrics.md), each as its type allows (rate/increase over counters
and histogram series only, histogram_quantile over _bucket series, no bare histogram name), and
the dashboard covers every area it should. Whether the queries return data from a real cluster
is integration.prometheus_dashboard's part.

  check_dashboard.py REPO_ROOT
"""
import json
import re
import sys
from pathlib import Path

root = Path(sys.argv[1])
catalogue = {}  # name -> type (counter, gauge, histogram)
for line in (root / "docs/metrics.md").read_text().splitlines():
    cells = [c.strip() for c in line.split("|")[1:-1]] if line.startswith("|") else []
    for name in re.findall(r"`(moe_[a-z_]+)`", cells[0] if cells else ""):
        catalogue[name] = cells[1] if len(cells) > 1 else ""
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")

def metric_names(expr):
    names = set()
    for name in re.findall(r"\bmoe_[a-z_]+", expr):
        for suffix in HISTOGRAM_SERIES:
            if name.endswith(suffix) and name[: -len(suffix)] in catalogue:
                name = name[: -len(suffix)]
        names.add(name)
    return names


def type_errors(expr):
    """What the expression asks of a metric its type cannot give (an empty or meaningless panel)."""
    errors = []
    for name in re.findall(r"\bmoe_[a-z_]+", expr):
        base = next((name[: -len(s)] for s in HISTOGRAM_SERIES if name.endswith(s)), None)
        if catalogue.get(name) == "histogram":
            errors.append(f"{name} is a histogram: query {name}_bucket, _sum or _count")
        elif base is not None and catalogue.get(base) not in (None, "histogram"):
            errors.append(f"{name}: {base} is a {catalogue[base]}, not a histogram")
    for func, name in re.findall(r"\b(rate|irate|increase)\s*\(\s*(moe_[a-z_]+)", expr):
        kind = catalogue.get(name)
        is_histogram_series = any(name.endswith(s) and catalogue.get(name[: -len(s)]) == "histogram"
                                  for s in HISTOGRAM_SERIES)
        if kind is not None and kind != "counter" and not is_histogram_series:
            errors.append(f"{func}() over {name}, a {kind}: only counters and histogram series grow")
    for inner in re.findall(r"histogram_quantile\s*\(\s*[0-9.]+\s*,(.*)", expr):
        for name in re.findall(r"\bmoe_[a-z_]+", inner):
            if not name.endswith("_bucket"):
                errors.append(f"histogram_quantile over {name}: it needs a _bucket series")
    return errors

failures = []
dashboard = json.loads((root / "monitoring/grafana/moe-runtime.json").read_text())
rows = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
for area in ("Serving", "Experts", "Cluster", "Transport", "Training", "Engine shards"):
    if area not in rows:
        failures.append(f"the dashboard has no {area} row")
queries = 0
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        queries += 1
        for name in metric_names(target["expr"]) - catalogue.keys():
            failures.append(f"panel '{panel['title']}' queries {name}, which docs/metrics.md does not list")
        for e in type_errors(target["expr"]):
            failures.append(f"panel '{panel['title']}': {e}")
        if target["expr"].count("(") != target["expr"].count(")"):
            failures.append(f"panel '{panel['title']}': unbalanced parentheses in {target['expr']}")
rules = 0
for line in (root / "monitoring/prometheus/alerts.yml").read_text().splitlines():
    m = re.match(r"\s*expr:\s*(.+)", line)
    if not m:
        continue
    rules += 1
    for name in metric_names(m.group(1)) - catalogue.keys():
        failures.append(f"alert rule queries {name}, which docs/metrics.md does not list")
    for e in type_errors(m.group(1)):
        failures.append(f"alert rule: {e}")
for f in failures:
    print("FAIL:", f)
if queries == 0 or rules == 0:
    print("FAIL: no dashboard queries or alert rules found")
    sys.exit(1)
print(f"{queries} dashboard queries and {rules} alert rules name only catalogued metrics")
sys.exit(1 if failures else 0)

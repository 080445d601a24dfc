#!/usr/bin/env python3
"""The Prometheus side of tests/integration/prometheus_dashboard.sh (standard library only).

  prometheus_dashboard.py free-ports N
      N distinct free TCP ports on 127.0.0.1, chosen by the kernel, on one line.
  prometheus_dashboard.py wait URL --targets N [--timeout S]
      Waits until the server at URL is ready and scrapes N targets, all up.
  prometheus_dashboard.py check URL DASHBOARD ALERT_RULES [--timeout S] [--skip-row ROW]...
                          [--only-row ROW]... [--expect PROMQL]...
      The alert rules loaded, healthy; then every query of the Grafana dashboard, its variables
      substituted for a 1 s scrape interval, returns data through /api/v1/query and, for graph
      panels, /api/v1/query_range: at least one series with a value that is not NaN, and, for a
      query over counters (rate, increase), one above zero: the load moved it. Each --expect
      query must return a non-empty result (e.g. an alert pending), and each query variable
      (label_values) that a checked query uses must offer values. --skip-row leaves a row's
      queries unchecked; --only-row checks only the rows named. Queries are retried until
      --timeout (data needs a few scrapes); what is still missing is printed with the response,
      the series of the metrics it names and the metric names the server has.
"""
import argparse
import json
import math
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# Grafana's built-in variables, for a dashboard that Prometheus scrapes every second: the value
# Grafana would give them for a narrow time range (its $__rate_interval is at least four scrape
# intervals; 15 s leaves room for a late scrape on a loaded host).
GRAFANA_VARIABLES = {
    "__rate_interval": "15s",
    "__interval": "2s",
    "__interval_ms": "2000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}

# Queries over counters that may stay at zero although the load moved their counters, with the
# reason. Each entry is a runtime or dashboard bug being tracked: remove it once fixed (the check
# says so when the value is above zero). None now.
ZERO_ALLOWED: dict = {}


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def get(url, path, params=None, timeout=5.0):
    """(HTTP status, parsed JSON or text)."""
    full = url.rstrip("/") + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
    try:
        with urllib.request.urlopen(full, timeout=timeout) as r:
            body, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(errors="replace"), e.code
    except (urllib.error.URLError, OSError) as e:
        return None, str(e)
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def wait(url, num_targets, timeout):
    deadline = time.monotonic() + timeout
    while True:
        status, _ = get(url, "/-/ready")
        if status == 200:
            break
        if time.monotonic() > deadline:
            print(f"FAIL: Prometheus at {url} not ready after {timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.2)
    targets = []
    while True:
        status, body = get(url, "/api/v1/targets", {"state": "active"})
        if status == 200:
            targets = body["data"]["activeTargets"]
            if len(targets) == num_targets and all(t["health"] == "up" for t in targets):
                for t in sorted(targets, key=lambda t: t["scrapeUrl"]):
                    print(f"    target {t['labels'].get('node', '?'):12} {t['scrapeUrl']}  up")
                return 0
        if time.monotonic() > deadline:
            print(f"FAIL: expected {num_targets} targets up after {timeout:.0f} s; Prometheus has:", file=sys.stderr)
            for t in targets:
                print(f"    {t['scrapeUrl']}  {t['health']}  {t.get('lastError', '')}", file=sys.stderr)
            return 1
        time.sleep(0.5)


def dashboard_queries(dashboard):
    """[(row, panel title, panel type, refId, expr)] in dashboard order (collapsed rows too)."""
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    out = []

    def substitute(expr, where):
        def value(m):
            name = m.group(1) or m.group(2)
            if name in GRAFANA_VARIABLES:
                return GRAFANA_VARIABLES[name]
            var = variables.get(name)
            if var is None:
                raise ValueError(f"{where}: unknown variable ${name} in {expr}")
            if var.get("type") in ("interval", "custom", "constant") and var.get("current", {}).get("value"):
                return str(var["current"]["value"])
            if var.get("type") in ("query", "custom"):
                return ".*"  # "All": valid inside =~ matchers, which is where multi-value variables go
            raise ValueError(f"{where}: no value to substitute for ${name} (type {var.get('type')})")
        return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)

    def walk(panels, row):
        for p in panels:
            if p.get("type") == "row":
                row = p.get("title", "")
                walk(p.get("panels", []), row)  # a collapsed row keeps its panels inside
                continue
            for t in p.get("targets", []):
                if t.get("hide"):
                    continue
                where = f"panel '{p.get('title')}' ({t.get('refId', '?')})"
                out.append((row, p.get("title", ""), p.get("type", ""), t.get("refId", "?"),
                            substitute(t["expr"], where)))
    walk(dashboard.get("panels", []), "")
    return out


def values_of(data):
    """Every sample value of an instant or range query's data, as floats."""
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        return [float(result[1])]
    if kind == "vector":
        return [float(s["value"][1]) for s in result]
    if kind == "matrix":
        return [float(v[1]) for s in result for v in s["values"]]
    return []


def uses_variable(dashboard, rows, name):
    """Whether a panel of one of `rows` names $name in a query or repeats over it."""
    pattern = re.compile(r"\$(\{" + re.escape(name) + r"[}:]|" + re.escape(name) + r"\b)")
    found = False

    def walk(panels, row):
        nonlocal found
        for p in panels:
            if p.get("type") == "row":
                row = p.get("title", "")
                walk(p.get("panels", []), row)
                continue
            if row in rows and (p.get("repeat") == name or
                                any(pattern.search(t.get("expr", "")) for t in p.get("targets", []))):
                found = True
    walk(dashboard.get("panels", []), "")
    return found


def over_counters(expr):
    return re.search(r"\b(rate|irate|increase)\s*\(", expr) is not None


def judge(expr, data):
    """None when the query has data, else why not."""
    if not data["result"]:
        return "empty result"
    vals = values_of(data)
    finite = [v for v in vals if not math.isnan(v)]
    if not finite:
        return f"only NaN ({len(data['result'])} series)"
    if over_counters(expr) and not any(v > 0 for v in finite) and expr not in ZERO_ALLOWED:
        return f"every value is 0 ({len(data['result'])} series): the counters did not move"
    return None


def short(vals):
    finite = sorted(v for v in vals if not math.isnan(v))
    if not finite:
        return "NaN"
    fmt = lambda v: f"{v:.4g}"  # noqa: E731
    return fmt(finite[0]) if finite[0] == finite[-1] else f"{fmt(finite[0])}..{fmt(finite[-1])}"


def check(url, dashboard_path, rules_path, timeout, skip_rows, only_rows, expects):
    failures = []
    deadline = time.monotonic() + timeout

    # The alert rules: as many as the file has, each healthy.
    # The alert rules: as many as the file has, each evaluated without error ("unknown" until
    # its first evaluation).
    with open(rules_path, encoding="utf-8") as f:
        want_rules = len(re.findall(r"^\s*- alert:", f.read(), re.M))
    while True:
        status, body = get(url, "/api/v1/rules")
        rules = [r for g in body["data"]["groups"] for r in g["rules"]] if status == 200 else []
        healthy = len(rules) == want_rules and all(r.get("health") == "ok" for r in rules)
        if healthy or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(rules) != want_rules:
        failures.append(f"/api/v1/rules has {len(rules)} rules, {rules_path} {want_rules}: {json.dumps(body)[:600]}")
    for r in rules:
        if r.get("health") != "ok":
            failures.append(f"rule {r['name']}: health {r.get('health')}: {r.get('lastError')}")
    print(f"    {len(rules)} alert rules loaded: " + ", ".join(
        f"{r['name']} ({r.get('health')}, {r.get('state', '-')})" for r in rules))

    with open(dashboard_path, encoding="utf-8") as f:
        dashboard = json.load(f)
    queries = dashboard_queries(dashboard)
    if only_rows:
        missing = set(only_rows) - {q[0] for q in queries}
        if missing:
            failures.append(f"--only-row: the dashboard has no row {', '.join(sorted(missing))}")
        skip_rows = sorted({q[0] for q in queries} - set(only_rows))
    skipped = [q for q in queries if q[0] in skip_rows]
    pending = [q for q in queries if q[0] not in skip_rows]
    start = time.time() - 120  # the range queries look back over the test's load
    last = {}
    done = {}
    while True:
        still = []
        for q in pending:
            row, title, kind, ref, expr = q
            status, body = get(url, "/api/v1/query", {"query": expr})
            why = (f"HTTP {status}" if status != 200 else judge(expr, body["data"])) if status else body
            if why is None and kind in ("timeseries", "heatmap", "graph"):
                status, rbody = get(url, "/api/v1/query_range",
                                    {"query": expr, "start": start, "end": time.time(), "step": "1s"})
                rwhy = (f"HTTP {status}" if status != 200 else judge(expr, rbody["data"])) if status else rbody
                if rwhy is not None:
                    why, body = "query_range: " + rwhy, rbody
            if why is None:
                done[q] = body["data"]
            else:
                last[q] = (why, body)
                still.append(q)
        pending = still
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1.0)

    for q in queries:
        row, title, kind, ref, expr = q
        if q in done:
            data = done[q]
            note = ""
            if expr in ZERO_ALLOWED:
                moved = any(v > 0 for v in values_of(data) if not math.isnan(v))
                note = ("  (note: above zero now: remove its ZERO_ALLOWED entry)" if moved
                        else "  (zero allowed: " + ZERO_ALLOWED[expr].split(",")[0] + ")")
            print(f"    ok    {row:9} {title} [{ref}]: {len(data['result'])} series, {short(values_of(data))}{note}")
        elif q in skipped:
            print(f"    skip  {row:9} {title} [{ref}]: not checked (row {row} skipped)")
        else:
            print(f"    FAIL  {row:9} {title} [{ref}]: {last[q][0]}")
    if pending:
        _, names = get(url, "/api/v1/label/__name__/values")
        names = names.get("data", []) if isinstance(names, dict) else []
        for q in pending:
            row, title, kind, ref, expr = q
            why, body = last[q]
            msg = [f"panel '{title}' (row {row}, {ref}): {why}", f"  query:    {expr}",
                   f"  response: {json.dumps(body)[:600]}"]
            for name in sorted(set(re.findall(r"\bmoe_[a-z_]+", expr))):
                _, series = get(url, "/api/v1/series", {"match[]": name})
                found = series.get("data", []) if isinstance(series, dict) else []
                labels = sorted({k for s in found for k in s if k != "__name__"})
                msg.append(f"  {name}: {len(found)} series" + (f", labels {labels}" if found else ""))
            failures.append("\n".join(msg))
        failures.append("metric names Prometheus has: " + " ".join(n for n in names if n.startswith("moe_")))

    # Query variables (label_values(METRIC, LABEL)): the values Grafana would offer.
    checked_rows = {q[0] for q in queries if q not in skipped}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query" or not uses_variable(dashboard, checked_rows, var["name"]):
            continue
        definition = var.get("definition") or (var.get("query") or {}).get("query", "")
        m = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)\s*", definition)
        if not m:
            failures.append(f"variable ${var['name']}: cannot check '{definition}' (only label_values(METRIC, LABEL))")
            continue
        while True:
            status, body = get(url, f"/api/v1/label/{m.group(2)}/values", {"match[]": m.group(1)})
            values = body.get("data", []) if status == 200 else []
            if values or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if values:
            print(f"    ok    variable ${var['name']}: {definition} = {values}")
        else:
            failures.append(f"variable ${var['name']}: {definition} has no values: {json.dumps(body)[:600]}")

    for expr in expects:
        while True:
            status, body = get(url, "/api/v1/query", {"query": expr})
            ok = status == 200 and body["data"]["result"]
            if ok or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if ok:
            labels = [{k: v for k, v in s.get("metric", {}).items() if k not in ("__name__", "job", "cluster")}
                      for s in body["data"]["result"]]
            print(f"    ok    expected: {expr}: {labels}")
        else:
            failures.append(f"expected data from {expr}, got: {json.dumps(body)[:600]}")

    for f in failures:
        print("FAIL: " + f, file=sys.stderr)
    n = len(queries) - len(skipped)
    print(f"    {n - len(pending)} of {n} dashboard queries returned data"
          + (f" ({len(skipped)} not checked: rows {', '.join(skip_rows)})" if skipped else ""))
    return 1 if failures else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    fp = sub.add_parser("free-ports")
    fp.add_argument("count", type=int)
    wp = sub.add_parser("wait")
    wp.add_argument("url")
    wp.add_argument("--targets", type=int, required=True)
    wp.add_argument("--timeout", type=float, default=60)
    cp = sub.add_parser("check")
    cp.add_argument("url")
    cp.add_argument("dashboard")
    cp.add_argument("rules")
    cp.add_argument("--timeout", type=float, default=60)
    cp.add_argument("--skip-row", action="append", default=[])
    cp.add_argument("--only-row", action="append", default=[])
    cp.add_argument("--expect", action="append", default=[])
    a = p.parse_args()
    if a.command == "free-ports":
        print(" ".join(str(port) for port in free_ports(a.count)))
        return 0
    if a.command == "wait":
        return wait(a.url, a.targets, a.timeout)
    return check(a.url, a.dashboard, a.rules, a.timeout, a.skip_row, a.only_row, a.expect)


if __name__ == "__main__":
    sys.exit(main())

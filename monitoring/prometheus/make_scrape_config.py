#!/usr/bin/env python3
"""Write a Prometheus config that scrapes a moe-runtime cluster, from its cluster config.

  make_scrape_config.py CLUSTER_CONFIG [--coordinator HOST[:PORT] | --single-process | --no-coordinator]
                        [--scrape-interval 10s] [--evaluation-interval 10s] [--rules FILE ...]
                        [--job-name moe-runtime] [-o OUT]

Targets, with the ports the runtime computes (docs/configuration.md):
- the coordinator (`moe serve`): ports.metrics (default 7102) on --coordinator's host (default
  127.0.0.1, `moe serve --host`'s default); with --coordinator HOST:PORT, that address;
- every node process (`moe node`): nodes[i].metrics_port, default ports.metrics + 10 * (i + 1), on
  nodes[i].host (default 127.0.0.1). A node with metrics_port 0 (ephemeral) cannot be scraped
  from the config alone: it is left out, with a warning.
--single-process is for `moe serve` without --join-nodes (deploy/local.yaml): the nodes do not
run as processes of their own, so only the serving process is scraped.

Every target carries the labels cluster (cluster.name), node (the node's name, or
"coordinator") and role (coordinator or node). The alert rules' MoeTargetDown selects
job="moe-runtime": change --job-name only together with monitoring/prometheus/alerts.yml.
rule_files are written as given; Prometheus resolves relative paths against the directory of
the config file it loads.

The cluster config is read with PyYAML when it is installed (Debian: python3-yaml); without it,
only configs written in YAML's JSON subset can be read (JSON is valid YAML, and `moe` reads it).
Nothing here is secret: the cluster secret is never written out.
"""
import argparse
import json
import sys

DEFAULT_PORTS = {"control": 7100, "api": 7101, "metrics": 7102}


class config_error(Exception):
    pass


def load_cluster_config(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        import yaml  # noqa: PLC0415 (optional dependency)
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise config_error(
                f"{path}: PyYAML is not installed (Debian: python3-yaml; pip: pyyaml) and the file is not "
                f"in YAML's JSON form ({e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise config_error(f"{path}: invalid YAML: {e}") from None


def port_of(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise config_error(f"{what}: expected a port 0..65535, got {value!r}")
    return value


def targets(cluster, coordinator=None, single_process=False, with_coordinator=True):
    """[(address, labels)] to scrape; warnings go to stderr."""
    if not isinstance(cluster, dict):
        raise config_error("the cluster config is not a mapping")
    name = (cluster.get("cluster") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise config_error("cluster.name: required")
    ports = dict(DEFAULT_PORTS)
    ports.update(cluster.get("ports") or {})
    metrics = port_of(ports["metrics"], "ports.metrics")
    nodes = cluster.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise config_error("nodes: required (a non-empty list)")

    out = []
    if with_coordinator:
        host, port = "127.0.0.1", metrics
        if coordinator:
            host, sep, p = coordinator.rpartition(":")
            if not sep:
                host, port = coordinator, metrics
            else:
                port = port_of(int(p) if p.isdigit() else -1, f"--coordinator {coordinator}")
        if port == 0:
            print("warning: ports.metrics is 0 (ephemeral): give the coordinator's address with "
                  "--coordinator HOST:PORT; left out", file=sys.stderr)
        else:
            out.append((f"{host}:{port}", {"cluster": name, "node": "coordinator", "role": "coordinator"}))
    if single_process:
        return out
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not node.get("name"):
            raise config_error(f"nodes[{i}].name: required")
        if "metrics_port" in node:
            port = port_of(node["metrics_port"], f"nodes[{i}].metrics_port")
        else:
            # As runtime::node_metrics_port: ephemeral stays ephemeral, and the sum is capped.
            port = 0 if metrics == 0 else min(65535, metrics + 10 * (i + 1))
        if port == 0:
            print(f"warning: node {node['name']}: its metrics port is ephemeral; left out", file=sys.stderr)
            continue
        host = node.get("host", "127.0.0.1")
        out.append((f"{host}:{port}", {"cluster": name, "node": str(node["name"]), "role": "node"}))
    return out


def render(scrape, job_name, scrape_interval, evaluation_interval, rules, source):
    q = json.dumps  # a JSON string is a valid YAML scalar: no quoting rules to get wrong
    lines = [
        f"# Generated by monitoring/prometheus/make_scrape_config.py from {source}.",
        "global:",
        f"  scrape_interval: {scrape_interval}",
        f"  evaluation_interval: {evaluation_interval}",
    ]
    if rules:
        lines.append("rule_files:")
        lines += [f"  - {q(r)}" for r in rules]
    lines += ["scrape_configs:", f"  - job_name: {q(job_name)}", "    static_configs:"]
    for address, labels in scrape:
        lines.append(f"      - targets: [{q(address)}]")
        lines.append("        labels: {" + ", ".join(f"{k}: {q(v)}" for k, v in labels.items()) + "}")
    if not scrape:
        lines.append("      []")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="the cluster config (docs/configuration.md)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--coordinator", metavar="HOST[:PORT]",
                   help="where `moe serve` serves /metrics (default 127.0.0.1:ports.metrics)")
    g.add_argument("--single-process", action="store_true",
                   help="`moe serve` without --join-nodes: scrape the serving process only")
    p.add_argument("--no-coordinator", action="store_true", help="scrape the node processes only")
    p.add_argument("--scrape-interval", default="10s")
    p.add_argument("--evaluation-interval", default="10s")
    p.add_argument("--rules", action="append", default=None, metavar="FILE",
                   help="rule files to load (default: alerts.yml, next to the written config)")
    p.add_argument("--job-name", default="moe-runtime")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    a = p.parse_args(argv)
    if a.no_coordinator and a.single_process:
        p.error("--no-coordinator and --single-process leave nothing to scrape")
    try:
        scrape = targets(load_cluster_config(a.config), a.coordinator, a.single_process, not a.no_coordinator)
    except (OSError, config_error) as e:
        print(f"make_scrape_config.py: error: {e}", file=sys.stderr)
        return 1
    text = render(scrape, a.job_name, a.scrape_interval, a.evaluation_interval,
                  ["alerts.yml"] if a.rules is None else a.rules, a.config)
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

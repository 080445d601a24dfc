#!/usr/bin/env python3
"""monitoring/prometheus/make_scrape_config.py: the targets follow the runtime's port rules
(docs/configuration.md: a node's metrics_port defaults to ports.metrics + 10 * (i + 1)), and the
written file is the Prometheus config it should be.

  make_scrape_config_test.py REPO_ROOT
"""
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
import unittest
from pathlib import Path

ROOT = Path(sys.argv.pop(1)) if len(sys.argv) > 1 else Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("make_scrape_config",
                                              ROOT / "monitoring/prometheus/make_scrape_config.py")
msc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(msc)


def cluster(**over):
    c = {"cluster": {"name": "c", "secret": "never-written"},
         "nodes": [{"name": "n0", "host": "10.0.0.10"}, {"name": "n1", "host": "10.0.0.11"}],
         "model": {"preset": "tiny"}}
    c.update(over)
    return c


def quiet(fn, *args, **kwargs):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        return fn(*args, **kwargs), err.getvalue()


class targets_test(unittest.TestCase):
    def test_default_ports(self):
        got = msc.targets(cluster())
        self.assertEqual([a for a, _ in got], ["127.0.0.1:7102", "10.0.0.10:7112", "10.0.0.11:7122"])
        self.assertEqual(got[0][1], {"cluster": "c", "node": "coordinator", "role": "coordinator"})
        self.assertEqual(got[2][1], {"cluster": "c", "node": "n1", "role": "node"})

    def test_ports_from_the_config(self):
        c = cluster(ports={"control": 9000, "api": 9001, "metrics": 9002})
        c["nodes"][1]["metrics_port"] = 9999
        del c["nodes"][0]["host"]  # 127.0.0.1, as the runtime's default
        got = msc.targets(c, coordinator="moe-api.moe.svc")
        self.assertEqual([a for a, _ in got], ["moe-api.moe.svc:9002", "127.0.0.1:9012", "10.0.0.11:9999"])

    def test_coordinator_address(self):
        self.assertEqual(msc.targets(cluster(), coordinator="10.0.0.5:8000")[0][0], "10.0.0.5:8000")
        with self.assertRaises(msc.config_error):
            msc.targets(cluster(), coordinator="10.0.0.5:http")

    def test_single_process_and_nodes_only(self):
        self.assertEqual([a for a, _ in msc.targets(cluster(), single_process=True)], ["127.0.0.1:7102"])
        self.assertEqual([a for a, _ in msc.targets(cluster(), with_coordinator=False)],
                         ["10.0.0.10:7112", "10.0.0.11:7122"])

    def test_ephemeral_ports_are_left_out_with_a_warning(self):
        c = cluster(ports={"metrics": 0})
        c["nodes"][1]["metrics_port"] = 7300
        got, err = quiet(msc.targets, c)
        self.assertEqual([a for a, _ in got], ["10.0.0.11:7300"])
        self.assertIn("n0", err)
        self.assertIn("--coordinator", err)

    def test_the_sum_is_capped_as_the_runtime_caps_it(self):
        got = msc.targets(cluster(ports={"metrics": 65530}))
        self.assertEqual([a for a, _ in got], ["127.0.0.1:65530", "10.0.0.10:65535", "10.0.0.11:65535"])

    def test_bad_configs(self):
        for bad in ([], cluster(cluster={}), cluster(nodes=[]), cluster(nodes=[{"host": "x"}]),
                    cluster(ports={"metrics": "7102"}), cluster(ports={"metrics": 70000})):
            with self.assertRaises(msc.config_error, msg=repr(bad)):
                msc.targets(bad)


class main_test(unittest.TestCase):
    def run_main(self, config_text, *args):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "cluster.yaml"
            path.write_text(config_text)
            out = io.StringIO()
            err = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = msc.main([str(path), *args])
            return rc, out.getvalue(), err.getvalue()

    def test_json_form_needs_no_pyyaml(self):
        rc, out, _ = self.run_main(json.dumps(cluster()), "--scrape-interval", "1s", "--rules", "/r/a.yml",
                                   "--rules", "b.yml")
        self.assertEqual(rc, 0)
        self.assertIn("  scrape_interval: 1s\n  evaluation_interval: 10s\n", out)
        self.assertIn('rule_files:\n  - "/r/a.yml"\n  - "b.yml"\n', out)
        self.assertIn('  - job_name: "moe-runtime"\n', out)
        self.assertIn('      - targets: ["10.0.0.11:7122"]\n'
                      '        labels: {cluster: "c", node: "n1", role: "node"}\n', out)
        self.assertNotIn("never-written", out)

    def test_yaml(self):
        try:
            import yaml  # noqa: F401
        except ImportError:
            self.skipTest("PyYAML is not installed")
        text = ("cluster: {name: y, secret: s}\nnodes:\n  - {name: a, host: h1, metrics_port: 9100}\n"
                "  - name: b\n    host: h2\nmodel: {preset: tiny}\nports: {metrics: 9000}\n")
        rc, out, _ = self.run_main(text, "--coordinator", "ctl")
        self.assertEqual(rc, 0)
        for target in ("ctl:9000", "h1:9100", "h2:9020"):
            self.assertIn(f'["{target}"]', out)
        # The committed scrape.yml is what the script writes for deploy/local.yaml.
        committed = [l for l in (ROOT / "monitoring/prometheus/scrape.yml").read_text().splitlines()
                     if not l.startswith("#")]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            msc.main([str(ROOT / "deploy/local.yaml"), "--single-process"])
        generated = [l for l in buf.getvalue().splitlines() if not l.startswith("#")]
        self.assertEqual(committed, generated,
                         "monitoring/prometheus/scrape.yml is out of step with make_scrape_config.py "
                         "deploy/local.yaml --single-process")

    def test_errors_exit_1_with_the_reason(self):
        rc, out, err = self.run_main('{"cluster": {"name": "x"}, "nodes": []}')
        self.assertEqual(rc, 1)
        self.assertEqual(out, "")
        self.assertIn("nodes: required", err)


if __name__ == "__main__":
    unittest.main(verbosity=1)

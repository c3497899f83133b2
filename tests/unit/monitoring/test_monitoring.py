"""The Prometheus rules, their unit tests, the Grafana dashboard and docs/metrics.md against the code.

* every metric a rule, a rule test or a dashboard query names is one the collection really writes: the names
  are read from plugins/module_utils/*.py (string literals that are a whole metric name; histograms add
  ``_bucket``/``_sum``/``_count``), not from a list kept here. Two prefixes: ``baileys_resilience_`` (the host
  jobs and the probe) and ``baileys_pitr_`` (the pitr role's metrics job, plugins/module_utils/pitr.py);
* every metric the code writes is documented in docs/metrics.md, with the type the code gives it;
* ``promtool check rules`` and ``promtool test rules`` pass, and every dashboard query parses. Without promtool
  these skip, except when ``CI`` is set: then they fail (scripts/install-system-deps.sh installs it).
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
MODULE_UTILS = ROOT / "plugins" / "module_utils"
RULES = ROOT / "monitoring" / "prometheus" / "baileys-resilience.rules.yml"
RULE_TESTS = sorted((ROOT / "monitoring" / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = ROOT / "monitoring" / "grafana" / "baileys-resilience.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

# the metric names the collection writes: the host jobs' and the probe's, and the pitr metrics job's
NAME = r"baileys_(?:resilience|pitr)_[a-z0-9_]*[a-z0-9]"
WHOLE_NAME = re.compile(r"^%s$" % NAME)
# a metric name inside PromQL; recorded series (baileys_resilience:...) have a colon instead
QUERY_NAME = re.compile(r"(?<![A-Za-z0-9_:])%s(?![A-Za-z0-9_:])" % NAME)
RECORDED_NAME = re.compile(r"(?<![A-Za-z0-9_:])baileys_resilience:[A-Za-z0-9_:]*[A-Za-z0-9_]")
TYPES = {"gauge", "counter", "histogram", "summary", "untyped"}
SERIES_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
PROMTOOL_TIMEOUT = 120


# --------------------------------------------------------------------------- what the code writes


def _docstring_nodes(tree):
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                nodes.add(id(body[0].value))
    return nodes


def _const_str(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


@functools.lru_cache(maxsize=None)
def emitted_metrics():
    """``{name: type or None}`` for every metric name written in plugins/module_utils/*.py.

    A name is a string literal (not a docstring) that is a whole ``baileys_resilience_*`` or ``baileys_pitr_*``
    name; its type comes from a metric tuple ``(name, help, type, samples)`` or a ``histogram_metric(name, ...)``
    call."""
    found = {}
    for path in sorted(MODULE_UTILS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        docstrings = _docstring_nodes(tree)
        for node in ast.walk(tree):
            value = _const_str(node)
            if value and id(node) not in docstrings and WHOLE_NAME.match(value):
                found.setdefault(value, None)
            if isinstance(node, ast.Tuple) and len(node.elts) >= 3:
                name, kind = _const_str(node.elts[0]), _const_str(node.elts[2])
                if name and WHOLE_NAME.match(name) and kind in TYPES:
                    found[name] = kind
            if isinstance(node, ast.Call) and node.args:
                func = node.func
                func_name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                name = _const_str(node.args[0])
                if func_name == "histogram_metric" and name and WHOLE_NAME.match(name):
                    found[name] = "histogram"
    return found


def series_names(emitted):
    """The series names a query may use: every metric, plus the ``_bucket``/``_sum``/``_count`` of histograms."""
    names = set(emitted)
    for name, kind in emitted.items():
        names.update(name + suffix for suffix in SERIES_SUFFIXES.get(kind, ()))
    return names


# --------------------------------------------------------------------------- what the monitoring files use


def load_rules():
    return yaml.safe_load(RULES.read_text(encoding="utf-8"))


def rules_of(kind):
    return [rule for group in load_rules()["groups"] for rule in group["rules"] if kind in rule]


def load_dashboard():
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard):
    """Every PromQL expression of the panels, and the templating queries."""
    queries = []
    for panel in dashboard_panels(dashboard):
        queries.extend((panel.get("title"), t["expr"]) for t in panel.get("targets", []) if t.get("expr"))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            queries.append(("variable " + var["name"], query))
    return queries


def rule_test_series():
    names = []
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for series in case.get("input_series", []):
                names.append((path.name, series["series"]))
    return names


def used_names():
    """``[(where, metric name)]`` for every baileys_resilience_* or baileys_pitr_* name in a rule, rule test or
    dashboard query."""
    used = []
    for rule in load_rules()["groups"]:
        for r in rule["rules"]:
            used.extend(("rule %s" % (r.get("alert") or r.get("record")), n) for n in QUERY_NAME.findall(r["expr"]))
    for where, series in rule_test_series():
        used.extend(("rule test %s" % where, n) for n in QUERY_NAME.findall(series))
    for title, expr in dashboard_queries(load_dashboard()):
        used.extend(("dashboard %s" % title, n) for n in QUERY_NAME.findall(expr))
    return used


def documented_metrics():
    """``{name: type}`` from the tables of docs/metrics.md (rows ``| `name` | type | ...``)."""
    rows = {}
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`(%s)`\s*\|\s*([a-z]+)\s*\|" % NAME, line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


# --------------------------------------------------------------------------- tests: names


def test_the_code_writes_metrics():
    emitted = emitted_metrics()
    assert len(emitted) >= 20, emitted
    assert emitted["baileys_resilience_job_success"] == "gauge"
    untyped = sorted(name for name, kind in emitted.items() if kind is None)
    assert not untyped, "metric names without a type in a metric tuple: %s" % untyped


def test_every_queried_metric_is_emitted():
    known = series_names(emitted_metrics())
    used = used_names()
    assert used
    unknown = sorted({"%s: %s" % (where, name) for where, name in used if name not in known})
    assert not unknown, "names no code in plugins/module_utils writes:\n" + "\n".join(unknown)


def test_histogram_series_only_for_histograms():
    emitted = emitted_metrics()
    for where, name in used_names():
        if name not in emitted:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert emitted.get(base) in SERIES_SUFFIXES, "%s: %s is not a histogram's series" % (where, name)


def test_every_recorded_series_used_is_defined():
    defined = {rule["record"] for rule in rules_of("record")}
    exprs = [("rule %s" % (r.get("alert") or r.get("record")), r["expr"]) for r in rules_of("expr")]
    exprs += [("dashboard %s" % t, e) for t, e in dashboard_queries(load_dashboard())]
    missing = sorted({"%s: %s" % (where, n) for where, e in exprs for n in RECORDED_NAME.findall(e)
                      if n not in defined})
    assert not missing, missing
    for name in defined:
        assert name.startswith("baileys_resilience:"), name


def test_the_probe_metrics_are_emitted():
    """The store probe's metrics, which the rules and the dashboard rely on (docs/metrics.md)."""
    emitted = emitted_metrics()
    assert emitted.get("baileys_resilience_probe_up") == "gauge"
    assert emitted.get("baileys_resilience_probe_duration_seconds") == "histogram"
    assert emitted.get("baileys_resilience_probe_last_timestamp_seconds") == "gauge"
    assert emitted.get("baileys_resilience_alert_active") == "gauge"


def test_the_pitr_metrics_are_emitted():
    """The pitr metrics job's gauges (plugins/module_utils/pitr.py), which the pitr alerts rely on."""
    emitted = emitted_metrics()
    for name in ("receive_wal_up", "check_ok", "check_failed", "slot_exists", "slot_active", "slot_lag_bytes",
                 "slot_safe_wal_size_bytes", "slot_lost", "wal_waiting_files", "wal_waiting_oldest_age_seconds",
                 "last_backup_timestamp_seconds"):
        assert emitted.get("baileys_pitr_" + name) == "gauge", name


# --------------------------------------------------------------------------- tests: docs


def test_every_emitted_metric_is_documented_with_its_type():
    emitted = emitted_metrics()
    documented = documented_metrics()
    missing = sorted(set(emitted) - set(documented))
    assert not missing, "metrics the code writes that docs/metrics.md does not document: %s" % missing
    wrong = sorted("%s: code %s, docs %s" % (n, emitted[n], documented[n]) for n in emitted
                   if emitted[n] and documented[n] != emitted[n])
    assert not wrong, wrong


def test_every_documented_metric_is_emitted():
    extra = sorted(set(documented_metrics()) - set(emitted_metrics()))
    assert not extra, "docs/metrics.md documents metrics no code writes: %s" % extra


def test_every_alert_is_documented():
    doc = METRICS_DOC.read_text(encoding="utf-8")
    for rule in rules_of("alert"):
        assert "### %s" % rule["alert"] in doc, rule["alert"]


# --------------------------------------------------------------------------- tests: rules


def _anchors(path):
    anchors = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_alerts_have_severity_and_annotations():
    alerts = rules_of("alert")
    assert len({a["alert"] for a in alerts}) >= 10
    for rule in alerts:
        assert rule["alert"].startswith("BaileysResilience"), rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), rule["alert"]
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key), "%s: no %s" % (rule["alert"], key)
        doc, _sep, anchor = annotations["runbook_url"].partition("#")
        assert anchor, annotations["runbook_url"]
        assert (ROOT / doc).is_file(), annotations["runbook_url"]
        assert anchor in _anchors(ROOT / doc), "%s: no heading for #%s in %s" % (rule["alert"], anchor, doc)


def test_every_alert_is_unit_tested_firing_and_not_firing():
    firing, quiet = set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules_of("alert")}
    assert not names - firing, "alerts no test sees firing: %s" % sorted(names - firing)
    assert not names - quiet, "alerts no test sees quiet: %s" % sorted(names - quiet)
    assert not (firing | quiet) - names, "tests of alerts that do not exist: %s" % sorted((firing | quiet) - names)


# --------------------------------------------------------------------------- tests: dashboard


def test_dashboard_shape():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "baileys-resilience"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = list(dashboard_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    titles = " ".join(p["title"] for p in panels)
    for word in ("P50 / P95 / P99", "pre-keys per company", "Backup age", "replication", "Alert state"):
        assert word in titles, word
    exprs = " ".join(e for _title, e in dashboard_queries(dashboard))
    for q in ("0.50", "0.95", "0.99"):
        quantile = "histogram_quantile(%s, sum by (instance, le) (rate(baileys_resilience_probe_duration_seconds_bucket"
        assert quantile % q in exprs, q


# --------------------------------------------------------------------------- tests: promtool


def promtool():
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("promtool is missing and CI is set: install Debian's prometheus package "
                    "(scripts/install-system-deps.sh does)")
    pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")


def run_promtool(*args):
    proc = subprocess.run([promtool(), *args], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT, check=False)
    assert proc.returncode == 0, "promtool %s:\n%s%s" % (" ".join(args), proc.stdout, proc.stderr)
    return proc.stdout


def test_promtool_check_rules():
    out = run_promtool("check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_promtool_test_rules():
    assert RULE_TESTS
    out = run_promtool("test", "rules", *map(str, RULE_TESTS))
    assert "FAILED" not in out


def test_dashboard_queries_parse(tmp_path):
    """Every panel query, with the dashboard's variables filled in, is valid PromQL (checked as a rule)."""
    values = {"$__rate_interval": "1m", "$instance": ".*", "$company": ".*", "$job_label": "exported_job"}
    rules = []
    for i, (title, expr) in enumerate(dashboard_queries(load_dashboard())):
        if expr.startswith("label_values("):
            continue
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr.replace('"$1"', ""), "%s: unknown variable in %s" % (title, expr)
        rules.append({"record": "dashboard:query_%d" % i, "expr": expr})
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    run_promtool("check", "rules", str(path))

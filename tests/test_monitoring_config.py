"""The monitoring configs in config/: Prometheus alerting rules and scrape config, Grafana
dashboard. They must stay valid and use only the metric names the manager serves."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS / "multibot-alerts.yml"
SCRAPE_CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = ROOT / "config" / "grafana" / "multibot-dashboard.json"
ALERT_CASES = Path(__file__).resolve().parent / "monitoring_alert_cases.yml"

#: Alerts an operator relies on; more may be added, none of these removed.
REQUIRED_ALERTS = {
    "MultibotManagerDown",
    "MultibotManagerMetricsAbsent",
    "MultibotConsumerLagHigh",
    "MultibotPendingStuck",
    "MultibotDeadLettersGrowing",
    "MultibotDeliveriesMissed",
    "MultibotDeliveryDelayHigh",
    "MultibotMemoryHigh",
    "MultibotMemoryCritical",
    "MultibotBotCrashLoop",
    "MultibotBotRestartingOften",
    "MultibotBotDown",
    "MultibotArchiveDown",
    "MultibotArchiveLagGrowing",
}
SEVERITIES = {"warning", "critical"}
DURATION = re.compile(r"^(\d+[smhdwy])+$")
METRIC = re.compile(r"\bmultibot_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# What the dashboard's PromQL gets from Grafana, to check it as plain PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$job": "multibot",
    "$group": ".*",
    "$bot": ".*",
}


def _load_yaml(path: Path) -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(path.read_text()))


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(DASHBOARD.read_text()))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_queries() -> list[str]:
    """The PromQL of every panel target and every query variable."""
    dashboard = _dashboard()
    queries = [
        target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def _case_series() -> list[str]:
    """The input series of the alert unit tests."""
    cases = _load_yaml(ALERT_CASES)
    return [series["series"] for test in cases["tests"] for series in test["input_series"]]


def _family(name: str, families: frozenset[str]) -> str | None:
    """The metric family a series name belongs to, if it is one of ``families``.

    Histogram series carry a suffix the family name does not; a counter is named with
    ``_total`` in the contract, but prometheus_client names its family without it.
    """
    if name in families:
        return name
    for suffix in (*HISTOGRAM_SUFFIXES, "_total"):
        base = name.removesuffix(suffix)
        if base != name and base in families:
            return base
    return None


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return promtool


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


#: Where PromQL (or series names) of ours is, by what the test reports.
QUERIES: dict[str, Callable[[], list[str]]] = {
    "alert rules": lambda: [rule["expr"] for rule in _rules()],
    "dashboard": _dashboard_queries,
    "alert unit tests": _case_series,
}


class TestAlertRules:
    def test_every_alert_says_what_and_how_bad(self) -> None:
        """Each alert has a for:, a severity of warning or critical, a summary and a description."""
        alerts = _alerts()
        assert alerts
        for alert in alerts:
            name = alert["alert"]
            assert DURATION.match(str(alert.get("for", ""))), f"{name}: no valid for:"
            assert alert.get("labels", {}).get("severity") in SEVERITIES, name
            annotations = alert.get("annotations", {})
            assert annotations.get("summary", "").strip(), f"{name}: no summary"
            assert annotations.get("description", "").strip(), f"{name}: no description"

    def test_descriptions_say_what_to_run_first(self) -> None:
        """Each description names a command to start from."""
        for alert in _alerts():
            description = alert["annotations"]["description"]
            assert "`multibot " in description or "`systemctl " in description, alert["alert"]

    def test_names_are_unique_and_cover_the_operator_cases(self) -> None:
        """No two alerts share a name, and none of the required ones is missing."""
        names = [alert["alert"] for alert in _alerts()]
        assert len(names) == len(set(names))
        assert set(names) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(names)

    def test_every_alert_has_a_unit_test_that_fires_it(self) -> None:
        """The promtool unit tests make every alert fire at least once."""
        cases = _load_yaml(ALERT_CASES)
        fired = {
            check["alertname"]
            for test in cases["tests"]
            for check in test["alert_rule_test"]
            if check.get("exp_alerts")
        }
        assert {alert["alert"] for alert in _alerts()} <= fired

    def test_the_rules_select_the_scrape_job(self) -> None:
        """The job the rules select is the one the example scrape config defines."""
        jobs = {job["job_name"] for job in _load_yaml(SCRAPE_CONFIG)["scrape_configs"]}
        for rule in _rules():
            for job in re.findall(r'job="([^"]*)"', rule["expr"]):
                assert job in jobs, rule.get("alert")

    def test_the_scrape_config_loads_the_rules(self) -> None:
        """prometheus.yml scrapes the manager's default address and loads the rules file."""
        config = _load_yaml(SCRAPE_CONFIG)
        assert ALERTS.name in config["rule_files"]
        (job,) = (job for job in config["scrape_configs"] if job["job_name"] == "multibot")
        assert job["metrics_path"] == "/metrics"
        assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]


class TestDashboard:
    def test_panels_have_unique_ids_a_place_and_a_datasource(self) -> None:
        """Every panel has its own id and a gridPos; every panel that queries has a datasource."""
        dashboard = _dashboard()
        assert dashboard["schemaVersion"] >= 39
        panels = list(_panels(dashboard["panels"]))
        ids = [panel["id"] for panel in panels]
        assert len(ids) == len(set(ids))
        for panel in panels:
            assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["id"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["id"]
            if panel["type"] == "row":
                continue
            assert panel.get("datasource"), panel["id"]
            assert panel["targets"], panel["id"]
            for target in panel["targets"]:
                assert target["expr"].strip(), panel["id"]

    def test_the_datasource_is_chosen_by_the_operator(self) -> None:
        """Panels use the datasource variable, never a uid of someone's Grafana."""
        dashboard = _dashboard()
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for panel in _panels(dashboard["panels"]):
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


class TestMetricNames:
    @pytest.fixture
    def families(self) -> frozenset[str]:
        # Imported by name: the module is another part's work and may not exist yet.
        try:
            names = importlib.import_module("manager.observe.metrics").METRIC_NAMES
        except (ImportError, AttributeError) as error:
            pytest.skip(
                f"no manager.observe.metrics.METRIC_NAMES to check the names against: {error}"
            )
        return frozenset(names)

    @pytest.mark.parametrize("where", sorted(QUERIES))
    def test_only_metrics_the_manager_serves(self, families: frozenset[str], where: str) -> None:
        """Every multibot_* name in the PromQL is a metric of manager.observe.metrics."""
        queries = QUERIES[where]()
        names = {name for query in queries for name in METRIC.findall(query)}
        assert names, where
        unknown = sorted(name for name in names if _family(name, families) is None)
        assert not unknown, f"{where}: metrics the manager does not serve: {unknown}"


class TestPromtool:
    def test_check_rules(self) -> None:
        """promtool accepts the rules file (PromQL and annotation templates)."""
        result = _run(_promtool(), "check", "rules", str(ALERTS))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_check_config(self) -> None:
        """promtool accepts the scrape config and the rules it loads."""
        result = _run(_promtool(), "check", "config", str(SCRAPE_CONFIG))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_alerts_fire_when_they_should(self, tmp_path: Path) -> None:
        """The alert unit tests pass (annotations left out: only when and on what alerts fire)."""
        promtool = _promtool()
        rules = _load_yaml(ALERTS)
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule.pop("annotations", None)
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        cases = _load_yaml(ALERT_CASES)
        cases["rule_files"] = ["rules.yml"]
        (tmp_path / "cases.yml").write_text(yaml.safe_dump(cases))
        result = _run(promtool, "test", "rules", "cases.yml", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_dashboard_queries_are_valid_promql(self, tmp_path: Path) -> None:
        """Every dashboard query, its Grafana variables filled in, parses as PromQL."""
        promtool = _promtool()
        rules = []
        for number, query in enumerate(_dashboard_queries()):
            if query.startswith("label_values("):
                continue  # Grafana's variable syntax, not PromQL
            expr = query
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, query
            rules.append({"record": f"dashboard:query_{number}", "expr": expr})
        assert rules
        path = tmp_path / "dashboard-queries.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        result = _run(promtool, "check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr

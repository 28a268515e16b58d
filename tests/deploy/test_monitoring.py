"""deploy/monitoring/alerts.yaml only alerts on metrics the API exposes."""

from __future__ import annotations

import re

import yaml

from tests.deploy.conftest import ROOT

ALERTS = ROOT / "deploy" / "monitoring" / "alerts.yaml"
# Suffixes the Prometheus client adds to counter and histogram families.
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def exposed_families() -> set[str]:
    source = (ROOT / "app" / "metrics.py").read_text()
    return set(re.findall(r"\"(latentd_[a-z_]+)\"", source))


def test_rules_are_well_formed() -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    names = [rule["alert"] for group in groups for rule in group["rules"]]
    assert len(names) == len(set(names))
    for group in groups:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule.get("alert")
            assert rule["labels"]["severity"] in {"critical", "warning"}


def test_rules_use_only_metrics_the_api_exposes() -> None:
    families = exposed_families()
    assert {"latentd_queue_depth", "latentd_workers", "latentd_redis_up"} <= families
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            for metric in re.findall(r"\b(latentd_[a-z_]+)", rule["expr"]):
                family = next((metric[: -len(s)] for s in SUFFIXES if metric.endswith(s)), metric)
                assert metric in families or family in families, f"{rule['alert']}: {metric}"

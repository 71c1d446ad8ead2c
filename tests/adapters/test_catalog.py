"""The metric catalog (adapters/metrics/catalog.py): complete, checked, batchable, overridable."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from adapters.metrics.catalog import (
    BUILTIN,
    PROVIDERS,
    Catalog,
    CatalogEntry,
    catalog_for,
    default_pod_regex,
)
from adapters.metrics.prometheus import QueryPlanner
from dsl.ast import MetricDef
from dsl.builtins import METRICS
from dsl.promql import Place, Placeholder, check_template, parse_template
from engine.ports import MetricRequest, Target
from tests.services import which_or_skip

ENTRIES = [(p, name, entry) for p, c in BUILTIN.items() for name, entry in c.items()]
IDS = [f"{p}.{name}" for p, name, _ in ENTRIES]


def test_every_provider_serves_every_builtin_metric_in_its_unit() -> None:
    assert set(BUILTIN) == set(PROVIDERS) == {"istio", "nginx", "plain"}
    for provider, catalog in BUILTIN.items():
        assert set(catalog) == set(METRICS), provider
        for name, entry in catalog.items():
            assert entry.dim is METRICS[name].dim, (provider, name)


@pytest.mark.parametrize(("provider", "name", "entry"), ENTRIES, ids=IDS)
def test_every_template_passes_the_policy_checks(
    provider: str, name: str, entry: CatalogEntry
) -> None:
    defn = MetricDef(name, entry.template, "number")
    assert check_template(defn) == []


@pytest.mark.parametrize(("provider", "name", "entry"), ENTRIES, ids=IDS)
def test_every_template_serves_many_targets_in_one_query(
    provider: str, name: str, entry: CatalogEntry
) -> None:
    assert entry.batchable
    targeted = [
        seg
        for seg in parse_template(entry.template)
        if isinstance(seg, Placeholder) and seg.name != "window"
    ]
    assert targeted and all(seg.place is Place.REGEX for seg in targeted)
    assert {seg.name for seg in targeted} == {"namespace", entry.identity}
    # every aggregation keeps the two labels the result is fanned out by
    groupings = re.findall(r"by \(([^)]*)\)", entry.template)
    assert groupings
    for grouping in groupings:
        labels = [label.strip() for label in grouping.split(",")]
        assert labels[:2] == [entry.namespace_label, entry.workload_label]


def test_each_provider_reads_its_own_series() -> None:
    assert "istio_request_duration_milliseconds_bucket" in BUILTIN["istio"]["p99"].template
    assert BUILTIN["istio"]["p99"].template.endswith(" / 1000")  # milliseconds to seconds
    assert 'reporter="destination"' in BUILTIN["istio"]["error_rate"].template
    assert "nginx_ingress_controller_requests" in BUILTIN["nginx"]["error_rate"].template
    assert BUILTIN["nginx"]["error_rate"].identity == "service"
    plain = 'http_requests_total{namespace=~"{{namespace}}", workload=~"{{workload}}", code=~"5.."'
    assert plain in BUILTIN["plain"]["error_rate"].template
    for provider in PROVIDERS:
        assert not BUILTIN[provider]["p50"].template.endswith("/ 1000") or provider == "istio"
        assert "container_memory_working_set_bytes" in BUILTIN[provider]["memory"].template
        assert "kube_pod_container_status_restarts_total" in BUILTIN[provider]["restarts"].template


def test_promtool_parses_every_batched_query(tmp_path: Path) -> None:
    promtool = which_or_skip("promtool", "apt-get install prometheus")
    targets = [
        Target("shop", "checkout", "stable", "checkout"),
        Target('ev"il', '"}[5m]) or vector(1) #', "canary", "a\\b\nc", r"x-[a-z]+\.y"),
    ]
    queries = []
    for provider in PROVIDERS:
        planner = QueryPlanner(BUILTIN[provider])
        reqs = [MetricRequest(t, m, 90.0) for t in targets for m in METRICS]
        plan = planner.plan(reqs)
        assert len(plan.queries) == len(METRICS) and not plan.unanswerable
        queries += [q.text for q in plan.queries]
    rules = [{"record": f"q{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "catalog.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "g", "rules": rules}]}, ensure_ascii=False))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_the_default_pod_regex_tells_stable_pods_from_canary_pods() -> None:
    stable, canary = (
        re.compile(default_pod_regex("checkout")),
        re.compile(default_pod_regex("checkout-canary")),
    )
    assert stable.fullmatch("checkout-7d9f8b6c5-x2x4z")
    assert not stable.fullmatch("checkout-canary-7d9f8b6c5-x2x4z")
    assert canary.fullmatch("checkout-canary-7d9f8b6c5-x2x4z")
    assert not re.compile(default_pod_regex("a.b")).fullmatch("axb-1-2")


# --- overrides ----------------------------------------------------------------------


def test_an_override_replaces_a_template_and_keeps_the_rest() -> None:
    text = (
        "histogram_quantile(0.99, sum by (namespace, workload, le) (rate(my_latency_bucket{"
        'namespace=~"{{namespace}}", workload=~"{{workload}}"}[{{window}}])))'
    )
    catalog = catalog_for("plain", {"p99": text})
    assert catalog["p99"].template == text
    assert catalog["p99"].batchable
    assert catalog["p99"].dim is BUILTIN["plain"]["p99"].dim
    assert catalog["p50"] == BUILTIN["plain"]["p50"]
    assert BUILTIN["plain"]["p99"].template != text  # the built-in catalog is untouched
    assert catalog_for("plain") is BUILTIN["plain"]


def test_an_exact_match_override_is_queried_per_target() -> None:
    text = 'sum(rate(hits{ns="{{namespace}}", app="{{workload}}"}[{{window}}]))'
    catalog = catalog_for("plain", {"request_rate": text})
    assert not catalog["request_rate"].batchable
    planner = QueryPlanner(catalog)
    reqs = [MetricRequest(Target("shop", w, "x"), "request_rate", 60.0) for w in ("a", "b")]
    assert sorted(q.text for q in planner.plan(reqs).queries) == [
        'sum(rate(hits{ns="shop", app="a"}[1m]))',
        'sum(rate(hits{ns="shop", app="b"}[1m]))',
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"p99": "sum(x{a={{workload}}})"}, "the override for `p99` is not a usable query: "),
        ({"p99": 'x{a="{{wrokload}}"}'}, "unknown placeholder `{{wrokload}}` (did you mean"),
        ({"error_rate": 'x{a="{{workload}}}'}, "`error_rate` is not a usable query"),
        ({"cpu": 'rate(x{ns="{{namespace}}"}[5m])'}, "`cpu` never names the track"),
        ({"eror_rate": "up"}, "no metric `eror_rate` to override; did you mean `error_rate`?"),
    ],
)
def test_a_bad_override_is_an_error_naming_the_metric(
    overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        catalog_for("istio", overrides)
    assert message in str(raised.value)


def test_an_unknown_provider_is_an_error_with_the_closest_name() -> None:
    with pytest.raises(ValueError, match=r"unknown traffic provider `isito`; did you mean `istio`"):
        catalog_for("isito")


def test_a_catalog_is_read_only() -> None:
    catalog = BUILTIN["plain"]
    assert isinstance(catalog, Catalog) and catalog.provider == "plain"
    with pytest.raises(TypeError):
        catalog["p99"] = catalog["p50"]  # type: ignore[index]

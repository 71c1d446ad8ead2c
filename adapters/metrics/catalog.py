"""The built-in metric catalog: a traffic provider's name in, one PromQL template per metric out.

`catalog_for("istio")` gives a `Catalog`, a frozen mapping from the built-in
metric names of LANGUAGE.md section 2 to `CatalogEntry`s: the query template
(placeholders as in `dsl.promql`), the unit of its result, and the two labels
that say which namespace and which workload a result series belongs to.
`catalog_for(provider, overrides)` replaces templates, as an operator's
configuration does; a template that `dsl.promql` rejects is a ValueError
naming the metric.

One query serves many rollouts. Every template matches its namespace and its
workload with `=~` and aggregates `by` the two identity labels, so the
Prometheus source can fill `{{namespace}}` and `{{workload}}` with an escaped
regex alternation of every target due at a tick (`checkout|cart|search`) and
hand each target the series that carries its names. A template that matches
with `=` instead (an operator's override may) still works, one query per
target.

Where the numbers come from, per provider:

- `istio`: the sidecars' `istio_requests_total` and
  `istio_request_duration_milliseconds_bucket`, `reporter="destination"` (the
  server side, which sees every request that reached the track), identified
  by `destination_workload_namespace` and `destination_workload`. Istio
  measures latency in milliseconds; the templates divide by 1000.
- `nginx`: ingress-nginx's `nginx_ingress_controller_requests` and
  `nginx_ingress_controller_request_duration_seconds_bucket`, identified by
  `namespace` and `service`. The canary Ingress routes to the canary's own
  Service, so for this provider a track is known by its Service: the target's
  `service` field, or its workload name when a Service is named like its
  Deployment and the field is empty. (A Prometheus that scrapes the
  controller without `honor_labels` renames `namespace` to
  `exported_namespace`; override the templates there.)
- `plain`: an application's own `http_requests_total{code="..."}` counter and
  `http_request_duration_seconds` histogram (what most client libraries
  export), identified by `namespace` and `workload` labels. The application
  does not set them; the scrape does. With static targets::

      scrape_configs:
        - job_name: checkout
          static_configs:
            - targets: ["checkout-stable:8080"]
              labels: {namespace: shop, workload: checkout}
            - targets: ["checkout-canary:8080"]
              labels: {namespace: shop, workload: checkout-canary}

  and with Kubernetes service discovery, a relabeling of the pod's metadata
  (a Deployment's pods carry their ReplicaSet's name, so strip its hash)::

      relabel_configs:
        - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
        - source_labels: [__meta_kubernetes_pod_controller_name]
          regex: (.+)-[a-z0-9]+
          target_label: workload

Pod metrics are the same for every provider, and are keyed by pod rather than
by workload: `cpu` and `memory` come from cAdvisor (the kubelet's
`container_cpu_usage_seconds_total` and `container_memory_working_set_bytes`,
containers only, without the pause container); `restarts`, `ready_pods`,
`not_ready_pods` and `failed_pods` from kube-state-metrics
(`kube_pod_container_status_restarts_total`, `kube_pod_status_ready`,
`kube_pod_status_phase`). Their templates match `pod=~"{{pod_regex}}"` and
aggregate by namespace and pod; the source adds up, per target, the series of
the pods its regex matches. A target without a pod regex gets one for the pods
of a Deployment of that name (`default_pod_regex`). The pod counts are also
served by the Kubernetes adapter's pod-status source, which reads the API
server instead; the catalog's queries serve clusters that run
kube-state-metrics, and the tools (backtests), which only have Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from dsl.ast import Dim
from dsl.promql import Place, Placeholder, Template, TemplateError, quote_meta
from dsl.units import closest

PROVIDERS = ("istio", "nginx", "plain")

Identity = Literal["workload", "service", "pod_regex"]

# The placeholders whose values differ between the targets of one query.
TARGET_PLACEHOLDERS = frozenset({"namespace", "workload", "service", "track", "pod_regex"})

def default_pod_regex(workload: str) -> str:
    """The pods of a Deployment named `workload`: `NAME-<template hash>-<suffix>`.

    Matched whole (PromQL anchors regex matchers), the two dash-separated parts
    without dashes keep `checkout`'s regex from matching the pods of
    `checkout-canary`.
    """
    return quote_meta(workload) + "-[a-z0-9]+-[a-z0-9]+"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One metric's query, the unit of its result, and how a result series names its target.

    `identity` says which target field the series' `workload_label` carries:
    the workload (Istio, plain), the Service (NGINX), or a pod that the
    target's pod regex matches (pod metrics, whose values are summed per
    target). `batchable` is true when the template can be filled with regex
    alternations of many targets at once (see the module docstring).
    Constructing an entry checks the template; a bad one raises TemplateError.
    """

    template: str
    dim: Dim
    namespace_label: str
    workload_label: str
    identity: Identity = "workload"
    compiled: Template = field(init=False, repr=False, compare=False)
    batchable: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = Template(self.template, self.dim)
        object.__setattr__(self, "compiled", compiled)
        object.__setattr__(self, "batchable", self._batchable(compiled))

    def _batchable(self, compiled: Template) -> bool:
        targeted = [
            seg
            for seg in compiled.segments
            if isinstance(seg, Placeholder) and seg.name in TARGET_PLACEHOLDERS
        ]
        # A batch is answered by the identity labels, so the template must name
        # the target by exactly the placeholder those labels stand for, and
        # must (at least) mention the labels it is expected to aggregate by.
        mentions = all(
            re.search(rf"(?<![\w:]){re.escape(label)}(?![\w:])", self.template)
            for label in (self.namespace_label, self.workload_label)
        )
        return (
            all(seg.place is Place.REGEX for seg in targeted)
            and {seg.name for seg in targeted} == {"namespace", self.identity}
            and mentions
        )


class Catalog(Mapping[str, CatalogEntry]):
    """The entries of one provider, by metric name; read-only."""

    __slots__ = ("_entries", "_provider")

    def __init__(self, provider: str, entries: Mapping[str, CatalogEntry]) -> None:
        self._provider = provider
        self._entries: Mapping[str, CatalogEntry] = MappingProxyType(dict(entries))

    @property
    def provider(self) -> str:
        return self._provider

    def __getitem__(self, name: str) -> CatalogEntry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Catalog({self._provider!r}, {sorted(self._entries)})"


# --- the templates ----------------------------------------------------------------

_QUANTILES = {"p50": "0.5", "p90": "0.9", "p99": "0.99"}


@dataclass(frozen=True, slots=True)
class _Traffic:
    """How one provider counts requests; the traffic templates are written from it."""

    requests: str  # the request counter
    buckets: str  # the latency histogram's `_bucket` series
    code_label: str  # the label holding the HTTP status
    namespace_label: str
    workload_label: str
    identity: Identity
    selector: str  # label matchers naming the target (and anything else fixed)
    latency_scale: str = ""  # e.g. " / 1000" for a histogram in milliseconds

    def entries(self) -> dict[str, CatalogEntry]:
        by = f"{self.namespace_label}, {self.workload_label}"
        rate = f"rate({self.requests}{{{self.selector}}}[{{{{window}}}}])"
        total = f"sum by ({by}) ({rate})"

        def share(codes: str) -> str:
            matched = f'{self.requests}{{{self.selector}, {self.code_label}=~"{codes}"}}'
            part = f"sum by ({by}) (rate({matched}[{{{{window}}}}]))"
            # `or 0 * total`: no 5xx series at all means a share of 0, not unknown;
            # no traffic at all still gives 0/0, which is unknown.
            return f"({part} or 0 * {total}) / {total}"

        def entry(template: str, dim: Dim) -> CatalogEntry:
            return CatalogEntry(
                template, dim, self.namespace_label, self.workload_label, self.identity
            )

        out = {
            name: entry(
                f"histogram_quantile({q}, sum by ({by}, le) "
                f"(rate({self.buckets}{{{self.selector}}}[{{{{window}}}}]))){self.latency_scale}",
                Dim.DURATION,
            )
            for name, q in _QUANTILES.items()
        }
        out["success_rate"] = entry(share("2.."), Dim.RATIO)
        out["error_rate"] = entry(share("5.."), Dim.RATIO)
        out["request_rate"] = entry(total, Dim.RATE)
        return out


_POD = 'namespace=~"{{namespace}}", pod=~"{{pod_regex}}"'
_CONTAINERS = 'container!="", container!="POD"'


def _pod_entry(expr: str, dim: Dim) -> CatalogEntry:
    return CatalogEntry(f"sum by (namespace, pod) ({expr})", dim, "namespace", "pod", "pod_regex")


_POD_ENTRIES = {
    "cpu": _pod_entry(
        f"rate(container_cpu_usage_seconds_total{{{_POD}, {_CONTAINERS}}}[{{{{window}}}}])",
        Dim.CORES,
    ),
    "memory": _pod_entry(f"container_memory_working_set_bytes{{{_POD}, {_CONTAINERS}}}", Dim.BYTES),
    "restarts": _pod_entry(f"kube_pod_container_status_restarts_total{{{_POD}}}", Dim.COUNT),
    "ready_pods": _pod_entry(f'kube_pod_status_ready{{{_POD}, condition="true"}}', Dim.COUNT),
    "not_ready_pods": _pod_entry(f'kube_pod_status_ready{{{_POD}, condition!="true"}}', Dim.COUNT),
    "failed_pods": _pod_entry(f'kube_pod_status_phase{{{_POD}, phase="Failed"}}', Dim.COUNT),
}

_TRAFFIC = {
    "istio": _Traffic(
        requests="istio_requests_total",
        buckets="istio_request_duration_milliseconds_bucket",
        code_label="response_code",
        namespace_label="destination_workload_namespace",
        workload_label="destination_workload",
        identity="workload",
        selector='reporter="destination", destination_workload_namespace=~"{{namespace}}", '
        'destination_workload=~"{{workload}}"',
        latency_scale=" / 1000",
    ),
    "nginx": _Traffic(
        requests="nginx_ingress_controller_requests",
        buckets="nginx_ingress_controller_request_duration_seconds_bucket",
        code_label="status",
        namespace_label="namespace",
        workload_label="service",
        identity="service",
        selector='namespace=~"{{namespace}}", service=~"{{service}}"',
    ),
    "plain": _Traffic(
        requests="http_requests_total",
        buckets="http_request_duration_seconds_bucket",
        code_label="code",
        namespace_label="namespace",
        workload_label="workload",
        identity="workload",
        selector='namespace=~"{{namespace}}", workload=~"{{workload}}"',
    ),
}

BUILTIN: Mapping[str, Catalog] = MappingProxyType(
    {
        provider: Catalog(provider, {**traffic.entries(), **_POD_ENTRIES})
        for provider, traffic in _TRAFFIC.items()
    }
)


def catalog_for(provider: str, overrides: Mapping[str, str] | None = None) -> Catalog:
    """The catalog of `provider`, with the templates in `overrides` replacing the built-in ones.

    An override keeps the entry's unit and identity labels. Raises ValueError
    for an unknown provider or metric, and for a template that `dsl.promql`
    rejects or that never names the track (then canary and stable would
    read the same number).
    """
    if provider not in BUILTIN:
        near = closest(provider, PROVIDERS)
        hint = f"did you mean `{near}`? " if near else ""
        raise ValueError(
            f"unknown traffic provider `{provider}`; {hint}(providers: {', '.join(PROVIDERS)})"
        )
    base = BUILTIN[provider]
    if not overrides:
        return base
    entries = dict(base)
    for name, text in overrides.items():
        if name not in entries:
            near = closest(name, tuple(entries))
            hint = f"did you mean `{near}`? " if near else ""
            raise ValueError(
                f"the {provider} catalog has no metric `{name}` to override; {hint}"
                f"(metrics: {', '.join(entries)})"
            )
        if not isinstance(text, str):
            raise ValueError(f"the override for `{name}` must be a PromQL query text")
        try:
            entry = replace(entries[name], template=text)
        except TemplateError as e:
            help = f" ({e.help})" if e.help else ""
            raise ValueError(
                f"the override for `{name}` is not a usable query: {e.message}{help}"
            ) from None
        names = {p for p in entry.compiled.placeholders if p in TARGET_PLACEHOLDERS}
        if not names - {"namespace"}:
            example = f'{entry.workload_label}=~"{{{{{entry.identity}}}}}"'
            raise ValueError(
                f"the override for `{name}` never names the track, so canary and stable would "
                f"read the same number; match it, as in {example}"
            )
        entries[name] = entry
    return Catalog(provider, entries)

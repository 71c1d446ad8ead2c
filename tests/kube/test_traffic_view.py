"""The pure part of `adapters.kube.traffic_view`: routing objects, endpoints and shares as dicts.

In: routing objects, EndpointSlices, pods and ReplicaSets written by hand.
Out: assertions on the backends, tracks, shares and flags the view computes.
"""

from __future__ import annotations

from typing import Any

import pytest

from adapters.kube.traffic_view import (
    BOTH_TRACKS,
    NO_READY,
    NO_SERVICE,
    Backend,
    Routing,
    TrafficViewError,
    build_view,
    endpoints_of,
    gateway_backends,
    istio_backends,
    nginx_backends,
    track_of,
    traffic_of,
    traffic_shares,
)

NS = "shop"


def ep(track: str, version: str = "web:1", ready: bool = True) -> dict[str, Any]:
    return {"track": track, "version": version, "ready": ready}


def cdep(traffic: dict[str, Any], weight: int | None = 25) -> dict[str, Any]:
    return {
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"targetRef": {"name": "web"}, "traffic": traffic},
        "status": {"phase": "Progressing", "weight": weight},
    }


# --- shares ----------------------------------------------------------------------------


def test_weights_split_across_ready_endpoints_by_track() -> None:
    result = traffic_shares(
        [
            {"service": "web", "weight": 75, "endpoints": [ep("stable"), ep("stable")]},
            {"service": "web-canary", "weight": 25, "endpoints": [ep("canary", "web:2")]},
        ]
    )
    assert result["share"] == {"canary": 25.0, "stable": 75.0, "unknown": 0.0, "unserved": 0.0}
    stable, canary = result["backends"]
    assert stable["groups"] == [{"track": "stable", "version": "web:1", "ready": 2}]
    assert canary["groups"] == [{"track": "canary", "version": "web:2", "ready": 1}]
    assert stable["flags"] == canary["flags"] == []
    assert result["problems"] == []


def test_relative_weights_are_normalised() -> None:
    # Gateway API weights are relative: 1 and 3 is 25% / 75%
    result = traffic_shares(
        [
            {"service": "a", "weight": 1, "endpoints": [ep("canary")]},
            {"service": "b", "weight": 3, "endpoints": [ep("stable")]},
        ]
    )
    assert [b["weightPercent"] for b in result["backends"]] == [25.0, 75.0]
    assert result["share"]["canary"] == 25.0


def test_a_service_selecting_both_tracks_is_flagged_and_leaks_to_canary() -> None:
    # stable weight 100, but its Service selects 3 stable pods and 1 canary pod
    result = traffic_shares(
        [
            {
                "service": "web",
                "weight": 100,
                "endpoints": [ep("stable"), ep("stable"), ep("stable"), ep("canary", "web:2")],
            },
            {"service": "web-canary", "weight": 0, "endpoints": [ep("canary", "web:2")]},
        ]
    )
    web = result["backends"][0]
    assert BOTH_TRACKS in web["flags"]
    assert web["share"]["canary"] == 25.0
    assert result["share"]["canary"] == 25.0
    assert any("both canary and stable" in p for p in result["problems"])


def test_no_ready_endpoints_is_flagged_and_its_share_unserved() -> None:
    result = traffic_shares(
        [
            {"service": "web", "weight": 90, "endpoints": [ep("stable")]},
            {"service": "web-canary", "weight": 10, "endpoints": [ep("canary", ready=False)]},
        ]
    )
    canary = result["backends"][1]
    assert canary["flags"] == [NO_READY]
    assert canary["readyEndpoints"] == 0 and canary["notReadyEndpoints"] == 1
    assert result["share"] == {"canary": 0.0, "stable": 90.0, "unknown": 0.0, "unserved": 10.0}
    assert any("10.0% of requests fail" in p for p in result["problems"])


def test_missing_service_and_all_zero_weights() -> None:
    result = traffic_shares(
        [{"service": "web", "weight": 0, "endpoints": [], "serviceFound": False}]
    )
    assert result["backends"][0]["flags"] == [NO_SERVICE, NO_READY]
    assert result["share"]["canary"] == result["share"]["stable"] == 0.0
    assert any("weight 0" in p for p in result["problems"])


def test_endpoints_without_a_pod_are_unknown() -> None:
    result = traffic_shares([{"service": "web", "weight": 1, "endpoints": [ep("unknown", "-")]}])
    assert result["share"]["unknown"] == 100.0


# --- endpoints and tracks -------------------------------------------------------------


def pod(name: str, image: str, labels: dict[str, str], rs: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if rs:
        meta["ownerReferences"] = [{"kind": "ReplicaSet", "name": rs}]
    return {"metadata": meta, "spec": {"containers": [{"name": "web", "image": image}]}}


def rs(name: str, deployment: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "ownerReferences": [{"kind": "Deployment", "name": deployment}]}
    }


def slice_of(*endpoints: tuple[str, bool | None]) -> dict[str, Any]:
    out = []
    for i, (name, ready) in enumerate(endpoints):
        conditions = {} if ready is None else {"ready": ready}
        out.append(
            {
                "addresses": [f"10.0.0.{i}"],
                "conditions": conditions,
                "targetRef": {"kind": "Pod", "name": name},
            }
        )
    return {"endpoints": out}


PODS = {
    "s1": pod("s1", "web:1", {"app": "web"}, "web-aaa"),
    "c1": pod("c1", "web:2", {"app": "web"}, "web-canary-bbb"),  # no track label: owner decides
    "c2": pod("c2", "web:2", {"app": "web", "codedance.io/track": "canary"}),
}
REPLICASETS = {
    "web-aaa": rs("web-aaa", "web"),
    "web-canary-bbb": rs("web-canary-bbb", "web-canary"),
}


def test_track_by_owner_or_label() -> None:
    assert track_of(PODS["s1"], REPLICASETS, "web-canary") == "stable"
    assert track_of(PODS["c1"], REPLICASETS, "web-canary") == "canary"
    assert track_of(PODS["c2"], REPLICASETS, "web-canary") == "canary"


def test_endpoints_dedupe_across_slices_and_absent_ready_means_ready() -> None:
    slices = [slice_of(("s1", None), ("c1", False)), slice_of(("c1", True), ("ghost", True))]
    found = endpoints_of(slices, PODS, REPLICASETS, "web-canary")
    assert sorted((e["track"], e["version"], e["ready"]) for e in found) == [
        ("canary", "web:2", True),
        ("stable", "web:1", True),
        ("unknown", "-", True),
    ]


def test_subset_labels_filter_endpoints() -> None:
    slices = [slice_of(("s1", True), ("c2", True))]
    found = endpoints_of(slices, PODS, REPLICASETS, "web-canary", {"codedance.io/track": "canary"})
    assert [e["track"] for e in found] == ["canary"]


# --- routing objects ------------------------------------------------------------------


def test_defaults_follow_the_controller() -> None:
    t = traffic_of(cdep({"provider": "gateway-api"}))
    assert (t.stable_service, t.canary_service, t.object_name) == ("web", "web-canary", "web")
    t = traffic_of(cdep({"provider": "istio", "service": "api", "virtualService": "vs"}))
    assert (t.stable_service, t.canary_service, t.object_name) == ("api", "api-canary", "vs")


def test_gateway_backends_of_the_rule_with_our_services() -> None:
    route = {
        "metadata": {"name": "web"},
        "spec": {
            "rules": [
                {"backendRefs": [{"name": "other", "weight": 5}]},
                {"backendRefs": [{"name": "web", "weight": 80}, {"name": "web-canary"}]},
            ]
        },
    }
    got = gateway_backends(route, NS, traffic_of(cdep({"provider": "gateway-api"})))
    assert got == [Backend("web", NS, 80), Backend("web-canary", NS, 1)]
    with pytest.raises(TrafficViewError, match="no rule"):
        gateway_backends(
            {"metadata": {"name": "x"}, "spec": {"rules": [{"backendRefs": [{"name": "o"}]}]}},
            NS,
            traffic_of(cdep({"provider": "gateway-api"})),
        )


def test_istio_backends_by_route_name_and_lone_destination() -> None:
    vs = {
        "metadata": {"name": "web"},
        "spec": {
            "http": [
                {"name": "other", "route": [{"destination": {"host": "web"}}]},
                {
                    "name": "primary",
                    "route": [
                        {"destination": {"host": f"web.{NS}.svc.cluster.local"}, "weight": 70},
                        {"destination": {"host": "web", "subset": "canary"}, "weight": 30},
                    ],
                },
            ]
        },
    }
    t = traffic_of(cdep({"provider": "istio", "route": "primary"}))
    assert istio_backends(vs, NS, t) == [
        Backend("web", NS, 70),
        Backend("web", NS, 30, "canary"),
    ]
    assert istio_backends(vs, NS, traffic_of(cdep({"provider": "istio"}))) == [
        Backend("web", NS, 100)
    ]


def ingress(name: str, service: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    backend = {"service": {"name": service, "port": {"number": 80}}}
    return {
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"rules": [{"http": {"paths": [{"path": "/", "backend": backend}]}}]},
    }


def test_nginx_backends_from_canary_weight() -> None:
    t = traffic_of(cdep({"provider": "nginx-ingress"}))
    stable = ingress("web", "web")
    assert nginx_backends(stable, None, NS, t) == [Backend("web", NS, 100)]
    canary = ingress(
        "web-canary",
        "web-canary",
        {
            "nginx.ingress.kubernetes.io/canary": "true",
            "nginx.ingress.kubernetes.io/canary-weight": "50",
            "nginx.ingress.kubernetes.io/canary-weight-total": "1000",
        },
    )
    assert nginx_backends(stable, canary, NS, t) == [
        Backend("web", NS, 950),
        Backend("web-canary", NS, 50),
    ]


def test_build_view_end_to_end_from_dicts() -> None:
    routing = Routing(
        [("HTTPRoute", "web", True)], [Backend("web", NS, 100), Backend("web-canary", NS, 0)]
    )
    services = {(NS, "web"): {}, (NS, "web-canary"): None}
    slices = {(NS, "web"): [slice_of(("s1", True), ("c1", True))]}
    view = build_view(
        cdep({"provider": "gateway-api"}, weight=0),
        routing,
        services,
        slices,
        {NS: PODS},
        {NS: REPLICASETS},
    )
    assert view["version"] == 1
    assert view["statusWeight"] == 0
    assert view["routing"] == [{"kind": "HTTPRoute", "name": "web", "found": True}]
    web, canary = view["backends"]
    assert web["flags"] == [BOTH_TRACKS]
    assert canary["flags"] == [NO_SERVICE, NO_READY]
    assert view["share"]["canary"] == 50.0

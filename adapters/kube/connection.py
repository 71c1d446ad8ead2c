"""Reaching the API server: a kubeconfig file, or the pod's in-cluster credentials."""

from __future__ import annotations

import os

from kubernetes.aio import client, config


async def configuration(kubeconfig: str | None) -> client.Configuration:
    """The client configuration: `kubeconfig` when given, else in-cluster inside a pod,
    else the default kubeconfig."""
    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration, persist_config=False
        )
    return configuration

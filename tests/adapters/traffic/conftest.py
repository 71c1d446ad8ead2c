"""The API server double's fixtures, for the traffic adapters' tests."""

from tests.kube.conftest import apiserver, kube_client  # noqa: F401

"""The controller's own telemetry: Prometheus metrics and the health endpoints.

`PrometheusTelemetry` implements the engine's `Telemetry` port on its own
registry; `HealthServer` serves that registry on `/metrics` beside the
`/healthz` and `/readyz` probes.
"""

from adapters.telemetry.http import HealthServer
from adapters.telemetry.prometheus import PrometheusTelemetry

__all__ = ["HealthServer", "PrometheusTelemetry"]

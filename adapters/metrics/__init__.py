"""Metric sources: the engine's `MetricSource` port over the outside world.

- `catalog`: the built-in metrics' PromQL templates per traffic provider
  (Istio, NGINX Ingress, plain instrumentation), with operator overrides.
- `prometheus`: the one Prometheus module, an asyncio source that batches the
  requests of every rollout due at a tick into one query per metric, and a
  small synchronous facade for the tools.
- `replay`: recorded series (promtool notation) as a source, for local runs,
  demos and tests.

Every source answers a range on the grid `engine.ports.range_times` defines,
so each hands the loop the same timestamps for the same range.
"""

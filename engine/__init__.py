"""Running policies over time: series and snapshots in, verdicts and plans out.

The engine turns what `dsl` compiles into decisions over a rollout's life.
`timeline` replays recorded series through a policy, one verdict per tick; it
is the single place that does so, for policy tests, backtests and replays
alike. `policytest` runs `*_test.yaml` policy tests on top of it. The engine
imports `dsl` and pydantic, never an adapter: the outside world reaches it
through the port Protocols it defines.
"""

"""Running policies over time: samples and snapshots in, verdicts and traffic moves out.

The engine turns what `dsl` compiles into decisions over a rollout's life,
one stage a module:

- `model`: the rollout's spec and its durable status;
- `strategy`: the weights of the steps and when to move on;
- `stream`: fetched metric samples to the snapshot at a tick;
- `machine`: the rollout state machine, a status and an event to a decision;
- `decider`: the pluggable step from a verdict to the next plan (the machine by default);
- `registry`: routers, metric sources, strategies and deciders by name, from
  Python entry points, so a new provider is an installed package;
- `policystore`: a directory of policies, reloaded on change, last good kept;
- `loop`: the control loop that ticks, decides and applies;
- `rollback`: traffic moves that must finish, confirmed by read-back;
- `audit`: every transition as a JSON line;
- `ports`: the Protocols through which the outside world reaches the engine;
- `timeline`: recorded series replayed through a policy, one verdict per tick,
  the single place that does so for policy tests, backtests and replays;
- `policytest`: `*_test.yaml` policy tests on top of the timeline.

The engine imports `dsl` and pydantic only, never an adapter. Time comes from
an injectable clock or is handed in, so the same series give the same verdicts
in a test, a backtest and a live rollout.
"""

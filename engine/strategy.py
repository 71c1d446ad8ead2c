"""Strategies: a `StrategySpec` in, the weights of the steps and when to move out.

`linear` walks 5, 10, 25, 50, 75, 100; `exponential` 1, 5, 10, 25, 50, 100;
`steps` walks the weights a person lists; `manual` walks the linear weights
but waits for a person's approval before every step after the first. A
maximum weight caps the walk: the rollout promotes once it has analysed the
highest weight it may reach.

Each is a builder, `StrategySpec -> Strategy`, registered by name in the
entry point group `codedance.strategies` (ours in pyproject.toml), so a
package can add another; `strategy_of` finds the builder by `spec.type`.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine import registry
from engine.model import StrategySpec

LINEAR = (5, 10, 25, 50, 75, 100)
EXPONENTIAL = (1, 5, 10, 25, 50, 100)


@dataclass(frozen=True, slots=True)
class Strategy:
    weights: tuple[int, ...]
    step_duration: float
    manual: bool = False

    def __post_init__(self) -> None:
        # a strategy may come from a package: a bad one fails here, not mid-rollout
        if not self.weights or any(not 0 <= w <= 100 for w in self.weights):
            raise ValueError(f"a strategy's weights are 0 to 100, at least one: {self.weights}")

    @property
    def last_step(self) -> int:
        return len(self.weights) - 1

    def weight(self, step: int) -> int:
        return self.weights[min(step, self.last_step)]

    def needs_approval(self, step: int) -> bool:
        """Whether moving to `step` waits for a person."""
        return self.manual and step > 0


def strategy_of(spec: StrategySpec) -> Strategy:
    """The strategy registered under `spec.type`, built from the spec."""
    return registry.create(registry.STRATEGIES, spec.type, spec)


def linear(spec: StrategySpec) -> Strategy:
    return _walk(spec, LINEAR)


def exponential(spec: StrategySpec) -> Strategy:
    return _walk(spec, EXPONENTIAL)


def manual(spec: StrategySpec) -> Strategy:
    return _walk(spec, LINEAR, manual=True)


def steps(spec: StrategySpec) -> Strategy:
    if spec.steps is None:
        raise ValueError("a `steps` strategy lists its weights in `steps`")
    return _capped(spec, spec.steps)


def _walk(spec: StrategySpec, base: tuple[int, ...], manual: bool = False) -> Strategy:
    if spec.steps is not None:
        raise ValueError(f"only a `steps` strategy lists weights, not `{spec.type}`")
    return _capped(spec, base, manual)


def _capped(spec: StrategySpec, base: tuple[int, ...], manual: bool = False) -> Strategy:
    weights = base
    if spec.max_weight is not None:
        capped = [w for w in base if w < spec.max_weight] + [spec.max_weight]
        weights = tuple(capped)
    return Strategy(weights, spec.step_duration, manual=manual)

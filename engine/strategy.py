"""Strategies: a `StrategySpec` in, the weights of the steps and when to move out.

`linear` walks 5, 10, 25, 50, 75, 100; `exponential` 1, 5, 10, 25, 50, 100;
`steps` walks the weights a person lists; `manual` walks the linear weights
but waits for a person's approval before every step after the first. A
maximum weight caps the walk: the rollout promotes once it has analysed the
highest weight it may reach.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.model import StrategySpec

LINEAR = (5, 10, 25, 50, 75, 100)
EXPONENTIAL = (1, 5, 10, 25, 50, 100)


@dataclass(frozen=True, slots=True)
class Strategy:
    weights: tuple[int, ...]
    step_duration: float
    manual: bool = False

    @property
    def last_step(self) -> int:
        return len(self.weights) - 1

    def weight(self, step: int) -> int:
        return self.weights[min(step, self.last_step)]

    def needs_approval(self, step: int) -> bool:
        """Whether moving to `step` waits for a person."""
        return self.manual and step > 0


def strategy_of(spec: StrategySpec) -> Strategy:
    if spec.type == "steps":
        if spec.steps is None:
            raise ValueError("a `steps` strategy lists its weights in `steps`")
        base = spec.steps
    elif spec.steps is not None:
        raise ValueError(f"only a `steps` strategy lists weights, not `{spec.type}`")
    else:
        base = EXPONENTIAL if spec.type == "exponential" else LINEAR
    weights = base
    if spec.max_weight is not None:
        capped = [w for w in base if w < spec.max_weight] + [spec.max_weight]
        weights = tuple(capped)
    return Strategy(weights, spec.step_duration, manual=spec.type == "manual")

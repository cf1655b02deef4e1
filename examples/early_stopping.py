"""Callbacks: log each update your own way, and stop the run when validation stops improving.

A callback gets every update's metrics (the keys of metrics.jsonl); returning True stops the run
after that update, and the run still ends with its test evaluation and a checkpoint.
Run: .venv/bin/python examples/early_stopping.py (about a minute).
"""
import policygrad


class StopWhenFlat:
    """Stop after `patience` validation results in a row without a new best."""

    def __init__(self, patience: int = 3):
        self.patience, self.best, self.flat = patience, float("-inf"), 0

    def __call__(self, metrics: dict) -> bool:
        value = metrics.get("eval/return_mean")
        if value is None:  # no evaluation at this update
            return False
        self.best, self.flat = (value, 0) if value > self.best else (self.best, self.flat + 1)
        return self.flat >= self.patience


def show(metrics: dict) -> None:
    if "eval/return_mean" in metrics:
        print(f"env step {metrics['env_steps']:>7}: validation return {metrics['eval/return_mean']:.1f}")


result = policygrad.train(algo="ppo", env="CartPole-v1", total_steps=200_000, seed=1, eval_every=10_000,
                          callbacks=[show, StopWhenFlat(patience=3)], progress=False)
print(f"stopped after {result.summary['env_steps']} of 200000 steps; "
      f"test return {result.final.mean_return:.1f}")

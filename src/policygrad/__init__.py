"""policygrad: REINFORCE, TRPO and PPO for language models and classic control on one shared core.

    import policygrad
    result = policygrad.train(algo="reinforce", task="positive-review", total_steps=40, out="runs/x")
    policygrad.evaluate(result).mean_reward

train, evaluate and sample take objects or strings (see policygrad.api); every error a user can
cause is a PolicygradError, by its own type (ConfigError, TaskError, RewardError, ...).
"""

__version__ = "0.1.0"

from .api import evaluate, make_config, merge, plot, sample, serve_reward, train  # noqa: E402
from .pipeline import nll, pairs, reward_model, sft  # noqa: E402
from .config import Config  # noqa: E402
from .errors import (CheckpointError, ConfigError, EnvError, ModelError, PolicygradError, RewardError,  # noqa: E402
                     TaskError, TrainingError, UsageError)
from .lm.reward_model import RewardModel  # noqa: E402
from .lm.rewards import RewardSet, WeightedReward  # noqa: E402
from .lm.tasks import Task, TaskEnv  # noqa: E402
from .results import ControlEvaluation, LMEvaluation, Sample, TrainResult  # noqa: E402
from .trainer import Callback  # noqa: E402

__all__ = ["train", "evaluate", "sample", "make_config", "merge", "plot", "serve_reward", "reward_model", "pairs",
           "sft", "nll", "Config", "Task", "TaskEnv", "WeightedReward", "RewardSet", "RewardModel",
           "TrainResult", "LMEvaluation", "ControlEvaluation", "Sample", "Callback", "PolicygradError",
           "ConfigError", "TaskError", "RewardError", "ModelError", "EnvError", "CheckpointError",
           "TrainingError", "UsageError"]

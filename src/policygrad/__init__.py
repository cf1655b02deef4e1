"""policygrad: REINFORCE, TRPO and PPO for language models and classic control on one shared core."""

__version__ = "0.1.0"

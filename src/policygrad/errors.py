"""The one base of every error a user can cause."""


class PolicygradError(Exception):
    """A mistake a user can make: a bad config key, a missing file, a reward that raises, a run
    folder that holds another run. The CLI prints it as one line and exits with code 2; a Python
    caller catches it by this type or by its subclass (ConfigError, TaskError, RewardError, ...)."""

"""Every error a user can cause, in one module that imports nothing, so any layer can raise them.

The CLI prints a PolicygradError as one line and exits with code 2; a Python caller catches it by
this base or by a subclass. The modules that raise them re-export their names (`config.ConfigError`,
`lm.tasks.TaskError`, ...), so older imports keep working.
"""


class PolicygradError(Exception):
    """A mistake a user can make: a bad config key, a missing file, a reward that raises, a run
    folder that holds another run. The CLI prints it as one line and exits with code 2; a Python
    caller catches it by this type or by its subclass (ConfigError, TaskError, RewardError, ...)."""


class ConfigError(PolicygradError, ValueError):
    """A user mistake in the configuration; the CLI prints it as one line and exits with code 2."""


class DeviceError(ConfigError):
    """A device or dtype this machine cannot give; shown to the user as one line."""


class AdapterError(ConfigError):
    """An adapter folder or LoRA setting that does not fit the model; shown as one line."""


class UsageError(PolicygradError, ValueError):
    """A wrong command line or argument, or an out/run folder that does not fit."""


class LaunchError(PolicygradError, ValueError):
    """A process count that does not fit the command; shown as one line."""


class LoggingError(PolicygradError, ValueError):
    """A logging back-end asked for but not usable (wandb missing); shown as one line."""


class CheckpointError(PolicygradError, ValueError):
    """A checkpoint that is missing or cannot be read; shown to the user as one line."""


class EnvError(PolicygradError, ValueError):
    """An environment id that Gymnasium cannot make; shown to the user as one line."""


class ModelError(PolicygradError, ValueError):
    """A model path or alias that cannot be loaded; shown to the user as one line."""


class TaskError(PolicygradError, ValueError):
    """A task or data file that cannot be used; shown to the user as one line."""


class EpisodeError(TaskError):
    """A text env that misbehaved (raised, answered with something that is not text, gave a
    non-finite reward); shown as one line naming the env and the turn."""


class RewardError(PolicygradError, ValueError):
    """A reward that cannot be built or that misbehaves; shown to the user as one line."""


class TrainingError(PolicygradError, RuntimeError):
    """Training cannot go on (e.g. updates keep going non-finite); shown to the user as one line."""


class MergeError(PolicygradError, ValueError):
    """The run or --out does not fit a merge; shown to the user as one line."""


class PlotError(PolicygradError, ValueError):
    """A user mistake (bad folder, metric, option); the CLI shows it as one line."""


class RankExit(PolicygradError):
    """A rank other than 0 stops because rank 0 met an error it reports itself."""

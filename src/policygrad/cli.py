"""`policygrad train | eval`: the command line. A mistake a user can make ends in one line,
`policygrad: error: ...`, and exit code 2; it never shows a traceback or touches an existing run."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from . import config as config_mod
from .checkpoint import CheckpointError
from .config import ConfigError
from .control.rollout import EnvError
from .log import format_table

USER_ERRORS = (ConfigError, EnvError, CheckpointError)
RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoints")


class UsageError(ValueError):
    """A wrong command line or an --out/run folder that does not fit."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"policygrad: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="policygrad", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy")
    train.add_argument("--algo", help="reinforce | trpo | ppo")
    train.add_argument("--env", help="Gymnasium environment id, e.g. CartPole-v1")
    train.add_argument("--total-steps", type=int, help="environment steps to train for")
    train.add_argument("--seed", type=int, help="seed of the run")
    train.add_argument("--config", help="YAML file of config keys")
    train.add_argument("--out", required=True, help="run folder to write")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    ev = sub.add_parser("eval", help="evaluate a trained run with deterministic actions")
    ev.add_argument("run", help="run folder written by `policygrad train`")
    ev.add_argument("--episodes", type=int, default=20, help="episodes to run")
    ev.add_argument("--seed", type=int, default=12345, help="seed of the evaluation environments")
    return parser


def prepare_out(out: Path, cfg_dict: dict, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder; with --overwrite, clear only the run's own files."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' is a file, not a folder")
    saved = out / "config.yaml"
    if not saved.exists():
        return
    if not overwrite:
        try:
            same = yaml.safe_load(saved.read_text()) == cfg_dict
        except yaml.YAMLError:
            same = False
        what = "this same run already" if same else "a different run"
        raise UsageError(f"--out '{out}' holds {what}; choose another --out or pass --overwrite")
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train  # heavy imports only once the command line is sound

    file_values = config_mod.load_yaml(args.config) if args.config else {}
    flags = {"algo": args.algo, "env": args.env, "total_steps": args.total_steps, "seed": args.seed}
    cfg = config_mod.resolve(file_values, config_mod.parse_overrides(args.overrides), flags)
    from .control.rollout import make_envs
    make_envs(cfg.env, 1).close()  # an unknown env id fails here, before the run folder is touched
    out = Path(args.out)
    prepare_out(out, config_mod.to_dict(cfg), args.overwrite)
    summary = train(cfg, out, progress=not args.no_progress)
    print(format_table(summary), file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .trainer import evaluate_run

    if args.episodes <= 0:
        raise UsageError(f"--episodes must be positive; got {args.episodes}")
    run = Path(args.run)
    if not run.is_dir():
        raise UsageError(f"run folder '{run}' does not exist")
    path = checkpoint.latest(run)
    if path is None:
        raise CheckpointError(f"run '{run}' has no checkpoint (checkpoints/latest is missing); "
                              "train it first or point at another run")
    result = evaluate_run(path, args.episodes, args.seed)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may stand between options; argparse alone would stop at the first one.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or args.command != "train"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command == "train":
        args.overrides = [*args.overrides, *extra]
    try:
        return {"train": cmd_train, "eval": cmd_eval}[args.command](args)
    except (*USER_ERRORS, UsageError) as e:
        print(f"policygrad: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("policygrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

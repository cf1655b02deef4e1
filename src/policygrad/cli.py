"""`policygrad train | eval | sample | tasks`: the command line. A mistake a user can make ends in
one line, `policygrad: error: ...`, and exit code 2; it never shows a traceback or touches an
existing run."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import __version__, api, checkpoint, dist, launch, merging, pipeline, resolve, runs
from . import config as config_mod
from .errors import PolicygradError, RankExit, TrainingError, UsageError
from .launch import without_nproc
from .lm.rewards import BUILTIN
from .lm.tasks import BUILTINS
from .log import format_table


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"policygrad: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="policygrad", description=(
        "Train policies with REINFORCE, TRPO or PPO on Gymnasium environments and on text tasks "
        "for language models; evaluate, sample from and plot the runs."))
    parser.add_argument("--version", action="version", version=f"policygrad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy on a Gymnasium env or a text task")
    train.add_argument("--algo", help="reinforce | trpo | ppo")
    train.add_argument("--recipe", help="language models: a published recipe's keys as a preset, "
                       f"overridable: {' | '.join(config_mod.CHOICES['recipe'][1:])} (docs/recipes.md)")
    train.add_argument("--env", help="Gymnasium environment id, e.g. CartPole-v1")
    train.add_argument("--task", help="text task: a built-in name (see `policygrad tasks`) or a task YAML")
    train.add_argument("--model", help="language model: a local Hugging Face folder or smollm2-135m")
    train.add_argument("--total-steps", *(f"--{a}" for a, k in config_mod.ALIASES.items() if k == "total_steps"),
                       dest="total_steps", type=int,
                       help="environment steps (control) or training steps (language models)")
    train.add_argument("--seed", type=int, help="seed of the run")
    train.add_argument("--config", help="YAML file of config keys")
    train.add_argument("--out", help="run folder to write; the same command again resumes it")
    train.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its newest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--wandb", action="store_true", default=None,
                       help="also log to Weights & Biases (offline unless WANDB_MODE is set)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train as N processes on this machine (torch.distributed; the same as "
                            "`torchrun --nproc-per-node N -m policygrad train ...`)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    ev = sub.add_parser("eval", help="evaluate a trained run, or an untrained model on a task")
    ev.add_argument("run", nargs="?", help="run folder written by `policygrad train`")
    ev.add_argument("--checkpoint", default="latest",
                    help="which checkpoint: latest, best (by validation result) or a name like update-000040")
    ev.add_argument("--episodes", type=int, default=20, help="control: episodes to run")
    ev.add_argument("--seed", type=int, default=12345, help="control: seed of the evaluation envs")
    ev.add_argument("--split", default="test", choices=("validation", "test"), help="text tasks: split")
    ev.add_argument("--model", help="without a run: the model to evaluate (the untrained baseline)")
    ev.add_argument("--task", help="without a run: the task to evaluate on")
    ev.add_argument("--vs-base", action="store_true",
                    help="text tasks: also evaluate the untrained model; print both and before/after samples")
    ev.add_argument("--device", help="language models: where to evaluate (default: the run's device key, auto)")
    sample = sub.add_parser("sample", help="sample completions from a trained language-model run")
    sample.add_argument("run", help="run folder of a language-model run")
    sample.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    sample.add_argument("--env-seed", type=int, action="append",
                        help="a multi-turn run: play an episode from this env seed (repeatable)")
    sample.add_argument("-n", type=int, default=1, help="completions per prompt")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--temperature", type=float, help="sampling temperature (default: the run's)")
    sample.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default: the run's, 1.0)")
    sample.add_argument("--top-k", type=int, help="sample among the k most likely tokens; 0: all (default: the run's)")
    sample.add_argument("--device", help="where to sample (default: the run's device key, auto)")
    sample.add_argument("--model-defaults", action="store_true",
                        help="also apply the model's own generation_config processors (repetition_penalty, "
                             "...), which training and evaluation never use")
    merge = sub.add_parser("merge", help="write a language-model run's model (LoRA adapter merged in) as a "
                                         "plain transformers folder")
    merge.add_argument("run", help="run folder of a language-model run")
    merge.add_argument("--out", required=True, help="new folder to write")
    merge.add_argument("--checkpoint", default="latest", help="latest, best or a name like update-000040")
    merge.add_argument("--dtype", default="float32", choices=tuple(merging.DTYPES),
                       help="weights' dtype (default float32: a small update to bfloat16 weights rounds "
                            "away); base: the base model's own; warns when over 1%% of the update is lost")
    rm = sub.add_parser("rm", help="train a reward model on preference pairs (Bradley-Terry); a reward as "
                                   "rm:OUT/reward-model")
    rm.add_argument("--data", required=True, help="pairs file (JSONL, CSV or Parquet): prompt, chosen, rejected[, margin]")
    rm.add_argument("--model", default="smollm2-135m", help="base model: a local Hugging Face folder or smollm2-135m")
    rm.add_argument("--out", required=True, help="run folder; the same command again resumes it")
    rm.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    rm.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    rm.add_argument("overrides", nargs="*", metavar="key=value",
                    help="epochs, batch_size, lr, max_grad_norm, max_length, seed, checkpoint_every, device")
    sft = sub.add_parser("sft", help="supervised fine-tuning on prompt/completion, chat or text rows, or best-of-N "
                                     "on a task's prompts; the model is written to OUT/model")
    sft.add_argument("--data", help="rows file (JSONL, CSV or Parquet): prompt and completion, messages, or text")
    sft.add_argument("--model", help="model to fine-tune: a local Hugging Face folder or smollm2-135m (the default)")
    sft.add_argument("--task", help="best-of-N: the task whose training prompts are sampled and reward ranks them")
    sft.add_argument("--best-of", type=int, default=0, metavar="N",
                     help="best-of-N: N completions per training prompt, the best by the task's reward learnt")
    sft.add_argument("--from-run", metavar="RUN", help="start from a trained run's model (and take its task)")
    sft.add_argument("--out", required=True, help="run folder; the same command again resumes it")
    sft.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    sft.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sft.add_argument("overrides", nargs="*", metavar="key=value",
                     help="epochs, batch_size, micro_batch_size, lr, max_length, seed, lora_r, lora_alpha, "
                          "device, dtype, ...")
    pairs = sub.add_parser("pairs", help="preference pairs from a task with a rule reward, for `policygrad rm`")
    pairs.add_argument("--task", required=True, help="a built-in task or a task YAML")
    pairs.add_argument("--model", default="smollm2-135m", help="the model that samples the completions")
    pairs.add_argument("--samples", type=int, default=4, help="completions per prompt")
    pairs.add_argument("--min-gap", type=float, default=0.3, help="least reward difference of a kept pair")
    pairs.add_argument("--split", default="train", help="the task's split whose prompts are used")
    pairs.add_argument("--out", required=True, help="pairs file to write (JSONL)")
    pairs.add_argument("overrides", nargs="*", metavar="key=value", help="config keys (seed, max_new_tokens, ...)")
    sub.add_parser("tasks", help="list the built-in text tasks and rewards")
    plot = sub.add_parser("plot", help="learning curves of one or more runs (seeds of a run: mean and min-max band)")
    plot.add_argument("runs", nargs="+", help="run folders")
    plot.add_argument("--metric", default=None, action="append",
                      help="metric to plot; repeat it for several in one figure (default: eval/reward_mean for "
                           "text tasks, eval/return_mean for control)")
    plot.add_argument("--out", default="curves.png", help="image to write (.png, .pdf, .svg, .jpg)")
    plot.add_argument("--smooth", type=float, default=0.6, help="exponential smoothing weight in [0, 1)")
    plot.add_argument("--x", default=None, help="x-axis key (default: step for text tasks, env_steps for control)")
    serve = sub.add_parser("serve-reward", help="serve a task's or a reward's scores over HTTP (loopback by default)")
    serve.add_argument("--task", help="serve this task's rewards (a built-in name or a task YAML)")
    serve.add_argument("--reward", action="append", help="serve this reward (a built-in name or python:file.py:fn); repeatable")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--reward-timeout", type=float, default=30.0, help="seconds a reward may take per request")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    flags = {"algo": args.algo, "recipe": args.recipe, "env": args.env, "task": args.task, "model": args.model,
             "total_steps": args.total_steps, "seed": args.seed, "wandb": args.wandb}
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        given += ["--config"] * bool(args.config) + ["--out"] * bool(args.out) + args.overrides
        if given:
            raise UsageError(f"--resume continues a run with its own config.yaml; drop {' '.join(given)}")
        out = Path(args.resume)
        cfg = config_mod.validate(config_mod.apply(config_mod.Config(), runs.saved_config(out)))
    else:
        if not args.out:
            raise UsageError("train needs --out (a run folder), or --resume RUN")
        file_values = resolve.load_yaml(args.config) if args.config else {}
        overrides = resolve.parse_overrides(args.overrides)
        runs.check_run_named({**file_values, **overrides, **{k: v for k, v in flags.items() if v is not None}})
        cfg = resolve.resolve(file_values, overrides, flags)
        out = Path(args.out)
    world = launch.check_processes(args.nproc, cfg, dist.launched().world)
    if args.nproc is not None and args.nproc > 1:  # this process launches the ranks
        runs.preflight(cfg)
        launch.check_resume_world(out, cfg, args.overwrite, world)
        return launch.spawn(args.argv_without_nproc, args.nproc)
    result = api.train(cfg, out=out, overwrite=args.overwrite, progress=not args.no_progress)
    if dist.launched().rank == 0:
        print(f"policygrad: the run in '{out}' is already complete; nothing to do (--overwrite trains it again)"
              if result.was_complete else format_table(result.summary), file=sys.stderr)
    return 0


def print_result(result: dict) -> None:
    """A human table, then one JSON line last (for scripts)."""
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(json.dumps(result))


def cmd_eval(args: argparse.Namespace) -> int:
    if args.run is None:
        if not args.task:
            raise UsageError("eval needs a run folder, or --task (and --model) to evaluate an untrained model")
        if args.vs_base:
            raise UsageError("--vs-base compares a trained run with its base model: give the run folder")
        result = api.evaluate(task=args.task, model=args.model, split=args.split, device=args.device)
        model = resolve.resolve({}, {}, {"task": args.task, "model": args.model}).model
        print_result({"model": model, "task": args.task, **result.as_dict()})
        return 0
    given = [flag for flag, value in (("--task", args.task), ("--model", args.model)) if value is not None]
    if given:
        raise UsageError(f"eval RUN evaluates the run's own model on its own task; {' and '.join(given)} "
                         "are for an untrained model without a run: drop the run or "
                         f"{' and '.join(given)}")
    path = checkpoint.named(Path(args.run), args.checkpoint) if Path(args.run).is_dir() else Path(args.run)
    result = api.evaluate(args.run, split=args.split, checkpoint=args.checkpoint, episodes=args.episodes,
                          seed=args.seed, device=args.device)
    if args.vs_base and isinstance(result, api.LMEvaluation):
        base = api.evaluate(args.run, split=args.split, checkpoint=args.checkpoint, device=args.device, base=True)
        print_vs_base(base, result, path.name)
        return 0
    shown = result.as_dict()
    if isinstance(result, api.ControlEvaluation):
        shown = {"env": shown.pop("env"), "algo": checkpoint.load_state(path)["config"]["algo"], **shown}
    print_result({"checkpoint": path.name, **shown})
    return 0


def print_vs_base(base, trained, checkpoint_name: str) -> None:
    """The trained policy beside the model it started from, on the same prompts and seeds."""
    print(f"{'':<16}{'base':>10}{'trained':>10}")
    for key in ("mean_reward", "std_reward", "kl_to_reference"):
        print(f"{key:<16}{getattr(base, key):>10.3f}{getattr(trained, key):>10.3f}")
    for key in trained.episode:  # a multi-turn task's return, turns and success rate
        print(f"{key:<16}{base.episode.get(key, float('nan')):>10.3f}{trained.episode[key]:>10.3f}")
    for before, after in list(zip(base.samples, trained.samples))[:3]:
        print(f"\nprompt:  {before['prompt']}\nbefore:  ({before['reward']:+.2f}) {before['completion']}"
              f"\nafter:   ({after['reward']:+.2f}) {after['completion']}")
    print(json.dumps({"checkpoint": checkpoint_name, "split": trained.split, "n": trained.n,
                      "base_mean_reward": base.mean_reward, "mean_reward": trained.mean_reward,
                      "std_reward": trained.std_reward, "kl_to_reference": trained.kl_to_reference,
                      **({"base_episode": base.episode, "episode": trained.episode} if trained.episode else {})}))


def cmd_sample(args: argparse.Namespace) -> int:
    for s in api.sample(args.run, args.prompt, n=args.n, seed=args.seed, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, device=args.device, env_seeds=args.env_seed,
                        model_defaults=args.model_defaults):
        shown = {"prompt": s.prompt, "completion": s.completion}
        if s.conversation is not None:
            shown = {"conversation": s.conversation, "rewards": s.rewards}
        print(json.dumps(shown, ensure_ascii=False))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", merging.MergeWarning)
        out = api.merge(args.run, args.out, args.checkpoint, args.dtype)
    for w in caught:
        if issubclass(w.category, merging.MergeWarning):
            print(f"policygrad: warning: {w.message}", file=sys.stderr)
        else:  # someone else's warning: shown as Python would have shown it
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(json.dumps({"merged": str(out), "run": str(args.run), "checkpoint": args.checkpoint,
                      "dtype": args.dtype}))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    summary = pipeline.reward_model(args.data, out=args.out, model=args.model, overwrite=args.overwrite,
                                    progress=not args.no_progress, **resolve.parse_overrides(args.overrides))
    print(format_table(summary), file=sys.stderr)
    print(json.dumps(summary))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    summary = pipeline.sft(args.data, out=args.out, model=args.model, task=args.task,
                           best_of=args.best_of, from_run=args.from_run, overwrite=args.overwrite,
                           progress=not args.no_progress, **resolve.parse_overrides(args.overrides))
    print(format_table(summary), file=sys.stderr)
    print(json.dumps(summary))
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    print(json.dumps(pipeline.pairs(args.task, args.out, model=args.model, samples=args.samples, min_gap=args.min_gap,
                               split=args.split, **resolve.parse_overrides(args.overrides))))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:

    print("built-in tasks:")
    for name, text in BUILTINS.items():
        print(f"  {name:<22} {text}")
    print("a text env: module:Class (a gymnasium.Env whose observations and actions are text)")
    print("from the ecosystem (the tasks extra): reasoning-gym:GENERATOR[+GENERATOR...], textarena:GAME "
          "(docs/ecosystem.md)")
    print("rewards: " + ", ".join(BUILTIN) + ", python:path/to/file.py:function, http://host:port/path, "
          "rm:MODEL_FOLDER[#LABEL]")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    summary = api.plot(args.runs, args.metric, args.out, args.smooth, args.x)
    for run in summary.get("skipped", []):
        what = f" has no '{summary['metric']}'" if isinstance(summary["metric"], str) else " lacks that metric"
        print(f"policygrad: note: run '{run}'{what}; left out of the plot", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    api.serve_reward(args.task, args.reward, args.host, args.port, args.reward_timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may stand between options; argparse alone would stop at the first one.
    args, extra = parser.parse_known_args(argv)
    takes_keys = args.command in ("train", "rm", "pairs")
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not takes_keys]
    if stray and takes_keys and not stray[0].startswith("-"):
        parser.error(f"config overrides are key=value; got '{stray[0]}'")
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if takes_keys:
        args.overrides = [*args.overrides, *extra]
    if args.command == "train":
        args.argv_without_nproc = without_nproc(list(sys.argv[1:] if argv is None else argv))
    commands = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "tasks": cmd_tasks,
                "plot": cmd_plot, "serve-reward": cmd_serve_reward, "merge": cmd_merge, "rm": cmd_rm, "sft": cmd_sft,
                "pairs": cmd_pairs}
    rank = dist.launched().rank
    try:
        return commands[args.command](args)
    except RankExit:  # rank 0 reports the error
        return 2
    except PolicygradError as e:
        # a collective decision to stop is every rank's alike: rank 0 says it; any other error may
        # be this rank's own (a reward that raises, a GPU it lacks), so it says it with its rank
        if rank == 0 or not isinstance(e, TrainingError):
            print(f"policygrad: error: {'' if rank == 0 else f'rank {rank}: '}{e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not (dist.launched().world > 1 and dist.peer_lost(e)):
            raise
        print(f"policygrad: error: rank {rank}: another process stopped or stalled while this one waited "
              f"for it ({e.__class__.__name__}); its own error is above", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("policygrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

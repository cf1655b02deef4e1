"""Language-model rollouts: LMWorkload walks the prompts, samples completions (or, for a text env's
task, plays episodes through lm/episodes.py), scores them through lm/scoring.py, evaluates on the
held-out splits, hands the update its data loss and says what a checkpoint holds.

A completion ends at EOS or at max_new_tokens, either way without bootstrapping; one the limit cut
is marked (Batch.length_truncated) for DAPO's overlong filtering, and its length may cost reward
(overlong_buffer: DAPO's soft punishment, a training shaping that evaluation never adds).
"""
from __future__ import annotations

import json

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import config as config_mod
from .. import dist
from .. import placement as placement_mod
from ..batch import Batch, DataTerm
from ..log import write_samples
from . import dynamic, episodes, supervised, tasks
from .policy import build_policy, policy_files, write_policy_config
from .scoring import (NoSignalWatch, Scoring, kl_per_completion, last_tokens, length_truncated, no_signal,
                      overlong_penalty, values_of)
from .tasks import prompt_text


class PromptCursor:
    """Walks the training prompts in a fresh seeded order each epoch; its position is saved with
    checkpoints so a resumed run sees the same prompts."""

    def __init__(self, n_rows: int, seed: int, epoch: int = 0, position: int = 0):
        self.n_rows, self.seed, self.epoch, self.position = n_rows, seed, epoch, position
        self._order = self._shuffle()

    def _shuffle(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position == self.n_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(int(self._order[self.position]))
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def extras_of(rows: list[dict]) -> dict[str, list]:
    """The rows' columns other than the prompt, as keyword lists for the rewards."""
    keys = sorted({k for r in rows for k in r} - {"prompt", "messages"})
    return {k: [r.get(k) for r in rows] for k in keys}


class LMWorkload:
    headline = "train/reward_mean"
    eval_headline = "eval/reward_mean"
    one_thread = False
    per_update = 1  # total_steps and eval_every count training steps

    def __init__(self, cfg, seed: int, model_path: Optional[Path] = None):
        """seed: of the weights' initialisation and the prompt order, the same on every rank;
        sampling draws from this rank's own stream (dist.rank_seed). Over several ranks (dist.py)
        this one takes its block of each step's prompts."""
        self.cfg, self.init_seed, self.seed = cfg, seed, dist.rank_seed(seed, dist.rank())
        self.task = tasks.load(cfg.task, set(config_mod.field_names()))
        if self.task.env is not None:  # before minutes of model loading
            episodes.refuse_overlong_keys(cfg, self.task.name)
        if cfg.dynamic_sampling and self.task.env is not None:
            # an episode batch has its own layout (turns, bootstraps): lm/dynamic.py lays out completions
            preset = f" (recipe={cfg.recipe})" if cfg.recipe != "none" else ""
            raise tasks.TaskError(f"dynamic_sampling=true{preset} drops prompt groups of single completions; task "
                                  f"'{cfg.task}' is a multi-turn text env, which it does not support: set "
                                  "dynamic_sampling=false")
        self.placement = placement_mod.resolve(cfg)
        self.task.rewards.configure(timeout=cfg.reward_timeout, retries=cfg.reward_retries,
                                    device=self.placement.device, normalize=cfg.reward_normalize)
        self.policy, self.adapted = build_policy(cfg, self.placement, seed, model_path)
        if cfg.double_backward:
            # torch's fused CPU attention kernels have neither a double backward (fvp=exact) nor a
            # forward-mode derivative (fvp=gauss_newton); the eager path has both
            self.policy.model.set_attn_implementation("eager")
        self.cursor = PromptCursor(len(self.task.rows("train")), seed)
        # the data loss's rows load at the first update (evaluating or sampling a run never reads
        # them); a resumed run's position waits there too
        self.ptx: Optional[list[supervised.Example]] = None
        self.ptx_cursor: Optional[PromptCursor] = None
        self._ptx_position = {"epoch": 0, "position": 0}
        self.scoring = Scoring(cfg)
        self.signal_watch, self._warnings = NoSignalWatch(samples_per_prompt=cfg.samples_per_prompt), []
        self.sample_times: dict[str, float] = {}
        # a text env's task (multi-turn) collects and evaluates episodes; the rest is shared
        self.episodes = episodes.EpisodeCollector(self.policy, self.task, cfg, self.placement, self.scoring) \
            if self.task.env is not None else None

    # --- rollouts ---
    def sample(self, rows: list[dict], n: int, seed: int, reference: bool = True
               ) -> tuple[Batch, list[str], np.ndarray]:
        """n completions per row: the batch (with ref log-probs unless reference=False: a caller
        that only reads completions and rewards skips that pass), completions and task rewards."""
        if self.episodes is not None:
            raise tasks.TaskError(f"task '{self.cfg.task}' is a multi-turn text env: single completions of its "
                                  "prompts (pairs, best-of) are not defined for it")
        texts = [self.policy.render(r) for r in rows for _ in range(n)]
        self._check_context(texts)
        with self.policy.gathered():
            return self._sample(texts, rows, n, seed, reference)

    def _sample(self, texts: list[str], rows: list[dict], n: int, seed: int, reference: bool = True
                ) -> tuple[Batch, list[str], np.ndarray]:
        start = time.perf_counter()
        batch = self.policy.generate(texts, self.cfg, seed, samples_per_prompt=n)
        generated = time.perf_counter()
        completions = self.policy.decode(batch.actions, batch.mask)
        expanded = [r for r in rows for _ in range(n)]
        rewards = self.task.rewards([prompt_text(r) for r in expanded], completions, extras_of(expanded))
        self.reward_parts = dict(self.task.rewards.parts)  # each reward's own values (several rewards)
        scored = time.perf_counter()
        ref = self.policy.reference_log_prob(batch) if reference and self.policy.reference is not None \
            else batch.log_prob
        # each phase on its own: sampling (under autocast with the old log-probs' pass), rewards, reference
        self.sample_times = {"time/generate_s": generated - start, "time/reward_s": scored - generated,
                             "time/reference_s": time.perf_counter() - scored}
        return batch.replace(ref_log_prob=ref), completions, rewards

    def _check_context(self, texts: list[str]) -> None:
        """Before generating: a prompt plus max_new_tokens must fit the model's context."""
        limit = getattr(self.policy.model.config, "max_position_embeddings", None)
        if limit is None:
            return
        encoded = self.policy.tokenizer(texts, add_special_tokens=self.policy.add_special_tokens)["input_ids"]
        longest = max(len(ids) for ids in encoded)
        if longest + self.cfg.max_new_tokens > limit:
            raise tasks.TaskError(f"a prompt of {longest} tokens plus max_new_tokens={self.cfg.max_new_tokens} "
                                  f"is longer than the model's context of {limit}; shorten the prompts or "
                                  "max_new_tokens")

    def collect(self) -> tuple[Batch, dict]:
        """This rank's block of the step's prompts, sampled and scored; the statistics (reward
        whitening, metrics, the KL controller's and moving baseline's inputs) are the global
        batch's, computed from every rank's rows exactly as one process computes them. With
        dynamic_sampling, the step's kept groups (lm/dynamic.py): no rows when it kept none."""
        start = time.perf_counter()
        seed = self.scoring.step_seed(self.seed)
        if self.episodes is not None:
            batch, metrics = self.episodes.collect(self._next_rows(), seed)
        elif self.cfg.dynamic_sampling:
            batch, metrics = self._collect_dynamic(seed)
        else:
            batch, metrics = self._collect(self._next_rows(), seed)
        return batch, {**metrics, "time/collect_s": time.perf_counter() - start}

    def _next_rows(self) -> list[dict]:
        """This rank's block of the next prompts_per_step prompts (the same ids on every rank)."""
        row_ids = self.cursor.take(self.cfg.prompts_per_step)
        lo, hi = dist.share(self.cfg.prompts_per_step)
        return [self.task.rows("train")[i] for i in row_ids[lo:hi]]

    def _collect(self, rows: list[dict], seed: int) -> tuple[Batch, dict]:
        """Single completions: samples_per_prompt per row, the task score (plus the overlong
        punishment) on each one's last token."""
        k = self.cfg.samples_per_prompt
        batch, _, task_reward = self.sample(rows, k, seed=seed)
        all_reward = dist.gather_rows(np.asarray(task_reward, dtype=np.float64))  # (B_global,)
        parts = {name: dist.gather_rows(values) for name, values in self.reward_parts.items()}
        return self._score(batch, task_reward, all_reward, parts, len(rows))

    def _collect_dynamic(self, seed: int) -> tuple[Batch, dict]:
        """DAPO's dynamic sampling (lm/dynamic.py): rounds of fresh prompts, each with its own seed,
        until prompts_per_step groups whose task rewards spread are kept or max_draws rounds were
        drawn; the reference pass runs on the kept rows alone. Metrics: train/reward_* of the
        trained batch, train/sampled_reward_mean of every completion sampled, the rounds' counts,
        and train/flat_group_share of the groups sampled (the dropped ones' share)."""
        cfg, times = self.cfg, {"time/generate_s": 0.0, "time/reward_s": 0.0}

        def sample_round(i: int) -> tuple[Batch, np.ndarray, dict[str, np.ndarray]]:
            batch, _, task_reward = self.sample(self._next_rows(), cfg.samples_per_prompt,
                                                seed=dynamic.round_seed(seed, i), reference=False)
            for key in times:
                times[key] += self.sample_times[key]
            return batch.replace(ref_log_prob=None), task_reward, dict(self.reward_parts)
        drawn = dynamic.draw(sample_round, cfg.samples_per_prompt, cfg.prompts_per_step, cfg.max_draws)
        kept = dynamic.assemble(drawn, cfg.prompts_per_step, self.policy.tokenizer.pad_token_id)
        self._warnings.extend(filter(None, [self.signal_watch.add(kept.flat_share[0])]))
        sampled = {**kept.metrics, "train/flat_group_share": kept.flat_share[0], "train/flat_batch": kept.flat_share[1]}
        if not len(kept.real):  # nothing to learn from: the trainer takes no update
            return kept.batch, sampled
        start = time.perf_counter()
        with self.policy.gathered():
            ref = self.policy.reference_log_prob(kept.batch) if self.policy.reference is not None \
                else kept.batch.log_prob
        self.sample_times = {**times, "time/reference_s": time.perf_counter() - start}
        batch, metrics = self._score(kept.batch.replace(ref_log_prob=ref), kept.task_reward, kept.all_reward,
                                     kept.parts, cfg.prompts_per_step // dist.world(), kept.real)
        return batch, {**metrics, **sampled}

    def _score(self, batch: Batch, task_reward: np.ndarray, all_reward: np.ndarray, parts: dict[str, np.ndarray],
               prompts: int, real: Optional[np.ndarray] = None) -> tuple[Batch, dict]:
        """The batch the update learns from and the step's metrics: this rank's rows and their task
        rewards, every rank's task rewards and reward parts (B_global,), the rank's prompt groups;
        real (B,): False on dynamic sampling's padding rows, which get no reward and count in no
        statistic (None: every row is real)."""
        cfg = self.cfg
        B, T = batch.mask.shape
        device = batch.mask.device
        weight = torch.ones(B, device=device) if real is None else \
            torch.as_tensor(real, dtype=torch.float32, device=device)             # (B,) 0 on padding
        last = last_tokens(batch.mask)                                            # (B,)
        lengths = batch.mask.sum(1)                                               # (B,)
        cut = length_truncated(batch.actions, batch.mask, self.policy.eos_ids, cfg.max_new_tokens)  # (B,)
        # DAPO's soft overlong punishment joins the task reward before any baseline or whitening
        # sees it: what a group compares is the shaped reward
        overlong = overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)  # (B,)
        shaped = np.asarray(task_reward, dtype=np.float64) + overlong.cpu().numpy()  # (B,)
        score = torch.as_tensor(shaped, dtype=torch.float32, device=device)       # (B,)
        every_shaped = dist.gather_rows(np.stack([shaped, weight.cpu().numpy()], 1))  # (B_global, 2)
        all_shaped = every_shaped[every_shaped[:, 1] > 0, 0]                      # the real rows'
        if cfg.whiten_rewards:
            pooled = torch.as_tensor(all_shaped, dtype=torch.float32, device=device)  # (B_global,)
            score = (score - pooled.mean()) / (pooled.std() + 1e-8)
        rewards = torch.zeros_like(batch.mask)                                   # (B, T)
        rewards[torch.arange(B, device=device), last] = score * weight
        terminated = torch.zeros_like(batch.mask)                                # (B, T)
        terminated[torch.arange(B, device=device), last] = weight
        values, next_values = values_of(self.policy, batch)
        batch = self.scoring.finish(batch, rewards, values, next_values, prompts, terminated=terminated,
                                    length_truncated=cut)
        per_row = torch.stack([(batch.rewards * batch.mask).sum(1), kl_per_completion(batch), lengths, cut,
                               overlong, weight], 1)                              # (B, 6)
        every = torch.from_numpy(dist.gather_rows(per_row.float().cpu().numpy()))  # (B_global, 6)
        every = every[every[:, 5] > 0]                                             # the real rows
        scores, kls, lengths, cuts, overlongs = every[:, :5].unbind(1)             # (B_global,) each
        self.scoring.record(scores, kls)
        shown = {f"train/reward/{name}": float(values.mean()) for name, values in parts.items()}
        if cfg.overlong_buffer:  # the shaping's mean, beside the task's reward (<= 0)
            shown["train/reward/overlong"] = float(overlongs.mean())
        if real is None:  # dynamic sampling measures the groups it sampled, kept or dropped, itself
            flat_groups, flat_batch = no_signal(all_shaped, cfg.samples_per_prompt)
            self._warnings.extend(filter(None, [self.signal_watch.add(flat_groups)]))
            shown.update({"train/flat_group_share": flat_groups, "train/flat_batch": flat_batch})
        return batch, {
            "train/reward_mean": float(all_reward.mean()), "train/reward_std": float(all_reward.std()),
            **shown, "train/truncated_share": float(cuts.mean()),
            **self.scoring.metrics(kls, lengths, self.sample_times)}

    # --- the data loss (J_data) ---
    def _ptx_examples(self) -> list[supervised.Example]:
        rows = tasks.rows_of(self.cfg.ptx_data, "ptx_data", supervised.check_row)
        return supervised.encode_rows(rows, self.policy.tokenizer, supervised.eos_of(self.policy),
                                      self.cfg.ptx_max_length, f"ptx_data '{self.cfg.ptx_data}'")

    def data_term(self) -> Optional[DataTerm]:
        """This update's data loss (ptx_coef > 0): the next ptx_batch_size rows of the data's
        shuffled order (the same on every rank), this rank's every world-th of them, in
        micro-batches of micro_batch_size rows (as many on every rank when the weights are sharded)."""
        cfg = self.cfg
        if cfg.ptx_coef == 0:
            return None
        if self.ptx is None:
            self.ptx = self._ptx_examples()
            self.ptx_cursor = PromptCursor(len(self.ptx), self.init_seed, int(self._ptx_position["epoch"]),
                                           int(self._ptx_position["position"]))
        examples = [self.ptx[i] for i in self.ptx_cursor.take(cfg.ptx_batch_size)]
        mine = examples[dist.rank()::dist.world()] or examples[:1]
        size = cfg.micro_batch_size or len(mine)
        pad, device = self.policy.tokenizer.pad_token_id, self.placement.device
        micros = [supervised.collate(mine[s:s + size], pad, device) for s in range(0, len(mine), size)]
        if not examples[dist.rank()::dist.world()]:  # more ranks than rows: this one's pass weighs nothing
            micros = [m.stand_in() for m in micros]
        if self.policy.sharded:
            micros += [micros[0].stand_in()] * (dist.most(len(micros)) - len(micros))
        tokens = float(sum(sum(e.loss) for e in examples))
        return DataTerm(cfg.ptx_coef, micros, tokens, lambda b: supervised.nll_sum(self.policy, b))

    def after_update(self, batch: Batch, metrics: dict) -> dict:
        self.scoring.after_update()
        return {}

    def stop_early(self) -> bool:
        return False

    def take_warnings(self) -> list[str]:
        """Warnings for the user raised since the last call (the trainer prints each as one line)."""
        out, self._warnings = self._warnings, []
        return out

    # --- evaluation ---
    def evaluate(self, split: str, out_dir: Optional[Path] = None) -> dict:
        """One sampled completion per held-out prompt (a fixed seed per chunk of prompts):
        reward, KL to the reference. Over several ranks each samples every world-th chunk, with
        that chunk's own seed, and all ranks get every result: the numbers are a single process's."""
        if self.episodes is not None:
            return self.episodes.evaluate(split, out_dir)
        rows = self.task.rows(split)
        if split == "validation":
            rows = rows[:self.cfg.eval_prompts]
        size = self.cfg.completions_per_step
        mine = []
        with self.policy.gathered():  # sharded weights: ranks then sample different chunk counts
            for start in range(0, len(rows), size)[dist.rank()::dist.world()]:
                chunk = rows[start:start + size]
                batch, completions, reward = self.sample(chunk, 1, seed=10_000_019 + start)
                mine.append((start, reward.tolist(), kl_per_completion(batch).tolist(),
                             [{"prompt": prompt_text(r), "completion": c, "reward": float(x)}
                              for r, c, x in zip(chunk, completions, reward)],
                             {name: v.tolist() for name, v in self.reward_parts.items()}))
        chunks = sorted((c for part in dist.gather_objects(mine) for c in part), key=lambda c: c[0])
        rewards = [x for c in chunks for x in c[1]]
        kls = [x for c in chunks for x in c[2]]
        samples = [x for c in chunks for x in c[3]]
        parts = {name: [x for c in chunks for x in c[4][name]] for name in (chunks[0][4] if chunks else {})}
        if out_dir is not None and dist.is_main():
            write_samples(out_dir, f"{split}-step{self.scoring.steps:05d}", samples)
        prefix = "eval" if split == "validation" else split
        return {f"{prefix}/reward_mean": float(np.mean(rewards)), f"{prefix}/reward_std": float(np.std(rewards)),
                f"{prefix}/kl_to_reference": float(np.mean(kls)), f"{prefix}/n": len(rewards),
                **{f"{prefix}/reward/{name}": float(np.mean(v)) for name, v in parts.items()},
                **({"samples": samples} if out_dir is None else {})}

    # --- what a checkpoint holds ---
    def tensors(self) -> dict[str, torch.Tensor]:
        head = self.policy.value_head
        return {} if head is None else {f"value_head.{k}": v.detach().clone() for k, v in head.state_dict().items()}

    @property
    def trained_on(self) -> dict[str, str]:
        return {"task": self.cfg.task}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        # the tensors hold the value head alone: the model's weights come from model_path's files
        self.policy.load_state_dict(tensors, strict=False)

    def model_files(self) -> dict[str, dict[str, torch.Tensor]]:
        return policy_files(self.policy, self.adapted)

    def write_model_config(self, folder: Path) -> None:
        write_policy_config(self.policy, self.adapted, self.cfg.model, folder)
        if self.task.info:  # a generated task: what its rows derive from (generators, split seeds)
            (folder / "task.json").write_text(json.dumps(self.task.info, indent=1, sort_keys=True, default=repr))

    def state(self) -> dict:
        """JSON: the data cursor, KL controller, moving baseline, step count (the generation seeds
        derive from it) and the no-signal window, so a resumed run samples exactly what the
        uninterrupted one would and warns no second time."""
        return {"cursor": self.cursor.state(), **self.scoring.state(), "flat_recent": self.signal_watch.recent, "flat_warned": self.signal_watch.warned,
                **({"ptx_cursor": self.ptx_cursor.state() if self.ptx_cursor else self._ptx_position}
                   if self.cfg.ptx_coef > 0 else {})}

    def load_state(self, state: dict, update: int) -> None:
        cursor = state["cursor"]
        self.cursor = PromptCursor(self.cursor.n_rows, self.init_seed, int(cursor["epoch"]), int(cursor["position"]))
        self.scoring.load_state(state)
        self.signal_watch.recent = [float(x) for x in state.get("flat_recent", [])]  # older runs lack it
        self.signal_watch.warned = bool(state.get("flat_warned", False))
        if "ptx_cursor" in state:
            self._ptx_position = dict(state["ptx_cursor"])
            self.ptx = self.ptx_cursor = None  # reloaded at the next update, from that position



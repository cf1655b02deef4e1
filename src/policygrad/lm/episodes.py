"""Multi-turn episodes: the model replies, a text Gymnasium env answers, the model replies again.

The protocol is Gymnasium's: `reset(seed=...) -> (observation, info)` gives the first user message
(or a list of chat messages), `step(reply) -> (observation, reward, terminated, truncated, info)`
takes the model's reply and gives the next user message and the turn's reward.

An episode is kept as token ids. The ids the model sampled stay exactly as sampled; only the
environment's text is tokenised (with the chat template's turn markers around it) and appended, so
what is trained on is what was sampled: re-tokenising a decoded conversation would silently change
ids (and masks) at turn boundaries.

Batch layout (one row per episode): obs = the first prompt (left-padded) then every token after it;
actions (B, T) = the tokens after the first prompt, the model's and the environment's; mask = 1 on
the model's tokens only (environment tokens carry no loss, KL or entropy); turn (B, T) = the turn
index; each turn's reward sits on the turn's last model token.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch

from .. import dist
from ..batch import Batch
from ..errors import ConfigError, EpisodeError, TaskError
from ..log import write_samples
from . import tools
from .scoring import kl_per_completion, values_of

REPLY_MARKER = "@@policygrad-reply@@"
"""Stands in for the model's reply when the chat template renders the environment's answer: the
text after it is what the template writes between a reply and the next one."""


@dataclass
class Episode:
    """One conversation, as token ids from its first prompt on."""
    seed: int
    prompt_ids: list[int]
    messages: list[dict]
    """The conversation as text (the first messages, then each reply and answer): for display."""
    ids: list[int] = field(default_factory=list)
    """Every token after the first prompt: the model's and the environment's."""
    model: list[int] = field(default_factory=list)
    """1 on the model's tokens, 0 on the environment's."""
    turn: list[int] = field(default_factory=list)
    log_prob: list[float] = field(default_factory=list)
    """The sampled tokens' log-probabilities (0 on environment tokens)."""
    rewards: list[float] = field(default_factory=list)
    """One per turn."""
    ends: list[int] = field(default_factory=list)
    """Position in ids of each turn's last model token."""
    terminated: bool = False
    truncated: bool = False
    success: Optional[bool] = None
    done: bool = False
    invalid_moves: Optional[int] = None
    """Turns the env flagged as an invalid move (info["invalid_move"]); None: it never says."""
    tool_calls: Optional[int] = None
    """Replies that called a tool (None: the env offers none); such a turn earns 0 and the env is
    not stepped: the tools answer."""
    bad_tool_calls: int = 0
    """Tool-call turns with a call that was malformed, raised or overran its time (lm/tools.py)."""
    render_kwargs: dict = field(default_factory=dict)
    """What the chat template is given besides the messages (tools=), the same for every turn."""

    def add_reply(self, ids: list[int], log_prob: list[float]) -> None:
        k = len(self.ends)
        self.ids += ids
        self.model += [1] * len(ids)
        self.turn += [k] * len(ids)
        self.log_prob += log_prob
        self.ends.append(len(self.ids) - 1)

    def flag_invalid(self, invalid: Any) -> None:
        if invalid is not None:
            self.invalid_moves = (self.invalid_moves or 0) + bool(invalid)

    def add_answer(self, ids: list[int]) -> None:
        """The environment's tokens after the latest reply (they belong to its turn)."""
        self.ids += ids
        self.model += [0] * len(ids)
        self.turn += [len(self.ends) - 1] * len(ids)
        self.log_prob += [0.0] * len(ids)

    def check(self) -> None:
        """Every per-token list as long as ids; one reward and one model token ending each turn."""
        n = len(self.ids)
        if not (len(self.model) == len(self.turn) == len(self.log_prob) == n and len(self.rewards) == len(self.ends)
                and all(self.model[e] == 1 for e in self.ends) and self.ends == sorted(set(self.ends))):
            raise AssertionError(f"episode of seed {self.seed}: inconsistent lengths")

    def as_sample(self) -> dict:
        """The conversation for samples files and `eval`: prompt, the rest as a transcript, the
        return as `reward`."""
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        rest = self.messages[[m["role"] for m in self.messages].index("assistant"):] if self.ends else []
        return {"prompt": first, "completion": "\n".join(f"[{m['role']}] {m['content']}" for m in rest),
                "reward": float(sum(self.rewards)), "turn_rewards": list(self.rewards), "turns": len(self.ends),
                "env_seed": self.seed, "conversation": self.messages,
                **({"success": self.success} if self.success is not None else {}),
                **({"invalid_moves": self.invalid_moves} if self.invalid_moves is not None else {}),
                **({"tool_calls": self.tool_calls, "bad_tool_calls": self.bad_tool_calls}
                   if self.tool_calls is not None else {})}


# --- the environment's side -------------------------------------------------------------------
def first_messages(observation: Any, spec: str) -> list[dict]:
    """reset's observation as chat messages: a text is the first user message."""
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}]
    if isinstance(observation, list) and observation and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in observation):
        return [dict(m) for m in observation]
    raise EpisodeError(f"text env '{spec}' reset returned an observation of type {type(observation).__name__}; "
                       "it must be text or a list of {role, content} messages")


def reset(env: gym.Env, seed: int, spec: str) -> list[dict]:
    try:
        observation, _ = env.reset(seed=seed)
    except Exception as e:  # the user's code: one line, never a traceback
        raise EpisodeError(f"text env '{spec}' reset(seed={seed}) raised {e.__class__.__name__}: {e}") from None
    return first_messages(observation, spec)


def step(env: gym.Env, reply: str, spec: str, turn: int) -> tuple[str, float, bool, bool, dict]:
    """env.step(reply), checked: a text observation, a finite reward."""
    try:
        observation, reward, terminated, truncated, info = env.step(reply)
    except Exception as e:
        raise EpisodeError(f"text env '{spec}' step at turn {turn + 1} raised {e.__class__.__name__}: {e}") from None
    if not isinstance(observation, str):
        raise EpisodeError(f"text env '{spec}' step at turn {turn + 1} returned an observation of type "
                           f"{type(observation).__name__}; it must be text ('' when there is nothing to say)")
    try:
        reward = float(reward)
    except (TypeError, ValueError):
        raise EpisodeError(f"text env '{spec}' step at turn {turn + 1} returned the reward {reward!r}; it must be "
                           "a number") from None
    if not math.isfinite(reward):
        raise EpisodeError(f"text env '{spec}' step at turn {turn + 1} returned the reward {reward}; it must be "
                           "finite")
    return observation, reward, bool(terminated), bool(truncated), info if isinstance(info, dict) else {}


def answer_ids(policy, history: list[dict], observation: str, ended_with: Optional[int], more: bool,
               answers: Optional[list[dict]] = None, render_kwargs: Optional[dict] = None) -> list[int]:
    """The environment's answer as token ids, as the chat template frames it after a reply: the
    template's text between the reply and the next one (its end-of-turn marker dropped when the
    model sampled it itself), with the next reply's header when `more` turns follow. answers: the
    messages after the reply, when they are not one user message (a tool's). Without a chat
    template: the answer on its own line."""
    tokenizer = policy.tokenizer
    if getattr(tokenizer, "chat_template", None):
        conversation = history + [{"role": "assistant", "content": REPLY_MARKER}] + (
            answers or [{"role": "user", "content": observation}])
        rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=more, tokenize=False,
                                                 **(render_kwargs or {}))
        text = rendered[rendered.rindex(REPLY_MARKER) + len(REPLY_MARKER):]
        if ended_with is not None:
            sampled_end = tokenizer.decode([ended_with])
            if text.startswith(sampled_end):
                text = text[len(sampled_end):]
    else:
        text = "".join(f"\n{m['content']}\n" for m in answers) if answers else f"\n{observation}\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- rollouts ---------------------------------------------------------------------------------
def context_limit(policy) -> int:
    return getattr(policy.model.config, "max_position_embeddings", None) or 1 << 30


def play(policy, envs: list[gym.Env], spec: str, seeds: list[int], cfg, seed: int,
         samples_per_prompt: int = 1, model_defaults: bool = False) -> list[Episode]:
    """One episode per env seed, each in its own env of envs (reset with that seed), played turn by
    turn: each turn the live episodes' next replies are sampled in one batch. An episode ends on
    terminated, on truncated, at max_turns, or when max_episode_tokens (or the model's context) is
    spent; max_turns is terminal (the game's horizon) unless cfg.max_turns_truncates, the others
    truncate it."""
    episodes = []
    toolbox = tools.Toolbox.of(envs[0], f"text env '{spec}'", cfg.tool_timeout) if envs else None
    for env, env_seed in zip(envs, seeds):
        messages, render_kwargs = reset(env, env_seed, spec), {}
        if toolbox is not None:
            messages, render_kwargs = tools.framed(policy.tokenizer, messages, toolbox.schemas)
        text = policy.render({"messages": messages}, **render_kwargs)
        ids = policy.tokenizer(text, add_special_tokens=policy.add_special_tokens)["input_ids"]
        episodes.append(Episode(env_seed, ids, messages, render_kwargs=render_kwargs,
                                tool_calls=None if toolbox is None else 0))
    limit = context_limit(policy)
    longest = max(len(e.prompt_ids) for e in episodes)
    if longest >= limit:
        raise TaskError(f"text env '{spec}' opened with a prompt of {longest} tokens, which fills the model's "
                        f"context of {limit}")
    device, pad = policy.placement.device, policy.tokenizer.pad_token_id
    # what the model has seen, row by row (live episodes only): ids with attention 0 on padding
    # (left of the prompts, after a reply's end, left of each env answer), and its KV cache, so
    # each turn runs only its new positions
    live = list(range(len(episodes)))
    seen, attention = left_padded([e.prompt_ids for e in episodes], pad, device)
    past = None
    for k in range(cfg.max_turns):
        room = [min(cfg.max_new_tokens, cfg.max_episode_tokens - len(episodes[i].ids),
                    limit - len(episodes[i].prompt_ids) - len(episodes[i].ids)) for i in live]
        out = policy.generate_ids(seen, attention, cfg, seed=seed * 1009 + k, max_new_tokens=max(room),
                                  samples_per_prompt=samples_per_prompt if k == 0 else 1, past=past,
                                  model_defaults=model_defaults)
        kept = torch.zeros_like(out.mask)                                        # (B_live, T_new)
        for row, (i, budget) in enumerate(zip(live, room)):
            n = min(int(out.mask[row].sum()), budget)
            kept[row, :n] = 1.0
            reply = out.tokens[row, :n].tolist()
            log_prob = out.log_prob[row, :n].tolist()
            _take_turn(policy, episodes[i], envs[i], spec, k, reply, log_prob, cfg, limit, toolbox)
        going = [row for row, i in enumerate(live) if not episodes[i].done]
        if not going:
            break
        rows = torch.tensor(going, device=device)
        answers = [episodes[live[row]].ids[episodes[live[row]].ends[-1] + 1:] for row in going]
        answer_ids, answer_mask = left_padded(answers, pad, device)
        seen = torch.cat([seen[rows], out.tokens[rows], answer_ids], 1)
        attention = torch.cat([attention[rows], kept[rows].long(), answer_mask], 1)
        past = out.past
        if past is not None and len(going) < len(live):
            for cache in past.values():
                cache.batch_select_indices(rows)
        live = [live[row] for row in going]
    for episode in episodes:
        episode.check()
    return episodes


def left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids left-padded to the longest row, and their (B, L) attention mask (long)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def _take_turn(policy, episode: Episode, env: gym.Env, spec: str, k: int, reply: list[int],
               log_prob: list[float], cfg, limit: int, toolbox: Optional[tools.Toolbox] = None) -> None:
    """Append the reply, step the env with its text (or run the tools it calls), append the
    answer; end the episode if due."""
    episode.add_reply(reply, log_prob)
    text = policy.tokenizer.decode(reply, skip_special_tokens=True).strip()
    calls = tools.parse_calls(text, set(toolbox.tools)) if toolbox is not None else []
    answers = None
    if calls:  # the tools answer, not the env: the turn earns nothing and the env does not move
        texts, failed = tools.answers(calls, toolbox.tools, toolbox.timeout)
        episode.tool_calls += 1
        episode.bad_tool_calls += failed > 0
        answers = [{"role": "tool", "content": t} for t in texts]
        observation, reward, terminated, truncated, info = "\n".join(texts), 0.0, False, False, {}
    else:
        observation, reward, terminated, truncated, info = step(env, text, spec, k)
    episode.rewards.append(reward)
    episode.flag_invalid(info.get("invalid_move"))
    if "success" in info:
        episode.success = bool(info["success"])
    history = list(episode.messages)
    episode.messages.append({"role": "assistant", "content": text})
    ended_with = reply[-1] if reply and reply[-1] in policy.eos_ids else None
    horizon = k + 1 >= cfg.max_turns
    # max_turns is the game's horizon (terminal) unless max_turns_truncates says the env is endless
    final = terminated or (horizon and not cfg.max_turns_truncates)
    # Every answer but a final one ends with the next reply's header: a truncated episode's too, so
    # that the state it was cut in, whose value it bootstraps from, is a turn's start like any other
    answer = answer_ids(policy, history, observation, ended_with, more=not final, answers=answers,
                        render_kwargs=episode.render_kwargs) if (observation or not final) else []
    if answer:
        episode.add_answer(answer)
        episode.messages += answers or [{"role": "user", "content": observation}]
    spent = len(episode.ids) >= min(cfg.max_episode_tokens, limit - len(episode.prompt_ids))
    if final or truncated or horizon or spent:
        episode.done, episode.terminated = True, final
        episode.truncated = not final


def to_batch(episodes: list[Episode], pad_id: int, device: torch.device, bootstrap_column: bool = False) -> Batch:
    """The episodes as one Batch (module docstring's layout), rewards on each turn's last model
    token, terminated/truncated on the final one; log_prob and behaviour_log_prob the sampler's
    (EpisodeCollector.play recomputes log_prob when sampling ran under autocast). bootstrap_column
    (a critic reads it): one more column, so that every row has a position len(ids) whose value is
    that of the whole conversation, the state after the environment's last answer."""
    B = len(episodes)
    P = max(len(e.prompt_ids) for e in episodes)
    T = max(max(len(e.ids) for e in episodes) + int(bootstrap_column), 1)
    prompts = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(B, P)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    real, mask, log_prob = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)
    turn = torch.full((B, T), -1, dtype=torch.long)
    rewards, terminated, truncated = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T)
    for b, e in enumerate(episodes):
        p, n = len(e.prompt_ids), len(e.ids)
        prompts[b, P - p:] = torch.tensor(e.prompt_ids)
        prompt_mask[b, P - p:] = 1.0
        if n:
            ids[b, :n] = torch.tensor(e.ids)
            real[b, :n] = 1.0
            mask[b, :n] = torch.tensor(e.model, dtype=torch.float32)
            log_prob[b, :n] = torch.tensor(e.log_prob)
            turn[b, :n] = torch.tensor(e.turn)
            rewards[b, e.ends] = torch.tensor(e.rewards)
            terminated[b, e.ends[-1]] = float(e.terminated)
            truncated[b, e.ends[-1]] = float(e.truncated)
    to = lambda x: x.to(device)  # noqa: E731
    return Batch(obs=to(torch.cat([prompts, ids], 1)), obs_mask=to(torch.cat([prompt_mask, real], 1)),
                 actions=to(ids), log_prob=to(log_prob * mask), behaviour_log_prob=to(log_prob * mask),
                 rewards=to(rewards), terminated=to(terminated),
                 truncated=to(truncated), mask=to(mask), turn=to(turn))


def bootstrap_positions(episodes: list[Episode]) -> torch.Tensor:
    """(B,) where a truncated episode's bootstrap value is read: the column after its last token
    (to_batch's bootstrap_column), whose value has seen the environment's final answer and the next
    reply's header: V of the state the episode was cut in."""
    return torch.tensor([len(e.ids) for e in episodes], dtype=torch.long)


# --- the workload's side: collecting and evaluating episodes ------------------------------------
def refuse_overlong_keys(cfg, spec: str) -> None:
    """DAPO's overlong filtering and punishment are defined on single completions, which the length
    limit cuts; an episode's replies are cut by max_new_tokens, max_episode_tokens or the context,
    and its turns share one return, so neither carries over as it is: refused in one line."""
    keys = [key for key in ("overlong_filter", "overlong_buffer") if getattr(cfg, key)]
    if keys:
        raise ConfigError(f"{' and '.join(keys)} act on single completions cut by max_new_tokens; task '{spec}' "
                          "plays multi-turn episodes, where they are not defined: set overlong_filter=false "
                          "overlong_buffer=0")


STATS = 9
"""Columns of episode_stats."""


def episode_stats(episodes: list[Episode], kl: torch.Tensor) -> np.ndarray:
    """(B, STATS) per episode: mean reward per turn, return, turns, success (nan: the env does not
    say), model tokens, KL to the reference (nats), the share of turns that were invalid moves
    (nan: the env does not say), of turns that called a tool and of those calls that failed (nan:
    no tools, no calls)."""
    def share(count: Optional[int], of: int) -> float:
        return np.nan if count is None or of == 0 else count / of
    return np.array([[float(np.mean(e.rewards)), float(sum(e.rewards)), len(e.ends),
                      np.nan if e.success is None else float(e.success), float(sum(e.model)), float(k),
                      share(e.invalid_moves, len(e.ends)), share(e.tool_calls, len(e.ends)),
                      share(e.bad_tool_calls if e.tool_calls else None, e.tool_calls or 0)]
                     for e, k in zip(episodes, kl.tolist())], dtype=np.float64).reshape(-1, STATS)


def episode_metrics(stats: np.ndarray, prefix: str) -> dict:
    """Means of episode_stats rows (every rank's), as `{prefix}/reward_mean` (the mean reward per
    turn, each episode weighing the same) and `{prefix}/episode/...`."""
    success = stats[:, 3][~np.isnan(stats[:, 3])]
    episode = "episode" if prefix == "train" else f"{prefix}/episode"
    rates = {f"{episode}/{name}": float(np.nanmean(stats[:, column])) for column, name in
             ((6, "invalid_move_rate"), (7, "tool_call_rate"), (8, "bad_tool_call_rate"))
             if not np.isnan(stats[:, column]).all()}
    return {f"{prefix}/reward_mean": float(stats[:, 0].mean()), f"{prefix}/reward_std": float(stats[:, 0].std()),
            f"{episode}/return_mean": float(stats[:, 1].mean()), f"{episode}/turns_mean": float(stats[:, 2].mean()),
            **({f"{episode}/success_rate": float(success.mean())} if len(success) else {}), **rates}


class EpisodeCollector:
    """A language-model workload's rollouts and evaluation when its task is a text env (task.env):
    episodes instead of completions, scored by the same path (lm/scoring.py) with the workload's
    scoring state."""

    def __init__(self, policy, task, cfg, placement, scoring):
        self.policy, self.task, self.cfg, self.placement, self.scoring = policy, task, cfg, placement, scoring
        self.pool: list[gym.Env] = []
        self.sample_times: dict[str, float] = {}
        self.template_checked = False

    def check_template(self, env: gym.Env) -> None:
        """Once per run, before the first episode: the chat template keeps history as it was for the
        roles the episodes use (lm/tools.py)."""
        if not self.template_checked:
            roles = ("user", "assistant", "tool") if getattr(env, "tools", None) else ("user", "assistant")
            tools.check_prefix_preserving(self.policy.tokenizer, roles, f"task '{self.task.name}'")
            self.template_checked = True

    def envs(self, n: int) -> list[gym.Env]:
        """n envs, made once and reused (reset with each episode's seed, as Gymnasium envs are):
        an env that loads a reward model or opens a connection does so once, not per episode."""
        self.pool += [self.task.env() for _ in range(n - len(self.pool))]
        return self.pool[:n]

    def play(self, rows: list[dict], n: int, seed: int, sampling=None, model_defaults: bool = False
             ) -> tuple[list[Episode], Batch]:
        """n episodes from each row's env seed, as a batch with the reference's log-probs;
        sampling: a config with other sampling settings (`sample`), else the run's."""
        policy = self.policy
        seeds = [int(r["env_seed"]) for r in rows for _ in range(n)]
        self.check_template(self.envs(1)[0])
        # no_grad: under autocast the old log-probs' pass below would otherwise build a graph (and
        # bfloat16 episodes crashed reading them)
        with policy.gathered(), torch.no_grad():
            start = time.perf_counter()
            episodes = play(policy, self.envs(len(seeds)), self.task.name, seeds, sampling or self.cfg, seed, n,
                            model_defaults)
            played = time.perf_counter()
            batch = to_batch(episodes, policy.tokenizer.pad_token_id, self.placement.device,
                             bootstrap_column=policy.value_head is not None)
            if self.placement.mixed:  # sampled under autocast: the old log-probs come from the training pass
                batch = batch.replace(log_prob=policy.log_prob(batch))
            ref = policy.reference_log_prob(batch) if policy.reference is not None else batch.log_prob
        self.sample_times = {"time/generate_s": played - start, "time/reference_s": time.perf_counter() - played}
        return episodes, batch.replace(ref_log_prob=ref)

    def collect(self, rows: list[dict], seed: int) -> tuple[Batch, dict]:
        """samples_per_prompt episodes from each of this rank's rows (the group of the rloo and
        group baselines), each turn's env reward on its reply's last token; statistics over every
        rank's episodes."""
        cfg = self.cfg
        episodes, batch = self.play(rows, cfg.samples_per_prompt, seed=seed)
        device = batch.mask.device
        kl = kl_per_completion(batch)                                                       # (B,)
        rewards = batch.rewards                                                              # (B, T)
        if cfg.whiten_rewards:  # each turn's env reward, with the moments of every rank's turns
            pooled = torch.as_tensor(dist.gather_rows(np.array([r for e in episodes for r in e.rewards])),
                                     dtype=torch.float32, device=device)                     # (turns_global,)
            ends = torch.zeros_like(rewards)                                                 # (B, T)
            for b, e in enumerate(episodes):
                ends[b, e.ends] = 1.0
            rewards = (rewards - pooled.mean()) / (pooled.std() + 1e-8) * ends
        finals = torch.tensor([e.ends[-1] for e in episodes], device=device)                # (B,)
        values, next_values = values_of(self.policy, batch, (finals, bootstrap_positions(episodes).to(device)))
        batch = self.scoring.finish(batch, rewards, values, next_values, len(rows))
        stats = dist.gather_rows(episode_stats(episodes, kl))                               # (B_global, STATS)
        scores = dist.gather_rows((batch.rewards * batch.mask).sum(1).float().cpu().numpy().astype(np.float64))
        self.scoring.record(torch.from_numpy(scores), torch.from_numpy(stats[:, 5]))
        return batch, {**episode_metrics(stats, "train"), **self.scoring.metrics(stats[:, 5], stats[:, 4],
                                                                                self.sample_times)}

    def evaluate(self, split: str, out_dir: Optional[Path] = None) -> dict:
        """One episode per held-out env seed (a fixed sampling seed per chunk), over the ranks as
        LMWorkload.evaluate: mean reward per turn, return, turns, success rate, KL."""
        rows = self.task.rows(split)
        if split == "validation":
            rows = rows[:self.cfg.eval_prompts]
        size, mine = self.cfg.completions_per_step, []
        # gathered once around the loop: with sharded weights, ranks may play different chunk counts,
        # and a gather per chunk would pair one rank's all-gather with another's gather_objects
        with self.policy.gathered():
            for start in range(0, len(rows), size)[dist.rank()::dist.world()]:
                episodes, batch = self.play(rows[start:start + size], 1, seed=10_000_019 + start)
                mine.append((start, episode_stats(episodes, kl_per_completion(batch)).tolist(), [e.as_sample() for e in episodes]))
        chunks = sorted((c for part in dist.gather_objects(mine) for c in part), key=lambda c: c[0])
        stats = np.array([row for c in chunks for row in c[1]], dtype=np.float64).reshape(-1, STATS)
        samples = [s for c in chunks for s in c[2]]
        if out_dir is not None and dist.is_main():
            write_samples(out_dir, f"{split}-step{self.scoring.steps:05d}", samples)
        prefix = "eval" if split == "validation" else split
        return {**episode_metrics(stats, prefix), f"{prefix}/kl_to_reference": float(stats[:, 5].mean()),
                f"{prefix}/n": len(stats), **({"samples": samples} if out_dir is None else {})}

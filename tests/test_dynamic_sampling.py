"""DAPO's dynamic sampling (lm/dynamic.py): the choice of groups on hand-made rewards, the layout of
the kept rows, and runs of the tiny LM where flat groups really are dropped, the bound on rounds
holds, a step that keeps nothing takes no update and a short step trains on its padded batch.
(Resume: tests/test_resume.py; two ranks: tests/test_dist.py; refusals: test_config, test_bad_input.)"""
import json

import numpy as np
import pytest
import torch

from policygrad import trainer
from policygrad.algos import ALGOS, Progress
from policygrad.batch import Batch
from policygrad.core import advantages
from policygrad.lm import dynamic
from policygrad.lm.rollout import LMWorkload, PromptCursor
from policygrad.lm.scoring import flat_groups, no_signal
from policygrad.resolve import resolve

PAD = 0


# --- the choice, on hand-made rewards --------------------------------------------------------------
def test_flat_groups_are_those_whose_rewards_are_all_equal():
    rewards = np.array([1.0, 1.0, 0.0, 1.0, 2.0, 2.0 + 1e-12, -3.0, 3.0])
    assert flat_groups(rewards, 2).tolist() == [True, False, True, False]
    assert flat_groups(rewards, 4).tolist() == [False, False]
    assert no_signal(rewards, 2) == (0.5, 0.0)  # the metrics' share is the same test


def test_the_first_groups_that_spread_are_kept_in_draw_order_and_the_surplus_cut():
    flat = np.array([True, False, True, False, False, True, False])
    assert dynamic.kept_groups(flat, 3).tolist() == [1, 3, 4]
    assert dynamic.kept_groups(flat, 10).tolist() == [1, 3, 4, 6]
    assert dynamic.kept_groups(np.ones(4, dtype=bool), 2).tolist() == []
    assert dynamic.draws_done(flat[:3], want=2, rounds=1, max_draws=3) is False
    assert dynamic.draws_done(flat[:4], want=2, rounds=2, max_draws=3) is True   # full
    assert dynamic.draws_done(flat[:3], want=2, rounds=3, max_draws=3) is True   # the bound


def test_round_zero_is_the_steps_seed_and_later_rounds_have_their_own():
    seeds = [dynamic.round_seed(1_000_003, i) for i in range(4)]
    assert seeds[0] == 1_000_003 and len(set(seeds)) == 4
    assert seeds == [dynamic.round_seed(1_000_003, i) for i in range(4)]  # a resumed run draws the same
    assert dynamic.round_seed(1_000_004, 1) not in seeds and all(0 <= s < 2 ** 63 for s in seeds)


def sampled(prompt_lengths: list[int], completion_lengths: list[int], tag: int) -> Batch:
    """A batch as the sampler returns it: row i has prompt_lengths[i] prompt tokens (left-padded to
    the longest) and completion_lengths[i] completion tokens (right-padded); every real token's id
    says (tag, row, position), every real log-prob says (tag, row)."""
    B, P, T = len(prompt_lengths), max(prompt_lengths), max(completion_lengths)
    obs, obs_mask = torch.full((B, P + T), PAD), torch.zeros(B, P + T)
    log_prob, mask = torch.zeros(B, T), torch.zeros(B, T)
    for i, (p, n) in enumerate(zip(prompt_lengths, completion_lengths)):
        obs[i, P - p:P + n] = tag * 10_000 + i * 100 + torch.arange(1, p + n + 1)
        obs_mask[i, P - p:P + n] = 1.0
        mask[i, :n] = 1.0
        log_prob[i, :n] = -(tag + i / 100)
    zeros = torch.zeros(B, T)
    return Batch(obs=obs, obs_mask=obs_mask, actions=obs[:, P:], log_prob=log_prob, behaviour_log_prob=log_prob,
                 rewards=zeros, terminated=zeros, truncated=zeros, mask=mask)


def real_tokens(batch: Batch, row: int) -> list[int]:
    return batch.obs[row][batch.obs_mask[row] > 0].tolist()


ROUND_WIDTHS = [([1, 4, 2, 2, 3, 1], [3, 1, 2, 2, 1, 1]), ([3, 3, 2, 2, 6, 1], [2, 4, 1, 3, 5, 1])]
"""Prompt and completion tokens of each row of the fake rounds (even rounds, odd rounds)."""


def rounds_of(rewards: list[list[float]]):
    """Fake rounds of 6 rows (3 groups of 2), their widths from ROUND_WIDTHS, with the given task
    rewards; the rounds' batches, the sampler, and the rounds it was asked for."""
    batches = [sampled(*ROUND_WIDTHS[i % 2], tag=10 + i) for i in range(len(rewards))]
    calls = []

    def sample_round(i):
        calls.append(i)
        return batches[i], np.array(rewards[i]), {"part": np.array(rewards[i]) * 2}
    return batches, sample_round, calls


def test_kept_rows_are_the_first_groups_that_spread_re_padded_to_one_batch():
    """want 3 groups of 2: round 0 keeps its group 1, round 1 (all spread) fills the batch with its
    groups 0 and 1 and its group 2 is cut; no third round is drawn. Every kept row's tokens and
    log-probs arrive whole, re-padded to the kept rows' widths."""
    rewards = [[1, 1, 0, 1, 2, 2], [0, 1, 0, 2, 5, 3]]
    batches, sample_round, calls = rounds_of(rewards + [[0, 1] * 3])
    drawn = dynamic.draw(sample_round, samples_per_prompt=2, want=3, max_draws=3)
    assert calls == [0, 1]
    kept = dynamic.assemble(drawn, want=3, pad_id=PAD)
    sources = [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]  # (round, row) of each kept row
    # the kept rows' widths: round 1's longest prompt (6) and completion (5) are cut, being surplus
    assert kept.batch.shape == (6, 4) and kept.batch.obs.shape[1] == 3 + 4
    for row, (r, i) in enumerate(sources):
        assert real_tokens(kept.batch, row) == real_tokens(batches[r], i)
        assert kept.batch.log_prob[row].sum() == pytest.approx(batches[r].log_prob[i].sum())
    assert kept.real.all() and kept.task_reward.tolist() == [0, 1, 0, 1, 0, 2] == kept.all_reward.tolist()
    assert kept.parts["part"].tolist() == [0, 2, 0, 2, 0, 4]
    assert kept.metrics == {"train/draws": 2, "train/kept_groups": 3, "train/dropped_groups": 2,
                            "train/sampled_reward_mean": pytest.approx(np.mean(rewards))}
    assert kept.flat_share == (2 / 6, 0.0)


def test_the_bound_on_rounds_and_a_short_batch_padded_with_rows_that_weigh_nothing():
    """max_draws 2 and a single group that spreads: the step stops at the bound and keeps it, and
    the two missing groups are copies of it whose mask and log-probs are 0."""
    batches, sample_round, calls = rounds_of([[1, 1, 0, 1, 2, 2], [3, 3, 3, 3, 0, 0], [0, 1] * 3])
    drawn = dynamic.draw(sample_round, samples_per_prompt=2, want=3, max_draws=2)
    assert calls == [0, 1]
    kept = dynamic.assemble(drawn, want=3, pad_id=PAD)
    assert kept.real.tolist() == [True, True, False, False, False, False]
    assert [real_tokens(kept.batch, row) for row in range(6)] == [real_tokens(batches[0], 2 + row % 2)
                                                                   for row in range(6)]
    assert kept.batch.mask[2:].sum() == 0 and kept.batch.log_prob[2:].abs().sum() == 0
    assert kept.batch.mask[:2].sum() == batches[0].mask[2:4].sum()
    assert kept.task_reward.tolist() == [0, 1, 0, 0, 0, 0] and kept.all_reward.tolist() == [0, 1]
    assert kept.metrics["train/kept_groups"] == 1 and kept.metrics["train/dropped_groups"] == 5


def test_a_step_that_keeps_nothing_is_a_batch_of_no_rows():
    _, sample_round, calls = rounds_of([[1, 1, 2, 2, 0, 0]] * 3)
    kept = dynamic.assemble(dynamic.draw(sample_round, 2, want=3, max_draws=3), want=3, pad_id=PAD)
    assert calls == [0, 1, 2] and kept.batch.shape[0] == 0 and len(kept.real) == 0
    assert kept.metrics["train/kept_groups"] == 0 and kept.metrics["train/dropped_groups"] == 9


def test_fit_only_cuts_or_adds_padding_columns():
    batch = sampled([2, 4], [3, 1], tag=1)
    wide = dynamic.fit(batch, 6, 5, PAD)
    narrow = dynamic.fit(wide, 4, 3, PAD)
    assert wide.obs.shape == (2, 11) and narrow.obs.shape == (2, 7) and narrow.actions.shape == (2, 3)
    for b in (wide, narrow):
        assert [real_tokens(b, i) for i in range(2)] == [real_tokens(batch, i) for i in range(2)]
        assert b.mask.sum(1).tolist() == [3, 1] and torch.equal(b.obs[:, -b.actions.shape[1]:], b.actions)
    assert torch.equal(narrow.obs, batch.obs) and torch.equal(narrow.log_prob, batch.log_prob)


# --- the tiny LM -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity_task(tmp_path_factory):
    """30 prompts; a prompt with an even answer gets reward 1 for any completion (a flat group),
    one with an odd answer a reward that differs from completion to completion (a checksum)."""
    from lm_helpers import write_task
    folder = tmp_path_factory.mktemp("dynamic")
    (folder / "rewards.py").write_text(
        "import zlib\n"
        "def parity(prompts, completions, answer):\n"
        "    return [1.0 if int(a) % 2 == 0 else zlib.crc32(c.encode()) / 2 ** 32\n"
        "            for c, a in zip(completions, answer)]\n"
        "def checksum(prompts, completions, answer):\n"
        "    return [zlib.crc32(c.encode()) / 2 ** 32 for c in completions]\n"
        "def constant(prompts, completions, answer):\n"
        "    return [0.5] * len(completions)\n")
    rows = [{"prompt": f"Tell me about item {i}.", "answer": str(i)} for i in range(30)]
    write_task(folder, rows, "data: prompts.jsonl\nrewards: ['python:rewards.py:parity']\nmax_new_tokens: 5\n")
    for name in ("checksum", "constant"):
        (folder / f"{name}.yaml").write_text(f"data: prompts.jsonl\nrewards: ['python:rewards.py:{name}']\n"
                                             "max_new_tokens: 5\n")
    return folder


def lm_cfg(tiny_lm, task, **keys):
    """The tiny LM on a task, dynamic sampling on (keys set to None are left out)."""
    values = {"prompts_per_step": 2, "samples_per_prompt": 2, "eval_prompts": 2, "lr": 1e-3,
              "dynamic_sampling": True, "max_draws": 4, **keys}
    values = {k: v for k, v in values.items() if v is not None}
    algo = values.pop("algo", "reinforce")
    return resolve({}, values, {"task": str(task), "model": str(tiny_lm), "algo": algo})


def expected_groups(answers: list[int], seed: int, per_round: int, max_draws: int, want: int
                    ) -> tuple[list[int], int, int]:
    """The answers of the prompts the parity task keeps (odd answers), from the cursor's order over
    the training rows' answers; the rounds drawn; the groups dropped."""
    cursor, kept, dropped = PromptCursor(len(answers), seed), [], 0
    for rounds in range(1, max_draws + 1):
        drawn = [answers[i] for i in cursor.take(per_round)]
        kept += [a for a in drawn if a % 2]
        dropped += sum(1 for a in drawn if a % 2 == 0)
        if len(kept) >= want:
            break
    return kept[:want], rounds, dropped


@pytest.fixture(scope="module")
def train_answers(tiny_lm, parity_task) -> list[int]:
    return [int(r["answer"]) for r in LMWorkload(lm_cfg(tiny_lm, parity_task / "task.yaml"), seed=0).task.rows("train")]


def prompts_of(work: LMWorkload, batch: Batch) -> list[str]:
    T = batch.actions.shape[1]
    return [work.policy.tokenizer.decode(row[:-T][m[:-T] > 0]) for row, m in zip(batch.obs, batch.obs_mask)]


def test_flat_groups_are_dropped_and_the_kept_rows_are_the_expected_prompts(tiny_lm, parity_task, train_answers):
    """Even prompts are flat: the step's rows are the first two odd prompts the cursor draws, each
    with its samples_per_prompt completions, and the cursor has moved by every round drawn."""
    seed = next(s for s in range(1, 50) if expected_groups(train_answers, s, 2, 4, 2)[1] > 1)  # several rounds
    kept_ids, rounds, dropped = expected_groups(train_answers, seed, 2, 4, 2)
    work = LMWorkload(lm_cfg(tiny_lm, parity_task / "task.yaml", seed=seed), seed=seed)
    batch, metrics = work.collect()
    assert prompts_of(work, batch) == [f"Tell me about item {i}." for i in kept_ids for _ in range(2)]
    assert (metrics["train/draws"], metrics["train/kept_groups"], metrics["train/dropped_groups"]) == \
        (rounds, 2, dropped)
    assert work.cursor.state()["position"] == 2 * rounds
    assert metrics["train/flat_group_share"] == dropped / (2 * rounds)
    # the trained batch's reward metrics are the kept rows', the sampled mean is every row's
    assert metrics["train/reward_mean"] < 1.0 and metrics["train/reward_std"] > 0  # no flat group of 1.0
    assert "train/sampled_reward_mean" in metrics
    assert batch.mask.sum(1).min() > 0 and batch.ref_log_prob is not None


def test_a_step_whose_first_round_keeps_every_group_is_the_plain_step(tiny_lm, parity_task):
    """The naive twin: with no flat group, dynamic sampling's batch is the plain step's, bit for bit."""
    batches = []
    for dynamic_sampling in (False, True):
        cfg = lm_cfg(tiny_lm, parity_task / "checksum.yaml", kl_coef=0.1, dynamic_sampling=dynamic_sampling or None,
                     max_draws=4 if dynamic_sampling else None)
        batch, metrics = LMWorkload(cfg, seed=3).collect()
        batches.append((batch, metrics))
    (plain, plain_metrics), (dyn, dyn_metrics) = batches
    assert dyn_metrics["train/draws"] == 1 and dyn_metrics["train/kept_groups"] == 2
    for name, value in plain.__dict__.items():
        if torch.is_tensor(value):
            assert torch.equal(value, getattr(dyn, name)), name
    for key in ("train/reward_mean", "train/reward_std", "kl/to_reference", "train/completion_length"):
        assert dyn_metrics[key] == plain_metrics[key], key


def test_a_step_that_keeps_nothing_takes_no_update(tiny_lm, parity_task, tmp_path):
    """A constant reward: every step draws max_draws rounds, keeps nothing and takes no update (the
    weights and optimiser stay as built), counted as skipped; the prompts were still consumed."""
    cfg = lm_cfg(tiny_lm, parity_task / "constant.yaml", max_draws=2, total_steps=2, eval_every=0,
                 checkpoint_every=0)
    threads = torch.get_num_threads()
    try:
        run = trainer.run(cfg, tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(threads)  # train() shares the machine's cores out; the tests run on one
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train/draws"], r["train/kept_groups"], r["update/empty"]) for r in rows] == [(2, 0, 1.0)] * 2
    assert run.summary["skipped_updates"] == 2 and run.work.cursor.state()["position"] == 2 * 2 * 2
    fresh = LMWorkload(cfg, seed=cfg.seed).policy
    assert all(torch.equal(a, b) for a, b in zip(fresh.actor_parameters(), run.work.policy.actor_parameters()))


def test_a_short_step_trains_on_its_kept_groups_and_padding_alone_takes_no_step(tiny_lm, parity_task,
                                                                                  train_answers):
    """PPO, one group per minibatch: a step that keeps 1 to 3 of its 4 groups in its one round pads
    the rest; the update is finite and moves the weights; a batch of padding alone then moves
    neither the weights nor Adam's state."""
    seed = next(s for s in range(1, 50) if 0 < len(expected_groups(train_answers, s, 4, 1, 4)[0]) < 4)
    cfg = lm_cfg(tiny_lm, parity_task / "task.yaml", algo="ppo", prompts_per_step=4, max_draws=1,
                 batch_size=2, n_epochs=2, seed=seed)
    work = LMWorkload(cfg, seed=seed)
    batch, metrics = work.collect()
    kept = metrics["train/kept_groups"]
    assert kept == len(expected_groups(train_answers, seed, 4, 1, 4)[0]) and batch.shape[0] == 8
    assert (batch.mask.sum(1) > 0).sum() == 2 * kept
    algo = ALGOS["ppo"]
    opts = algo.make_optimizers(work.policy, cfg)
    before = [p.detach().clone() for p in work.policy.actor_parameters()]
    batch = advantages.compute(batch, cfg)
    out = algo.update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    assert out["update/nonfinite"] == 0.0 and all(np.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, work.policy.actor_parameters()))
    moved = [p.detach().clone() for p in work.policy.actor_parameters()]
    steps = [s["step"].clone() for s in opts.main.state.values()]
    padding = batch.replace(mask=torch.zeros_like(batch.mask))
    assert algo.update(work.policy, opts, padding, cfg, Progress(1.0, torch.Generator().manual_seed(1))) \
        == {"update/nonfinite": 0.0, "policy/early_stop": 0.0, "policy/clip_eps": cfg.clip_eps}
    assert all(torch.equal(a, b) for a, b in zip(moved, work.policy.actor_parameters()))
    assert all(torch.equal(a, s["step"]) for a, s in zip(steps, opts.main.state.values()))


def test_a_multi_turn_task_is_refused_in_one_line(tiny_lm):
    cfg = resolve({}, {"dynamic_sampling": True, "prompts_per_step": 2, "samples_per_prompt": 2},
                  {"task": "guess-number", "model": str(tiny_lm), "algo": "reinforce"})
    with pytest.raises(Exception, match="multi-turn text env, which it does not support: set dynamic_sampling=false"):
        LMWorkload(cfg, seed=0)


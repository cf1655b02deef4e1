"""DAPO's overlong handling (issue #25): the soft punishment on hand-computed lengths, which
completions the length limit cut, the filter's loss on hand numbers for every aggregation, the
filtered update as the update of the kept completions alone (any micro-batch split, PPO, REINFORCE
and TRPO; 2 ranks: tests/test_dist.py's lm-*-overlong cases), the metrics, and the config's rules."""
import dataclasses

import pytest
import torch

from policygrad.algos import ALGOS, PPO_LOSS, Progress
from policygrad.batch import Batch
from policygrad.config import Config, ConfigError
from policygrad.core import advantages
from policygrad.core.losses import LOSS_AGGREGATIONS, joint_loss, reinforce_loss
from policygrad.lm.generation import completion_mask
from policygrad.lm.rollout import LMWorkload
from policygrad.lm.scoring import length_truncated, overlong_penalty
from policygrad.resolve import resolve

AGGREGATIONS = list(LOSS_AGGREGATIONS)


def lm_config(tiny_lm, task_file, **overrides) -> Config:
    values = {"prompts_per_step": 2, "samples_per_prompt": 3, "eval_prompts": 2, "logprob_chunk": 4,
              "lr": 1e-3, **overrides}
    return resolve({}, values, {"task": str(task_file), "model": str(tiny_lm), "algo": overrides.get("algo", "reinforce")})


# --- the punishment and the cut, on hand numbers ---------------------------------------------------
def test_soft_punishment_on_hand_computed_lengths():
    """DAPO eq. 13 with L_max 10, L_cache 4 and a penalty factor of 0.5: nothing up to 6 tokens,
    then 0.5 x (6 - |y|) / 4, down to -0.5 at the limit."""
    lengths = torch.tensor([1.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    got = overlong_penalty(lengths, max_new_tokens=10, buffer=4, penalty=0.5)
    assert got.tolist() == [0.0, 0.0, -0.125, -0.25, -0.375, -0.5]
    assert overlong_penalty(lengths, 10, 0, 0.5).tolist() == [0.0] * 6  # buffer 0: off
    # a buffer of all but one token: 2 tokens into it cost 2/3
    assert overlong_penalty(torch.tensor([1.0, 3.0]), 4, 3, 1.0).tolist() == pytest.approx([0.0, -2 / 3])


def test_a_completion_is_cut_only_at_the_limit_without_an_eos():
    """EOS (id 1) on the last allowed position finished on its own; max_new_tokens tokens without an
    EOS were cut; a shorter one was not, EOS or not (a batch whose longest row ended early)."""
    tokens = torch.tensor([[5, 6, 7, 1],    # EOS at the last position: finished
                           [5, 6, 7, 8],    # no EOS at the limit: cut
                           [5, 1, 9, 9],    # EOS early (padding after): finished
                           [1, 9, 9, 9]])   # EOS first
    mask = completion_mask(tokens, {1})
    assert length_truncated(tokens, mask, {1}, max_new_tokens=4).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert length_truncated(tokens, mask, {1, 8}, max_new_tokens=4).tolist() == [0.0, 0.0, 0.0, 0.0]
    short = tokens[1:2, :3]  # 3 tokens of a limit of 4: every row ended before it
    assert length_truncated(short, torch.ones(1, 3), {1}, max_new_tokens=4).tolist() == [0.0]


# --- the filter in the loss ------------------------------------------------------------------------
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
CUT = torch.tensor([0.0, 1.0, 0.0])  # row 1 reached the limit of 3 without an EOS


def hand_batch(log_prob: torch.Tensor, adv: torch.Tensor, cut: torch.Tensor = CUT, **fields) -> Batch:
    z = torch.zeros_like(MASK)
    return Batch(obs=z, actions=z.long(), log_prob=log_prob.detach(), rewards=z, terminated=z, truncated=z,
                 mask=MASK, advantages=adv, length_truncated=cut, **fields)


# rows 0 and 2 kept: log pi x A is (-1 - 2) x 1 on row 0's two tokens and -0.5 x -2 on row 2's one
HAND_LOSS = {"token-mean": 2 / 3,                   # -(-3 + 1) / 3 tokens
             "seq-mean-token-mean": 0.25,           # -(-3 / 2 + 1 / 1) / 2 completions
             "seq-mean-token-sum-norm": 1 / 3,      # -(-3 + 1) / (2 completions x max_new_tokens 3)
             "seq-mean-token-sum": 1.0}             # -(-3 + 1) / 2 completions


@pytest.mark.parametrize("loss_agg", AGGREGATIONS)
def test_the_filter_drops_a_cut_row_from_every_aggregation_by_hand(loss_agg):
    """The policy loss over the kept rows, each aggregation's count of kept tokens or completions
    in the denominator, and no gradient at the cut row (whose numbers would change the loss)."""
    log_prob = torch.tensor([[-1.0, -2.0, 0.0], [-0.3, -0.7, -1.1], [-0.5, 0.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 0.0], [3.0, 3.0, 3.0], [-2.0, 0.0, 0.0]])
    batch = advantages.without_length_truncated(hand_batch(log_prob, adv))
    loss, _ = reinforce_loss(log_prob, batch, Config(loss_agg=loss_agg, max_new_tokens=3))
    assert loss.item() == pytest.approx(HAND_LOSS[loss_agg], rel=1e-6)
    loss.backward()
    assert log_prob.grad[1].abs().sum() == 0 and log_prob.grad[0].abs().sum() > 0


@pytest.mark.parametrize("loss_agg", AGGREGATIONS)
def test_a_cut_row_adds_nothing_to_any_term_of_the_joint_loss(loss_agg):
    """PPO's joint loss (clipped surrogate, k3 KL term, entropy bonus, clipped value loss) of the
    filtered batch is that of the kept rows alone, and the cut row's log-probs, entropies and values
    get no gradient."""
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(3, 3, generator=g) * MASK  # noqa: E731
    old, ref, adv, returns, old_values = rand() - 1.0, rand() - 1.0, rand(), rand(), rand()
    new_log_prob, entropy, values = old + 0.3 * rand(), torch.rand(3, 3, generator=g), old_values + 0.3 * rand()
    fields = dict(ref_log_prob=ref, returns=returns, values=old_values, kl_coef=0.1)
    cfg = Config(algo="ppo", advantage="gae", loss_agg=loss_agg, max_new_tokens=3, kl_in="loss",
                 kl_estimator="k3", ent_coef=0.01, clip_value_eps=0.2)

    def loss_of(batch: Batch, rows: list[int]):
        inputs = [x[rows].clone().requires_grad_() for x in (new_log_prob, entropy, values)]
        loss, _ = joint_loss(*inputs, batch, cfg, PPO_LOSS, measure_sampler=False)
        loss.backward()
        return loss, inputs

    loss, inputs = loss_of(advantages.without_length_truncated(hand_batch(old, adv, **fields)), [0, 1, 2])
    kept = hand_batch(old, adv, cut=torch.zeros(3), **fields).select_rows(torch.tensor([0, 2]))
    kept_loss, kept_inputs = loss_of(kept, [0, 2])
    torch.testing.assert_close(loss, kept_loss)
    for x, k in zip(inputs, kept_inputs):  # log_prob, entropy, values
        assert x.grad[1].abs().sum() == 0 and x.grad[0].abs().sum() > 0
        torch.testing.assert_close(x.grad[[0, 2]], k.grad)


# --- whole updates on the tiny model ---------------------------------------------------------------
def flat_grad(opts) -> torch.Tensor:
    return torch.cat([f.param.grad.clone() for f in opts.main_params])


def test_the_filtered_gradient_is_the_kept_rows_gradient_for_any_split(tiny_lm, task_file):
    """REINFORCE, every aggregation, with the KL term and entropy bonus: the filtered batch in one
    pass, in micro-batches of 2 (one of them all cut: it weighs nothing) and the kept rows alone
    (advantages from the whole batch) give one gradient; cut rows' rewards still moved the group
    baselines. With every row cut, no step is taken (Adam's momentum alone would move the weights)."""
    from dist_workers import vary_lengths
    cfg = lm_config(tiny_lm, task_file, overlong_filter=True, max_grad_norm=0.0, kl_in="loss", kl_estimator="k3",
                    ent_coef=0.01, share_prompts=False)
    work = LMWorkload(cfg, seed=0)
    start = {k: v.clone() for k, v in work.policy.model.state_dict().items()}
    cut = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    collected = vary_lengths(work.collect()[0]).replace(length_truncated=cut)
    kept = torch.tensor([0, 2, 3])
    algo = ALGOS["reinforce"]

    def update(batch: Batch, c: Config):
        work.policy.model.load_state_dict(start)
        opts = algo.make_optimizers(work.policy, c)
        algo.update(work.policy, opts, batch, c, Progress(1.0, torch.Generator()))
        return opts

    for loss_agg in AGGREGATIONS:
        c = dataclasses.replace(cfg, loss_agg=loss_agg)
        batch = advantages.compute(collected, c)
        unfiltered = advantages.compute(collected, dataclasses.replace(c, overlong_filter=False))
        torch.testing.assert_close(batch.advantages[kept], unfiltered.advantages[kept])  # the whole group's
        grads = [flat_grad(update(b, dataclasses.replace(c, micro_batch_size=m)))
                 for m, b in ((0, batch), (2, batch), (0, batch.select_rows(kept)))]
        assert grads[0].abs().sum() > 0
        for other in grads[1:]:
            torch.testing.assert_close(other, grads[0], atol=1e-6, rtol=1e-4, msg=loss_agg)
    # every row cut, after a step that gave Adam momentum: the weights stay
    opts = update(advantages.compute(collected, cfg), cfg)
    before = [p.detach().clone() for p in work.policy.actor_parameters()]
    everything_cut = advantages.compute(collected.replace(length_truncated=torch.ones(6)), cfg)
    metrics = algo.update(work.policy, opts, everything_cut, cfg, Progress(1.0, torch.Generator()))
    assert "policy/grad_norm" not in metrics and metrics["update/nonfinite"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, work.policy.actor_parameters()))


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_ppo_and_trpo_with_a_critic_take_the_filter(tiny_lm, task_file, algo):
    """A whole update with a value head (GAE; TRPO's value regression too) on the filtered batch
    lands where the update on the kept rows alone does: the surrogate, the KL bound and the value
    loss all skip the cut completions."""
    cfg = lm_config(tiny_lm, task_file, algo=algo, use_value_head=True, overlong_filter=True, share_prompts=False,
                    **({"fvp_fraction": 1.0, "max_kl": 0.05} if algo == "trpo" else {}))
    work = LMWorkload(cfg, seed=0)
    start = {k: v.clone() for k, v in work.policy.state_dict().items()}
    batch = advantages.compute(work.collect()[0].replace(length_truncated=torch.tensor([1.0, 0, 0, 0, 1, 0])), cfg)
    trainable = lambda: torch.cat([p.detach().reshape(-1).clone()  # noqa: E731
                                   for p in work.policy.parameters() if p.requires_grad])
    after = []
    for b in (batch, batch.select_rows(torch.tensor([1, 2, 3, 5]))):
        work.policy.load_state_dict(start)
        before = trainable()
        opts = ALGOS[algo].make_optimizers(work.policy, cfg)
        metrics = ALGOS[algo].update(work.policy, opts, b, cfg, Progress(1.0, torch.Generator().manual_seed(1)))
        assert metrics.get("trpo/accepted", 1.0) == 1.0, metrics
        after.append(trainable())
    assert (after[0] - before).abs().max() > 1e-5
    torch.testing.assert_close(after[0], after[1], atol=1e-6, rtol=1e-4)


def test_collect_shapes_rewards_logs_the_parts_and_evaluation_stays_the_tasks(tiny_lm, task_file):
    """With overlong_buffer, every completion's score is its task reward plus the punishment of its
    length; train/reward_mean stays the task's, train/reward/overlong is the punishment's mean,
    train/truncated_share the share of cut completions; evaluation's reward is the task's alone."""
    cfg = lm_config(tiny_lm, task_file, overlong_buffer=2, kl_coef=0.0)  # the task's max_new_tokens: 6
    work = LMWorkload(cfg, seed=0)
    batch, metrics = work.collect()
    lengths = batch.mask.sum(1)
    punishment = overlong_penalty(lengths, 6, 2, 1.0)
    assert punishment.min() < 0  # the tiny model seldom samples EOS: most completions reach the limit
    scores = (batch.rewards * batch.mask).sum(1)
    assert metrics["train/reward/overlong"] == pytest.approx(punishment.mean().item(), abs=1e-6)
    assert scores.mean().item() == pytest.approx(metrics["train/reward_mean"] + metrics["train/reward/overlong"],
                                                 abs=1e-5)
    cut = length_truncated(batch.actions, batch.mask, work.policy.eos_ids, 6)
    assert torch.equal(batch.length_truncated, cut)
    assert metrics["train/truncated_share"] == pytest.approx(cut.mean().item())
    shaped = work.evaluate("validation")
    work.cfg = dataclasses.replace(cfg, overlong_buffer=0)
    assert work.evaluate("validation")["eval/reward_mean"] == shaped["eval/reward_mean"]
    assert "train/reward/overlong" not in work.collect()[1]


# --- the config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys, message", [
    ({"overlong_buffer": 6}, "overlong_buffer=6 must be below max_new_tokens=6"),
    ({"overlong_buffer": -1}, "overlong_buffer must be >= 0"),
    ({"overlong_buffer": 2, "overlong_penalty": -0.5}, "overlong_penalty must be >= 0"),
    ({"overlong_penalty": 0.5}, "overlong_penalty sizes the soft overlong punishment, which is off"),
])
def test_overlong_keys_out_of_range_are_refused_in_one_line(tiny_lm, task_file, keys, message):
    with pytest.raises(ConfigError, match=message):
        lm_config(tiny_lm, task_file, **keys)


def test_control_runs_and_multi_turn_tasks_refuse_the_overlong_keys(tiny_lm):
    with pytest.raises(ConfigError, match="overlong_filter is a language-model key"):
        resolve({}, {"overlong_filter": True}, {"env": "CartPole-v1"})
    cfg = resolve({}, {"overlong_filter": True, "max_new_tokens": 4},
                  {"task": "guess-number", "model": str(tiny_lm), "algo": "reinforce"})
    with pytest.raises(ConfigError, match="overlong_filter act on single completions .* multi-turn"):
        LMWorkload(cfg, seed=0)  # before the model loads


@pytest.mark.parametrize("algo", ["reinforce", "ppo", "trpo"])
def test_every_algorithm_accepts_the_overlong_keys(tiny_lm, task_file, algo):
    cfg = lm_config(tiny_lm, task_file, algo=algo, overlong_filter=True, overlong_buffer=3, overlong_penalty=0.5)
    assert (cfg.overlong_filter, cfg.overlong_buffer, cfg.overlong_penalty) == (True, 3, 0.5)


def test_the_dapo_recipe_sizes_the_buffer_from_max_new_tokens(tiny_lm, task_file):
    """A fifth of the run's max_new_tokens (the task's, or the user's), rounded down; the user's own
    buffer wins; a multi-turn task gets none."""
    flags = {"task": str(task_file), "model": str(tiny_lm)}
    assert resolve({}, {"recipe": "dapo"}, flags).overlong_buffer == 1  # the task's max_new_tokens: 6
    assert resolve({}, {"recipe": "dapo", "max_new_tokens": 512}, flags).overlong_buffer == 102
    assert resolve({}, {"recipe": "dapo", "max_new_tokens": 4}, flags).overlong_buffer == 0
    assert resolve({}, {"recipe": "dapo", "max_new_tokens": 512, "overlong_buffer": 64}, flags).overlong_buffer == 64
    assert resolve({}, {"recipe": "dapo", "max_new_tokens": 512}, flags).overlong_filter is False
    turns = resolve({}, {"recipe": "dapo", "max_new_tokens": 20}, {**flags, "task": "guess-number"})
    assert turns.overlong_buffer == 0 and turns.dynamic_sampling is False  # the loss side alone
    assert resolve({}, {"recipe": "dapo"}, flags).dynamic_sampling is True
    assert resolve({}, {"recipe": "grpo", "max_new_tokens": 512}, flags).overlong_buffer == 0

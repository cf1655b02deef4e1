"""The sampling contract: what was sampled is what is trained. The generator samples with our
processors only (never a model's own generation_config), records the sampler's log-probs, the
update measures the sampler/trainer gap (train/sampler_kl) and can correct for it
(behaviour_correction), whose expected gradients are checked on enumerable toy categoricals."""
import dataclasses
import itertools
import math

import pytest
import torch

from policygrad.algos import ALGOS, Progress
from policygrad.batch import Batch
from policygrad.config import ConfigError
from policygrad.resolve import resolve
from policygrad.core import advantages
from policygrad.core.losses import POLICY_LOSSES, behaviour_weights, trpo_surrogate
from policygrad.lm.rollout import LMWorkload


@pytest.fixture(scope="module")
def penalised_lm(tmp_path_factory):
    """The tiny LM whose own generation_config asks for a repetition_penalty of 1.5 (Qwen2.5-Instruct
    ships 1.05): a processor the training pass never applies."""
    from lm_helpers import make_tiny_lm
    from transformers import GenerationConfig
    path = make_tiny_lm(tmp_path_factory.mktemp("penalised") / "tiny")
    config = GenerationConfig.from_pretrained(path)
    config.repetition_penalty = 1.5
    config.save_pretrained(path)
    return path


def lm_config(model, task_file, **overrides):
    values = {"prompts_per_step": 2, "samples_per_prompt": 3, "max_new_tokens": 12, "eval_prompts": 2,
              "logprob_chunk": 4, "lr": 1e-3, **overrides}
    return resolve({}, values, {"task": str(task_file), "model": str(model), "algo": overrides.get("algo", "ppo")})


def test_sampling_ignores_the_models_own_processors(penalised_lm, task_file):
    cfg = lm_config(penalised_lm, task_file)
    work = LMWorkload(cfg, seed=0)
    assert work.policy.model.generation_config.repetition_penalty == 1.5
    batch = work.policy.generate(["say it again and again", "a"] * 3, cfg, seed=4)
    with torch.no_grad():
        trainer = work.policy.log_prob(batch)
    assert batch.mask.sum() > 12
    # the penalty would move sampled tokens' log-probs by up to ~0.07 nats (issue #23)
    torch.testing.assert_close(batch.behaviour_log_prob, trainer, atol=1e-5, rtol=0)
    assert torch.equal(batch.log_prob, batch.behaviour_log_prob)  # float32: the sampler is exact
    assert work.policy.model.generation_config.repetition_penalty == 1.5  # restored after sampling
    # --model-defaults (`sample` only) does apply it: the sampler's numbers then leave the trainer's
    shaped = work.policy.generate(["say it again and again", "a"] * 3, cfg, seed=4, model_defaults=True)
    with torch.no_grad():
        gap = (shaped.behaviour_log_prob - work.policy.log_prob(shaped)).abs().max()
    assert gap > 1e-3


def test_ppo_first_ratio_is_one_and_the_sampler_gap_is_zero_in_float32(penalised_lm, task_file):
    cfg = lm_config(penalised_lm, task_file, n_epochs=1, batch_size=6)
    work = LMWorkload(cfg, seed=0)
    batch, _ = work.collect()
    batch = advantages.compute(batch, cfg)
    opts = ALGOS["ppo"].make_optimizers(work.policy, cfg)
    metrics = ALGOS["ppo"].update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    assert metrics["policy/clip_fraction"] == 0.0 and abs(metrics["policy/approx_kl"]) < 1e-10
    assert metrics["train/sampler_kl"] < 1e-10 and metrics["train/sampler_ratio_outside"] == 0.0


def test_an_exact_sampler_makes_every_correction_the_plain_update(tiny_lm, task_file):
    """w = 1 exactly when the sampler is exact (float32): tis and mis change nothing, bit for bit."""
    weights = {}
    for correction in ("none", "tis", "mis"):
        cfg = lm_config(tiny_lm, task_file, algo="reinforce", behaviour_correction=correction,
                        behaviour_level="sequence")
        work = LMWorkload(cfg, seed=0)
        batch = advantages.compute(work.collect()[0], cfg)
        opts = ALGOS["reinforce"].make_optimizers(work.policy, cfg)
        metrics = ALGOS["reinforce"].update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator()))
        if correction != "none":
            assert metrics["policy/behaviour_weight"] == 1.0 and metrics["policy/behaviour_bounded"] == 0.0
        weights[correction] = torch.cat([p.detach().flatten() for p in work.policy.actor_parameters()])
    assert torch.equal(weights["none"], weights["tis"]) and torch.equal(weights["none"], weights["mis"])


def test_bfloat16_sampling_records_its_own_log_probs_and_the_gap_shows(tiny_lm, task_file):
    cfg = lm_config(tiny_lm, task_file, algo="reinforce", dtype="bfloat16")
    work = LMWorkload(cfg, seed=0)
    batch = advantages.compute(work.collect()[0], cfg)
    assert batch.behaviour_log_prob is not None
    assert not torch.equal(batch.behaviour_log_prob, batch.log_prob)  # old: the training pass's
    opts = ALGOS["reinforce"].make_optimizers(work.policy, cfg)
    metrics = ALGOS["reinforce"].update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator()))
    assert metrics["train/sampler_kl"] > 0


def test_behaviour_cap_must_be_above_one(tiny_lm, task_file):
    with pytest.raises(ConfigError, match="behaviour_cap"):
        lm_config(tiny_lm, task_file, behaviour_cap=1.0)


# --- the correction's expected gradients, enumerated ----------------------------------------------
K = 3
ADV = torch.tensor([1.0, -0.5, 2.0])          # the advantage of each action


def policy_and_sampler():
    theta = torch.tensor([0.2, -0.4, 0.7], requires_grad=True)
    sampler_logits = theta.detach() + torch.tensor([0.9, -0.6, 0.1])   # a sampler off the trainer
    return theta, torch.log_softmax(sampler_logits, -1)


def expected_gradient(loss_of, sequences, theta, sampler_lp):
    """sum over every sequence of sampler probability x the gradient of the loss on that sequence
    alone: the expectation, over the sampler's draws, of the update's gradient."""
    total = torch.zeros_like(theta)
    for seq in sequences:
        lp = torch.log_softmax(theta, -1)[list(seq)][None]               # (1, T) trainer log-probs
        behaviour = sampler_lp[list(seq)][None]                           # (1, T)
        batch = Batch(obs=torch.zeros(1, len(seq)), actions=torch.tensor([seq]), log_prob=lp.detach(),
                      behaviour_log_prob=behaviour, rewards=torch.zeros(1, len(seq)),
                      terminated=torch.zeros(1, len(seq)), truncated=torch.zeros(1, len(seq)),
                      mask=torch.ones(1, len(seq)), advantages=ADV[list(seq)].sum().expand(1, len(seq)))
        grad, = torch.autograd.grad(loss_of(lp, batch), theta)
        total += behaviour.sum().exp() * grad
    return total


def on_policy_gradient(theta, T):
    """-grad E_{pi_theta}[sum_t A(a_t)] over T independent draws: every token's log-prob times the
    sequence's advantage, weighted by pi_theta's own probability."""
    total = torch.zeros_like(theta)
    for seq in itertools.product(range(K), repeat=T):
        lp = torch.log_softmax(theta, -1)[list(seq)]
        grad, = torch.autograd.grad(-(lp.sum() * ADV[list(seq)].sum()), theta)
        total += lp.detach().sum().exp() * grad
    return total


def cfg_of(correction, level, cap, algo="reinforce"):
    return type("Cfg", (), {"behaviour_correction": correction, "behaviour_level": level, "behaviour_cap": cap,
                            "clip_eps": 0.2})


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_name", ["reinforce", "ppo", "trpo"])
def test_untruncated_correction_gives_the_on_policy_expected_gradient(level, loss_name):
    theta, sampler_lp = policy_and_sampler()
    T = 1 if level == "token" else 2
    loss = trpo_surrogate if loss_name == "trpo" else (lambda lp, b, c: POLICY_LOSSES[loss_name](lp, b, c)[0])
    if level == "token":
        sequences = [(a,) for a in range(K)]
    else:
        sequences = list(itertools.product(range(K), repeat=T))
    loss_fn = lambda lp, b: loss(lp, b, cfg_of("tis", level, math.inf))  # noqa: E731
    corrected = expected_gradient(loss_fn, sequences, theta, sampler_lp)
    expected = on_policy_gradient(theta, T) / T  # per-token mean of a T-token sequence
    torch.testing.assert_close(corrected, expected, atol=1e-6, rtol=1e-5)
    plain = expected_gradient(lambda lp, b: loss(lp, b, cfg_of("none", level, 2.0)), sequences, theta, sampler_lp)
    assert (plain - expected).abs().max() > 1e-2  # uncorrected, the sampler's draws bias it


@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_truncated_and_masked_corrections_give_their_documented_biased_forms(correction):
    """tis: sum_a s(a) min(w, cap) A(a) grad log pi(a); mis: the same with w kept only inside
    [1/cap, cap] (and 0 outside)."""
    theta, sampler_lp = policy_and_sampler()
    cap = 1.3
    pi = torch.softmax(theta.detach(), -1)
    w = pi / sampler_lp.exp()
    assert (w > cap).any() and ((w < cap) & (w > 1 / cap)).any()          # the bound matters
    bounded = w.clamp(max=cap) if correction == "tis" else torch.where((w >= 1 / cap) & (w <= cap), w, 0 * w)
    hand = torch.zeros_like(theta)
    for a in range(K):
        grad_log_pi, = torch.autograd.grad(torch.log_softmax(theta, -1)[a], theta)
        hand -= sampler_lp[a].exp() * bounded[a] * ADV[a] * grad_log_pi
    got = expected_gradient(lambda lp, b: POLICY_LOSSES["reinforce"](lp, b, cfg_of(correction, "token", cap))[0],
                            [(a,) for a in range(K)], theta, sampler_lp)
    torch.testing.assert_close(got, hand, atol=1e-6, rtol=1e-5)


def test_behaviour_levels_on_a_hand_table():
    old = torch.tensor([[-1.0, -2.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # log w per token: 0.5, -1.0 (padding 0)
    token = behaviour_weights(old, sampler, mask, "tis", "token", math.inf)
    torch.testing.assert_close(token, torch.tensor([[math.exp(0.5), math.exp(-1.0), 0.0]]))
    sequence = behaviour_weights(old, sampler, mask, "tis", "sequence", math.inf)
    torch.testing.assert_close(sequence, torch.tensor([[math.exp(-0.5)] * 2 + [0.0]]))
    geometric = behaviour_weights(old, sampler, mask, "tis", "geometric", math.inf)
    torch.testing.assert_close(geometric, torch.tensor([[math.exp(-0.25)] * 2 + [0.0]]))
    masked = behaviour_weights(old, sampler, mask, "mis", "token", 1.5)
    torch.testing.assert_close(masked, torch.tensor([[0.0, 0.0, 0.0]]))  # e^0.5 > 1.5, e^-1 < 1/1.5
    truncated = behaviour_weights(old, sampler, mask, "tis", "token", 1.5)
    torch.testing.assert_close(truncated, torch.tensor([[1.5, math.exp(-1.0), 0.0]]))


@pytest.mark.parametrize("algo", ["reinforce", "ppo", "trpo"])
def test_the_correction_crosses_every_algorithm_on_bfloat16_episodes(algo, tiny_lm):
    """Multi-turn episodes sampled under bfloat16 autocast (a sampler that is not exact): every
    algorithm measures the gap and weighs its update by the masked sequence-level w."""
    cfg = resolve({}, {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 3, "max_turns": 2,
                       "eval_prompts": 2, "lr": 1e-3, "dtype": "bfloat16", "behaviour_correction": "mis",
                       "behaviour_level": "sequence", "kl_in": "reward",
                       **({"batch_size": 2} if algo == "ppo" else {})},
                  {"task": "guess-number", "model": str(tiny_lm), "algo": algo})
    work = LMWorkload(cfg, seed=0)
    batch = advantages.compute(work.collect()[0], cfg)
    assert batch.turn is not None and not torch.equal(batch.behaviour_log_prob, batch.log_prob)
    opts = ALGOS[algo].make_optimizers(work.policy, cfg)
    metrics = ALGOS[algo].update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    assert metrics["train/sampler_kl"] > 0 and math.isfinite(metrics["train/sampler_kl"])
    if algo != "trpo":  # TRPO's surrogate returns no metrics of its own
        assert 0 < metrics["policy/behaviour_weight"] and 0 <= metrics["policy/behaviour_bounded"] <= 1

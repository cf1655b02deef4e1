"""KL(policy || reference) as a loss term and as a reward penalty: exact expected gradients by
enumerating every action of small categoricals, compared with autograd of the true KL; the
adaptive controller on a hand-computed sequence; loss mode uses the controller's coefficient."""
import itertools
import json

import pytest
import torch

from lm_helpers import make_tiny_lm, write_task
from policygrad.core.losses import kl_loss
from policygrad.batch import Batch
from policygrad.config import Config, ConfigError
from policygrad.resolve import resolve
from policygrad.core import advantages
from policygrad.core.losses import KL_ESTIMATORS, KL_REWARD_EXACT, POLICY_LOSSES, categorical_kl
from policygrad.lm.rollout import LMWorkload
from policygrad.lm.scoring import KLController, shaped_rewards

K = 4
REF_LOGITS = torch.tensor([0.3, -1.2, 0.8, 0.1])
THETA = torch.tensor([1.0, 0.2, -0.5, 0.4])
OLD_THETA = torch.tensor([0.6, 0.5, -0.2, 0.0])  # the collecting policy, for off-policy checks


def one_token_batch(action: int, old_log_prob: float, ref_log_prob: float, kl_coef: float) -> Batch:
    """One completion of one token: `action`, drawn by a policy with old_log_prob."""
    z = torch.zeros(1, 1)
    return Batch(obs=z, actions=torch.tensor([[action]]), log_prob=torch.tensor([[old_log_prob]]),
                 rewards=z, terminated=torch.ones(1, 1), truncated=z, mask=torch.ones(1, 1),
                 ref_log_prob=torch.tensor([[ref_log_prob]]), group=torch.zeros(1, dtype=torch.long),
                 baseline=torch.zeros(1), kl_coef=kl_coef)


def true_kl_grad(theta: torch.Tensor) -> torch.Tensor:
    """Autograd of the exact KL(pi_theta || ref) over the vocabulary."""
    theta = theta.clone().requires_grad_()
    categorical_kl(theta, REF_LOGITS).backward()
    return theta.grad


def expected_grad(per_action_loss, theta: torch.Tensor, sampler_logits: torch.Tensor) -> torch.Tensor:
    """sum_a p_sampler(a) * grad_theta loss(a): the exact expectation of a per-sample gradient."""
    p = torch.softmax(sampler_logits, -1)
    total = torch.zeros(K)
    for a in range(K):
        th = theta.clone().requires_grad_()
        per_action_loss(th, a).backward()
        total += p[a] * th.grad
    return total


def loss_mode(estimator: str, old_theta: torch.Tensor):
    """The loss the algorithms add with kl_in=loss, for a token sampled from old_theta."""
    cfg = Config(task="t", kl_in="loss", kl_estimator=estimator, advantage="sequence")
    old, ref = torch.log_softmax(old_theta, -1), torch.log_softmax(REF_LOGITS, -1)

    def per_action(theta: torch.Tensor, a: int) -> torch.Tensor:
        log_prob = torch.log_softmax(theta, -1)[a].reshape(1, 1)
        return kl_loss(log_prob, one_token_batch(a, float(old[a]), float(ref[a]), 1.0), cfg)[0]
    return per_action


def reward_mode(estimator: str):
    """REINFORCE's loss when the only reward is the KL penalty (kl_in=reward), on-policy."""
    cfg = Config(task="t", kl_in="reward", kl_estimator=estimator, advantage="sequence", baseline="none",
                 normalize_advantages=False)
    ref = torch.log_softmax(REF_LOGITS, -1)

    def per_action(theta: torch.Tensor, a: int) -> torch.Tensor:
        log_prob = torch.log_softmax(theta, -1)[a].reshape(1, 1)
        batch = one_token_batch(a, float(log_prob.detach()), float(ref[a]), 1.0)
        batch = batch.replace(rewards=shaped_rewards(torch.zeros(1), batch, 1.0, estimator, "reward"))
        return POLICY_LOSSES["reinforce"](log_prob, advantages.compute(batch, cfg), cfg)[0]
    return per_action


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_the_loss_has_the_gradient_of_kl_policy_to_reference(estimator):
    want = true_kl_grad(THETA)
    on_policy = expected_grad(loss_mode(estimator, THETA), THETA, THETA)
    torch.testing.assert_close(on_policy, want, atol=1e-6, rtol=1e-5)
    # PPO's later epochs and TRPO's line search sample from the collecting policy, not the current one
    off_policy = expected_grad(loss_mode(estimator, OLD_THETA), THETA, OLD_THETA)
    torch.testing.assert_close(off_policy, want, atol=1e-6, rtol=1e-5)


def test_differentiating_an_estimator_directly_is_wrong_for_k1_and_k3():
    """What the loss did before: grad of k(sampled token). k1's expectation is 0, k3's is the
    gradient of the reverse KL(ref || pi); only k2's is right. Guards the reason for the forms."""
    ref = torch.log_softmax(REF_LOGITS, -1)

    def naive(estimator):
        return lambda th, a: KL_ESTIMATORS[estimator](ref[a] - torch.log_softmax(th, -1)[a])

    torch.testing.assert_close(expected_grad(naive("k1"), THETA, THETA), torch.zeros(K), atol=1e-6, rtol=0)
    theta = THETA.clone().requires_grad_()
    categorical_kl(REF_LOGITS, theta).backward()  # KL(ref || pi)
    torch.testing.assert_close(expected_grad(naive("k3"), THETA, THETA), theta.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(expected_grad(naive("k2"), THETA, THETA), true_kl_grad(THETA), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_as_a_reward_is_exact_only_for_k1(estimator):
    got = expected_grad(reward_mode(estimator), THETA, THETA)
    want = true_kl_grad(THETA)
    if estimator in KL_REWARD_EXACT:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    else:  # the score-function gradient drops E[grad k], which is not 0 for k2 and k3
        assert (got - want).norm() > 0.05 * want.norm()


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_a_biased_kl_reward_is_refused(estimator):
    with pytest.raises(ConfigError, match="kl_estimator"):
        resolve({}, {"kl_in": "reward", "kl_estimator": estimator}, {"task": "positive-review", "algo": "reinforce"})
    resolve({}, {"kl_in": "loss", "kl_estimator": estimator}, {"task": "positive-review", "algo": "reinforce"})


def test_one_unit_a_nat_per_completion_weighs_the_same_in_both_modes():
    """Two-token completions from independent per-position categoricals (so the per-token and the
    sequence KL coincide); every completion enumerated. The KL part of REINFORCE's gradient with
    kl_in=reward (k1) and with kl_in=loss (each estimator) is kl_coef / T * grad KL(completion), the
    same in both modes: kl_coef is the price of one nat per completion either way."""
    T, beta = 2, 0.3
    thetas = torch.stack([THETA, OLD_THETA])                            # (T, K) policy logits
    refs = torch.stack([REF_LOGITS, REF_LOGITS.flip(0)])                # (T, K)
    ref_lp = torch.log_softmax(refs, -1)

    def grad_of(kl_in: str, estimator: str) -> torch.Tensor:
        cfg = Config(task="t", kl_in=kl_in, kl_estimator=estimator, advantage="sequence", baseline="none",
                     normalize_advantages=False, kl_coef=beta)
        p = torch.softmax(thetas, -1)
        total = torch.zeros(T, K)
        for seq in itertools.product(range(K), repeat=T):
            th = thetas.clone().requires_grad_()
            log_prob = torch.log_softmax(th, -1)[torch.arange(T), list(seq)].reshape(1, T)  # (1, T)
            z = torch.zeros(1, T)
            batch = Batch(obs=z, actions=torch.tensor([seq]), log_prob=log_prob.detach(), rewards=z,
                          terminated=torch.tensor([[0.0, 1.0]]), truncated=z, mask=torch.ones(1, T),
                          ref_log_prob=ref_lp[torch.arange(T), list(seq)].reshape(1, T),
                          group=torch.zeros(1, dtype=torch.long), baseline=torch.zeros(1), kl_coef=beta)
            batch = advantages.compute(batch.replace(
                rewards=shaped_rewards(torch.zeros(1), batch, beta, estimator, kl_in)), cfg)
            loss = POLICY_LOSSES["reinforce"](log_prob, batch, cfg)[0] + kl_loss(log_prob, batch, cfg)[0]
            loss.backward()
            total += p[torch.arange(T), list(seq)].prod() * th.grad
        return total

    th = thetas.clone().requires_grad_()
    categorical_kl(th, refs).sum().backward()                           # KL of the whole completion
    want = beta / T * th.grad
    torch.testing.assert_close(grad_of("reward", "k1"), want, atol=1e-6, rtol=1e-5)
    for estimator in ("k1", "k2", "k3"):
        torch.testing.assert_close(grad_of("loss", estimator), want, atol=1e-6, rtol=1e-5)


def test_adaptive_controller_follows_ziegler_eq_2_on_a_hand_computed_sequence():
    """beta <- beta * (1 + K_beta * e), e = clip(KL / target - 1, -0.2, 0.2), K_beta = n / horizon."""
    ctl = KLController(Config(task="t", kl_coef=0.1, adaptive_kl=True, kl_target=6.0, kl_horizon=1000))
    expected = 0.1
    for kl, n, e in [(12.0, 16, 0.2), (3.0, 16, -0.2), (6.6, 16, 0.1), (5.4, 32, -0.1), (6.0, 16, 0.0)]:
        ctl.update(kl, n)
        expected *= 1.0 + n / 1000 * e
        assert ctl.coef == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.1 * 1.0032 * 0.9968 * 1.0016 * 0.9968, rel=1e-12)
    fixed = KLController(Config(task="t", kl_coef=0.1, adaptive_kl=False))
    fixed.update(100.0, 16)
    assert fixed.coef == 0.1


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kltask")
    model = make_tiny_lm(folder / "tiny")
    task = write_task(folder, [{"prompt": f"Tell me about {i}."} for i in range(20)],
                      "data: prompts.jsonl\nrewards:\n  - length\nmax_new_tokens: 5\n")
    return model, task


def test_loss_mode_uses_the_adaptive_controllers_coefficient(tiny_task):
    model, task = tiny_task
    cfg = resolve({}, {"prompts_per_step": 2, "samples_per_prompt": 2, "kl_in": "loss", "kl_estimator": "k3",
                       "adaptive_kl": True,
                       "kl_coef": 0.2, "kl_target": 0.001, "kl_horizon": 4, "lr": 1e-2},
                  {"task": str(task), "model": str(model), "algo": "reinforce"})
    work = LMWorkload(cfg, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, so the KL is not 0
        for p in work.policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    work.scoring.kl.coef = 0.37
    batch, metrics = work.collect()
    assert batch.kl_coef == 0.37 and metrics["kl/coef"] == 0.37
    log_prob = work.policy.log_prob(batch)
    term, term_metrics = kl_loss(log_prob, batch, cfg)
    assert term.item() == pytest.approx(0.37 * term_metrics["kl/loss_term"], rel=1e-6)
    assert term_metrics["kl/loss_term"] > 0  # k3 >= 0 on every token
    work.after_update(batch, {})  # the controller's step, from the batch's KL per completion
    error = min(max(metrics["kl/to_reference"] / 0.001 - 1.0, -0.2), 0.2)
    assert work.scoring.kl.coef == pytest.approx(0.37 * (1.0 + error * 4 / 4), rel=1e-9)
    assert work.scoring.kl.coef != 0.37
    assert work.collect()[0].kl_coef == work.scoring.kl.coef

"""Policy losses, value loss and KL estimators on hand-computed cases."""
import dataclasses
import math

import pytest
import torch

from policygrad.batch import Batch
from policygrad.config import Config
from policygrad.core import losses


def batch(old_log_prob, advantages, mask=None, values=None, returns=None):
    old_log_prob = torch.tensor([old_log_prob])
    z = torch.zeros_like(old_log_prob)
    return Batch(obs=z[..., None], actions=z, log_prob=old_log_prob, rewards=z, terminated=z, truncated=z,
                 mask=torch.ones_like(z) if mask is None else torch.tensor([mask]),
                 advantages=torch.tensor([advantages]),
                 values=None if values is None else torch.tensor([values]),
                 returns=None if returns is None else torch.tensor([returns]))


def test_ppo_loss_is_the_unclipped_surrogate_when_ratio_is_one():
    b = batch([-1.0, -2.0, -0.5], [1.0, -2.0, 4.0])
    log_prob = b.log_prob.clone().requires_grad_()
    loss, metrics = losses.ppo_clip_loss(log_prob, b, Config(clip_eps=0.2))
    assert loss.item() == -(1.0 - 2.0 + 4.0) / 3
    assert metrics["policy/clip_fraction"] == 0.0
    assert metrics["policy/approx_kl"] == 0.0
    loss.backward()  # d/dlogp of ratio * A at ratio 1 is A
    torch.testing.assert_close(log_prob.grad, -b.advantages / 3)


def test_ppo_loss_clips_pessimistically():
    # ratios 1.5 (A>0: clipped to 1.2) and 0.5 (A<0: min picks the clipped 0.8 * -1 = -0.8)
    b = batch([0.0, 0.0], [1.0, -1.0])
    log_prob = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    loss, metrics = losses.ppo_clip_loss(log_prob, b, Config(clip_eps=0.2))
    assert abs(loss.item() - (-(1.2 - 0.8) / 2)) < 1e-6
    assert metrics["policy/clip_fraction"] == 1.0
    loss.backward()
    assert torch.all(log_prob.grad == 0)  # both clipped terms carry no gradient


def test_losses_ignore_masked_steps():
    b = batch([0.0, 0.0], [1.0, 100.0], mask=[1.0, 0.0])
    loss, _ = losses.reinforce_loss(torch.tensor([[-1.0, -50.0]]), b, Config())
    assert loss.item() == 1.0


def test_reinforce_loss_gradient_is_minus_advantage():
    b = batch([0.0, 0.0], [2.0, -1.0])
    log_prob = torch.zeros(1, 2, requires_grad=True)
    losses.reinforce_loss(log_prob, b, Config())[0].backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-1.0, 0.5]]))


def test_value_loss_clipping():
    b = batch([0.0], [0.0], values=[1.0], returns=[3.0])
    new = torch.tensor([[2.0]])
    assert losses.value_loss(new, b).item() == 1.0
    # clipped prediction 1.5 has error 2.25 > 1.0: the pessimistic max takes it
    assert losses.value_loss(new, b, clip_value_eps=0.5).item() == 2.25


# p = (0.5, 0.3, 0.2), q = (0.2, 0.5, 0.3): every action enumerated, so E_p[.] is exact, not sampled.
P, Q = (0.5, 0.3, 0.2), (0.2, 0.5, 0.3)
# KL(p || q) = 0.5 ln 2.5 + 0.3 ln 0.6 + 0.2 ln(2/3) = 0.458145 - 0.153248 - 0.081093
EXACT_KL = 0.5 * math.log(2.5) + 0.3 * math.log(0.6) + 0.2 * math.log(2 / 3)   # 0.2238047


def expectation_under_p(name: str, log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """E_{x ~ p}[k(log q(x) - log p(x))], summed over every action."""
    return (log_p.exp() * losses.KL_ESTIMATORS[name](log_q - log_p)).sum().item()


def test_kl_estimators_on_hand_computed_values():
    log_ratio = torch.tensor([math.log(0.4), math.log(5 / 3), math.log(1.5)], dtype=torch.float64)  # q/p
    # k1 = -ln(q/p): positive where p > q (action 0), negative where q > p
    torch.testing.assert_close(losses.kl_k1(log_ratio), torch.tensor([0.916291, -0.510826, -0.405465],
                                                                      dtype=torch.float64), atol=1e-6, rtol=0)
    # k2 = (ln(q/p))^2 / 2: 0.839589 / 2, 0.260943 / 2, 0.164402 / 2
    torch.testing.assert_close(losses.kl_k2(log_ratio), torch.tensor([0.419794, 0.130471, 0.082201],
                                                                      dtype=torch.float64), atol=1e-6, rtol=0)
    # k3 = q/p - 1 - ln(q/p): 0.4 - 1 + 0.916291, 5/3 - 1 - 0.510826, 1.5 - 1 - 0.405465
    torch.testing.assert_close(losses.kl_k3(log_ratio), torch.tensor([0.316291, 0.155841, 0.094535],
                                                                      dtype=torch.float64), atol=1e-6, rtol=0)


def test_k1_and_k3_are_unbiased_k2_is_not():
    log_p = torch.tensor(P, dtype=torch.float64).log()
    log_q = torch.tensor(Q, dtype=torch.float64).log()
    assert losses.categorical_kl(log_p, log_q).item() == pytest.approx(EXACT_KL, abs=1e-12)
    assert EXACT_KL == pytest.approx(0.2238047, abs=1e-7)
    assert expectation_under_p("k1", log_p, log_q) == pytest.approx(EXACT_KL, abs=1e-12)
    assert expectation_under_p("k3", log_p, log_q) == pytest.approx(EXACT_KL, abs=1e-12)
    # E_p[k2] = (0.5 * 0.839589 + 0.3 * 0.260943 + 0.2 * 0.164402) / 2 = 0.265479: biased upwards here
    assert expectation_under_p("k2", log_p, log_q) == pytest.approx(0.265479, abs=1e-6)


def test_k2_agrees_with_the_exact_kl_to_second_order_as_q_nears_p():
    """q_eps = softmax(log p + eps * d): KL = O(eps^2) and E_p[k2] - KL = O(eps^3), so halving eps
    divides the error by ~8 while the KL itself falls by ~4."""
    log_p = torch.tensor(P, dtype=torch.float64).log()
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    kls, errors = [], []
    for eps in (0.1, 0.05, 0.025):
        log_q = torch.log_softmax(log_p + eps * direction, -1)
        exact = losses.categorical_kl(log_p, log_q).item()
        kls.append(exact)
        errors.append(expectation_under_p("k2", log_p, log_q) - exact)
        assert expectation_under_p("k1", log_p, log_q) == pytest.approx(exact, rel=1e-9)
        assert expectation_under_p("k3", log_p, log_q) == pytest.approx(exact, rel=1e-9)
    assert all(e != 0 for e in errors)
    for i in (0, 1):
        assert 3.5 < kls[i] / kls[i + 1] < 4.5
        assert 7.0 < errors[i] / errors[i + 1] < 10.0
    assert abs(errors[-1]) / kls[-1] < 0.02  # relative error ~ eps


def test_k2_and_k3_are_nonnegative_per_sample_k1_is_not():
    log_ratio = torch.arange(-80, 81, dtype=torch.float64) / 10  # -8.0, -7.9, ..., 8.0, 0 exactly once
    assert (losses.kl_k2(log_ratio) >= 0).all() and (losses.kl_k3(log_ratio) >= 0).all()
    assert (losses.kl_k1(log_ratio) < 0).any()
    # all three vanish only where q = p
    zero = torch.zeros(1)
    assert all(losses.KL_ESTIMATORS[k](zero).item() == 0.0 for k in ("k1", "k2", "k3"))
    assert (losses.kl_k3(log_ratio[log_ratio != 0]) > 0).all()


def test_gaussian_kl_closed_form():
    kl = losses.gaussian_kl(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]),
                            torch.tensor([math.log(2.0)]))
    # KL(N(0,1) || N(1,4)) = log 2 + (1 + 1) / 8 - 1/2
    assert abs(kl.item() - (math.log(2.0) + 2 / 8 - 0.5)) < 1e-6


# --- the KL term, TRPO's loss and the joint loss ---------------------------------------------------
def kl_batch(log_prob, ref_log_prob, advantages, kl_coef, mask=None):
    """On-policy (old = log_prob) steps with a reference."""
    return batch(log_prob, advantages, mask=mask).replace(ref_log_prob=torch.tensor([ref_log_prob]),
                                                          kl_coef=kl_coef)


def test_kl_loss_on_hand_computed_values():
    # log pi = -1, log ref = -1.5 at both steps: log ratio ref/pi = -0.5; the second step is padding
    b = kl_batch([-1.0, -1.0], [-1.5, -1.5], [0.0, 0.0], kl_coef=0.2, mask=[1.0, 0.0])
    expected = {"k1": 0.5, "k2": 0.5 * 0.25, "k3": math.exp(-0.5) - 1.0 + 0.5}  # k3 = 0.1065307
    for name, kl in expected.items():
        cfg = Config(task="t", kl_in="loss", kl_estimator=name)
        term, metrics = losses.kl_loss(b.log_prob, b, cfg)
        assert term.item() == pytest.approx(0.2 * kl, abs=1e-7)
        assert metrics["kl/loss_term"] == pytest.approx(kl, abs=1e-7)
    # k2's gradient: d/dlog pi of 0.5 (log ref - log pi)^2 = log pi - log ref = 0.5, times kl_coef
    log_prob = b.log_prob.clone().requires_grad_()
    losses.kl_loss(log_prob, b, Config(task="t", kl_in="loss", kl_estimator="k2"))[0].backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([[0.1, 0.0]]))


def test_kl_loss_is_zero_as_a_reward_without_a_reference_or_at_coefficient_zero():
    b = kl_batch([-1.0], [-1.5], [0.0], kl_coef=0.2)
    assert losses.kl_loss(b.log_prob, b, Config(task="t", kl_in="reward")) == (torch.zeros(()), {})
    assert losses.kl_loss(b.log_prob, b.replace(kl_coef=0.0), Config(task="t", kl_in="loss"))[1] == {}
    assert losses.kl_loss(b.log_prob, b.replace(ref_log_prob=None), Config(task="t", kl_in="loss"))[1] == {}


def test_trpo_loss_is_the_surrogate_plus_the_kl_term():
    # on-policy (ratio 1): surrogate -mean(A) = -(1 + 3) / 2 = -2; k1 = 0.5 per step, times 0.2 = 0.1
    b = kl_batch([-1.0, -2.0], [-1.5, -2.5], [1.0, 3.0], kl_coef=0.2)
    log_prob = b.log_prob.clone().requires_grad_()
    loss, metrics = losses.trpo_loss(log_prob, b, Config(task="t", kl_in="loss", kl_estimator="k1"))
    assert loss.item() == pytest.approx(-1.9, abs=1e-6)
    assert metrics == {"kl/loss_term": pytest.approx(0.5, abs=1e-7)}
    loss.backward()
    # surrogate: -A / 2; KL term ratio * k1 through the ratio: (k1 + 1) / 2 * 0.2 = 0.15 per step
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-0.35, -1.35]]))
    assert losses.trpo_loss(b.log_prob, b, Config(task="t", kl_in="reward"))[0].item() == pytest.approx(-2.0)


OPTIONS = losses.JointLoss("reinforce", clip_value=False, baseline_switch=False, entropy_always=False)


def critic_batch():
    """REINFORCE loss -mean(log_prob * A) = -(-1 - 3) / 2 = 2; value errors (2 - 3)^2 = 1, and with
    clip_value_eps 0.5 the clipped prediction 1 + 0.5 has (1.5 - 3)^2 = 2.25."""
    return batch([-1.0, -1.0], [1.0, 3.0], values=[1.0, 1.0], returns=[3.0, 3.0])


def joint(options, cfg, entropy=(0.5, 1.5), values=(2.0, 2.0), measure_sampler=False, b=None):
    b = critic_batch() if b is None else b
    entropy = torch.tensor([entropy], requires_grad=True)
    log_prob = b.log_prob.clone().requires_grad_()
    total, metrics = losses.joint_loss(log_prob, entropy, None if values is None else torch.tensor([values]),
                                       b, cfg, options, measure_sampler)
    return total, metrics, entropy


def test_joint_loss_adds_policy_value_and_entropy_terms():
    total, metrics, _ = joint(OPTIONS, Config(vf_coef=0.5, ent_coef=0.1))
    assert total.item() == pytest.approx(2.0 + 0.5 * 1.0 - 0.1 * 1.0)
    assert metrics == {"policy/loss": 2.0, "value/loss": 1.0, "policy/entropy": 1.0}
    ppo = dataclasses.replace(OPTIONS, policy="ppo")  # ratio 1: -mean(A) = -2
    assert joint(ppo, Config(vf_coef=0.5))[0].item() == pytest.approx(-2.0 + 0.5 * 1.0)
    # no critic, or a critic-free advantage: no value term
    assert "value/loss" not in joint(OPTIONS, Config(), values=None)[1]
    assert "value/loss" not in joint(OPTIONS, Config(task="t", advantage="sequence"))[1]


def test_joint_loss_option_clip_value_clips_the_value_loss_at_clip_value_eps():
    cfg = Config(vf_coef=0.5, clip_value_eps=0.5)
    unclipped, m_unclipped, _ = joint(OPTIONS, cfg)
    clipped, m_clipped, _ = joint(dataclasses.replace(OPTIONS, clip_value=True), cfg)
    assert (m_unclipped["value/loss"], m_clipped["value/loss"]) == (1.0, 2.25)
    assert clipped.item() - unclipped.item() == pytest.approx(0.5 * (2.25 - 1.0))
    # with clip_value_eps unset the option changes nothing
    assert joint(dataclasses.replace(OPTIONS, clip_value=True), Config(vf_coef=0.5))[1]["value/loss"] == 1.0


def test_joint_loss_option_baseline_switch_obeys_value_baseline():
    switch = dataclasses.replace(OPTIONS, baseline_switch=True)
    off, on = Config(value_baseline=False), Config(value_baseline=True)
    assert "value/loss" not in joint(switch, off)[1]  # REINFORCE with its baseline switched off
    assert joint(switch, off)[0].item() == 2.0
    assert joint(switch, on)[1]["value/loss"] == 1.0
    assert joint(OPTIONS, off)[1]["value/loss"] == 1.0  # PPO's critic: value_baseline is not its switch


def test_joint_loss_option_entropy_always_keeps_the_entropy_term_at_ent_coef_zero():
    always = dataclasses.replace(OPTIONS, entropy_always=True)
    total, _, entropy = joint(always, Config(ent_coef=0.0))
    total.backward()
    torch.testing.assert_close(entropy.grad, torch.zeros(1, 2))  # in the graph, weighed 0
    total, _, entropy = joint(OPTIONS, Config(ent_coef=0.0))
    total.backward()
    assert entropy.grad is None  # not in the graph at all
    # so a non-finite entropy poisons only the loss that always adds it
    assert math.isnan(joint(always, Config(ent_coef=0.0), entropy=(math.nan, 1.0))[0].item())
    assert joint(OPTIONS, Config(ent_coef=0.0), entropy=(math.nan, 1.0))[0].item() == 2.5


def test_joint_loss_option_entropy_always_sets_the_order_of_the_float_sum():
    """In float32, 2^24 + 1 rounds to 2^24: policy loss 1, entropy term 1, value term 2^24 give
    (1 - 1) + 2^24 = 2^24 with the entropy first, and (1 + 2^24) - 1 = 2^24 - 1 with it last."""
    b = batch([-1.0], [1.0], values=[0.0], returns=[0.0])  # REINFORCE loss 1; value error 4096^2 = 2^24
    cfg = Config(ent_coef=1.0, vf_coef=1.0)
    first = joint(dataclasses.replace(OPTIONS, entropy_always=True), cfg, entropy=(1.0,), values=(4096.0,), b=b)
    last = joint(OPTIONS, cfg, entropy=(1.0,), values=(4096.0,), b=b)
    assert (first[0].item(), last[0].item()) == (2.0 ** 24, 2.0 ** 24 - 1)


def test_joint_loss_measures_the_sampler_only_when_asked():
    b = critic_batch().replace(behaviour_log_prob=torch.tensor([[-1.0, -1.0]]))
    assert joint(OPTIONS, Config(), b=b, measure_sampler=True)[1]["train/sampler_kl"] == 0.0
    assert "train/sampler_kl" not in joint(OPTIONS, Config(), b=b)[1]


def test_reinforce_and_ppo_use_the_joint_loss_with_their_own_options():
    from policygrad import algos
    assert algos.REINFORCE_LOSS == losses.JointLoss("reinforce", clip_value=False, baseline_switch=True,
                                                    entropy_always=True)
    assert algos.PPO_LOSS == losses.JointLoss("ppo", clip_value=True, baseline_switch=False, entropy_always=False)

"""Policy losses, value loss and KL estimators on hand-computed cases."""
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

"""Policy losses, value loss and KL estimators on hand-computed cases."""
import math

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


def test_kl_estimators_match_exact_kl_in_expectation():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = losses.categorical_kl(p.log(), q.log()).item()
    assert abs(exact - (p * (p / q).log()).sum().item()) < 1e-7
    log_ratio = q.log() - p.log()  # samples x ~ p weighted by p: the exact expectation
    for name in ("k1", "k3"):  # unbiased
        est = (p * losses.KL_ESTIMATORS[name](log_ratio)).sum().item()
        assert abs(est - exact) < 1e-6, name
    assert (losses.kl_k3(log_ratio) >= 0).all()
    assert abs(losses.kl_k2(torch.tensor(0.3)).item() - 0.5 * 0.3 ** 2) < 1e-7


def test_gaussian_kl_closed_form():
    kl = losses.gaussian_kl(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]),
                            torch.tensor([math.log(2.0)]))
    # KL(N(0,1) || N(1,4)) = log 2 + (1 + 1) / 8 - 1/2
    assert abs(kl.item() - (math.log(2.0) + 2 / 8 - 0.5)) < 1e-6

"""Advantage estimators on hand-computed cases."""
import pytest
import torch

from policygrad.batch import Batch
from policygrad.config import Config
from policygrad.core import advantages as adv
from policygrad.core import losses


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_mixes_termination_and_truncation():
    # step 1 is truncated (bootstrap from the final obs value 0.7), step 3 terminated (no bootstrap).
    rewards = t([1.0, 1.0, 1.0, 1.0])
    values = t([0.5, 0.4, 0.3, 0.2])
    next_values = t([0.4, 0.7, 0.2, 9.9])
    terminated = t([0.0, 0.0, 0.0, 1.0])
    truncated = t([0.0, 1.0, 0.0, 0.0])
    a, r = adv.gae(rewards, values, next_values, terminated, truncated, gamma=0.9, gae_lambda=0.8)
    # deltas: 0.86, 1.23, 0.88, 0.80; gamma * lambda = 0.72
    expected = t([0.86 + 0.72 * 1.23, 1.23, 0.88 + 0.72 * 0.8, 0.8])
    torch.testing.assert_close(a, expected)
    torch.testing.assert_close(r, expected + values)


def test_gae_lambda_one_equals_monte_carlo_minus_value():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.rand(3, 7, generator=g), torch.rand(3, 7, generator=g)
    next_values = torch.cat([values[:, 1:], torch.rand(3, 1, generator=g)], 1)
    terminated = torch.zeros(3, 7)
    terminated[0, 3] = 1.0
    truncated = torch.zeros(3, 7)
    truncated[1, 2] = 1.0
    next_values[1, 2] = 5.0
    a, _ = adv.gae(rewards, values, next_values, terminated, truncated, 0.95, 1.0)
    mc = adv.discounted_returns(rewards, terminated, truncated, 0.95, next_values)
    torch.testing.assert_close(a, mc - values)


def test_discounted_returns_bootstrap_only_where_cut():
    rewards = t([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0])
    terminated = t([0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0])
    truncated = t([0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    next_values = t([0.0, 0.7, 0.0, 9.9], [0.0, 0.0, 0.0, 2.0])
    r = adv.discounted_returns(rewards, terminated, truncated, 0.9, next_values)
    torch.testing.assert_close(r[0], torch.tensor([1 + 0.9 * 1.63, 1.63, 1.9, 1.0]))
    # row 2: the rollout ends without a done: bootstrap from next_values[:, -1] = 2.0
    torch.testing.assert_close(r[1], torch.tensor([1 + 0.9 * 2.458, 1 + 0.9 * 1.62, 0.9 * 1.8, 0.9 * 2.0]))
    # without a critic nothing is bootstrapped
    r0 = adv.discounted_returns(rewards, terminated, truncated, 0.9)
    torch.testing.assert_close(r0[0], torch.tensor([1.9, 1.0, 1.9, 1.0]))


def test_normalize_ignores_padding():
    x = t([1.0, 2.0, 3.0, 100.0])
    mask = t([1.0, 1.0, 1.0, 0.0])
    n = adv.normalize(x, mask)
    assert n[0, 3] == 0.0
    torch.testing.assert_close(n[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)


def _batch(values=None, next_values=None):
    rewards = t([1.0, 1.0, 1.0])
    zeros = torch.zeros_like(rewards)
    return Batch(obs=torch.zeros(1, 3, 1), actions=torch.zeros(1, 3), log_prob=zeros, rewards=rewards,
                 terminated=t([0.0, 0.0, 1.0]), truncated=zeros, mask=torch.ones_like(rewards),
                 values=values, next_values=next_values)


def test_monte_carlo_estimator_with_and_without_baseline():
    values = t([0.5, 0.5, 0.5])
    cfg = Config(advantage="mc", gamma=1.0, normalize_advantages=False)
    out = adv.compute(_batch(values, values), cfg)
    torch.testing.assert_close(out.returns, t([3.0, 2.0, 1.0]))
    torch.testing.assert_close(out.advantages, t([2.5, 1.5, 0.5]))
    out = adv.compute(_batch(values, values), Config(advantage="mc", gamma=1.0, value_baseline=False,
                                                      normalize_advantages=False))
    torch.testing.assert_close(out.advantages, t([3.0, 2.0, 1.0]))


def test_gae_needs_a_critic():
    with pytest.raises(ValueError, match="critic"):
        adv.compute(_batch(), Config(advantage="gae"))


def _fitted_value(bootstrap: bool, gamma: float = 0.9, horizon: int = 10) -> float:
    """Fit a critic as a trainer does (targets from the current critic, then Adam on value_loss,
    repeated until the value settles) on an endless reward-1 task of one observation whose episodes a
    time limit cuts every `horizon` steps; the cut is a truncation (bootstrap) or, wrongly, a termination."""
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(critic.parameters(), lr=0.05)
    B, T = 2, 4 * horizon
    cut = torch.zeros(B, T)
    cut[:, horizon - 1::horizon] = 1.0                                  # (B, T) time limit
    ones, zeros = torch.ones(B, T), torch.zeros(B, T)
    terminated, truncated = (zeros, cut) if bootstrap else (cut, zeros)
    obs = torch.ones(B, T, 1)                                           # (B, T, 1) the one observation
    cfg = Config(advantage="gae", gamma=gamma, gae_lambda=1.0, normalize_advantages=False)
    v = float("nan")
    for _ in range(200):
        with torch.no_grad():  # the next observation is the same one, also after a cut
            values = critic(obs).squeeze(-1)                            # (B, T)
        batch = adv.compute(Batch(obs=obs, actions=zeros, log_prob=zeros, rewards=ones, terminated=terminated,
                                  truncated=truncated, mask=ones, values=values, next_values=values), cfg)
        for _ in range(20):
            loss = losses.value_loss(critic(batch.obs).squeeze(-1), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        previous, v = v, critic(torch.ones(1)).item()
        if abs(v - previous) < 1e-3:
            break
    return v


def test_value_reaches_one_over_one_minus_gamma_only_when_truncation_bootstraps():
    gamma, horizon = 0.9, 10
    assert _fitted_value(bootstrap=True, gamma=gamma, horizon=horizon) == pytest.approx(1 / (1 - gamma), rel=0.05)
    # Cut as a termination, the one observation is worth the mean finite-horizon return of its steps.
    finite = sum((1 - gamma ** n) / (1 - gamma) for n in range(1, horizon + 1)) / horizon  # 4.14
    assert _fitted_value(bootstrap=False, gamma=gamma, horizon=horizon) == pytest.approx(finite, rel=0.05)


def test_minibatches_keep_groups_whole_when_they_fit():
    from policygrad.batch import Batch
    B, T = 12, 3
    zeros = torch.zeros(B, T)
    batch = Batch(obs=torch.arange(B).repeat_interleave(T).view(B, T), actions=zeros, log_prob=zeros, rewards=zeros,
                  terminated=zeros, truncated=zeros, mask=torch.ones(B, T), group=torch.arange(4).repeat_interleave(3))
    g = torch.Generator().manual_seed(0)
    rows = [mb.obs[:, 0].tolist() for mb in batch.minibatches(6, g)]
    assert sorted(sum(rows, [])) == list(range(B))  # every row once
    for mb_rows in rows:  # two whole groups of 3 consecutive rows each
        groups = sorted({r // 3 for r in mb_rows})
        assert len(groups) == 2 and sorted(mb_rows) == [r for grp in groups for r in range(3 * grp, 3 * grp + 3)]
    # sizes that would split a group fall back to row shuffling
    rows = [mb.obs[:, 0].tolist() for mb in batch.minibatches(4, g)]
    assert sorted(sum(rows, [])) == list(range(B)) and [len(r) for r in rows] == [4, 4, 4]

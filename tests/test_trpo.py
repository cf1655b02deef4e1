"""The TRPO solver: conjugate gradient, Fisher-vector products, step scaling and line search."""
import math

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from policygrad.core import losses, trpo


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x, ax = trpo.conjugate_gradient(lambda v: a @ v, b, iters=20, tol=1e-20)
    assert torch.linalg.norm(a @ x - b) < 1e-6
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def test_conjugate_gradient_returns_a_x_even_when_stopped_early():
    # after 2 of 6 iterations x is not the solution, but the returned A x must still be A @ x
    g = torch.Generator().manual_seed(1)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x, ax = trpo.conjugate_gradient(lambda v: a @ v, b, iters=2)
    assert torch.linalg.norm(a @ x - b) > 1e-3
    torch.testing.assert_close(ax, a @ x)


def _exact_hessian(kl_of_flat, flat):
    return torch.autograd.functional.hessian(kl_of_flat, flat)


def test_fisher_vector_product_is_kl_hessian_categorical():
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)  # logits = x @ w
    x = torch.randn(5, 3, dtype=torch.float64)
    old_logits = (x @ w).detach()

    def kl_of(weights):
        return losses.categorical_kl(old_logits, x @ weights.reshape(3, 4)).mean()

    fvp = trpo.fisher_vector_product(lambda: kl_of(w), [w], damping=0.0)
    h = _exact_hessian(kl_of, w.detach().reshape(-1))
    for seed in range(3):
        v = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(fvp(v), h @ v)
    damped = trpo.fisher_vector_product(lambda: kl_of(w), [w], damping=0.1)
    torch.testing.assert_close(damped(v), h @ v + 0.1 * v)


def test_fisher_vector_product_is_kl_hessian_gaussian():
    torch.manual_seed(1)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 3, dtype=torch.float64)
    old_mean, old_log_std = (x @ w).detach(), log_std.detach().clone()

    def kl_of(flat):
        return losses.gaussian_kl(old_mean, old_log_std, x @ flat[:6].reshape(3, 2), flat[6:]).mean()

    fvp = trpo.fisher_vector_product(lambda: kl_of(torch.cat([w.reshape(-1), log_std])), [w, log_std], 0.0)
    h = _exact_hessian(kl_of, torch.cat([w.detach().reshape(-1), log_std.detach()]))
    v = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fvp(v), h @ v)


def _quadratic_problem():
    """A 'policy' theta with surrogate loss -theta . g and KL = 0.5 theta^T F theta (from theta0 = 0)."""
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    fisher = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    g = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss_fn = lambda: -(theta @ g)
    kl_fn = lambda: 0.5 * theta @ fisher @ theta
    return theta, fisher, g, loss_fn, kl_fn


def test_trpo_step_lands_on_the_trust_region_boundary_along_natural_gradient():
    theta, fisher, g, loss_fn, kl_fn = _quadratic_problem()
    metrics = trpo.trpo_step([theta], [(1.0, loss_fn)], [(1.0, kl_fn)], lambda: (loss_fn(), kl_fn()),
                             max_kl=0.01, damping=0.0, cg_iters=10)
    assert metrics["trpo/accepted"] == 1.0 and metrics["trpo/backtracks"] == 0.0
    natural = torch.linalg.solve(fisher, g)
    expected = natural * math.sqrt(2 * 0.01 / (natural @ fisher @ natural))
    torch.testing.assert_close(theta.detach(), expected)
    assert kl_fn().item() == pytest.approx(0.01)


def test_line_search_rejects_a_step_that_breaks_the_kl_bound():
    theta, _, _, loss_fn, kl_fn = _quadratic_problem()
    old = parameters_to_vector([theta]).detach()
    # A huge step: every backtracked fraction still has KL > max_kl, so nothing is accepted.
    big = torch.tensor([100.0, 100.0], dtype=torch.float64)
    both = lambda: (loss_fn(), kl_fn())
    out = trpo.line_search([theta], old, big, both, old_loss=0.0, max_kl=0.01, steps=5, shrink=0.5)
    assert out["trpo/accepted"] == 0.0
    torch.testing.assert_close(theta.detach(), old)
    # With more backtracking the step shrinks into the region and is accepted.
    out = trpo.line_search([theta], old, big, both, old_loss=0.0, max_kl=0.01, steps=20, shrink=0.5)
    assert out["trpo/accepted"] == 1.0 and kl_fn().item() <= 0.01


def test_line_search_rejects_a_step_that_does_not_improve():
    theta, _, _, loss_fn, kl_fn = _quadratic_problem()
    old = parameters_to_vector([theta]).detach()
    uphill = torch.tensor([-0.01, -0.01], dtype=torch.float64)
    out = trpo.line_search([theta], old, uphill, lambda: (loss_fn(), kl_fn()), old_loss=0.0, max_kl=1.0,
                            steps=10, shrink=0.5)
    assert out["trpo/accepted"] == 0.0
    torch.testing.assert_close(theta.detach(), old)

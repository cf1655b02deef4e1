"""TRPO's Gauss-Newton Fisher-vector product (fvp=gauss_newton, issue #25) against its naive twin,
the Hessian of the KL by double backward (fvp=exact): on hand-built models, the control MLP
(Categorical and diagonal Gaussian) and the tiny language model."""
import dataclasses

import pytest
import torch

from policygrad import config as config_mod
from policygrad.algos import ALGOS, Progress
from policygrad.config import Config
from policygrad.control.rollout import Collector, build_policy as build_control_policy, make_envs
from policygrad.core import advantages, losses, trpo
from policygrad.lm.rollout import LMWorkload
from policygrad.resolve import resolve
from test_lm import lm_config


def _products(kl_pieces, gn_pieces, params, v, damping=0.0):
    exact = trpo.accumulated_fisher_vector_product(kl_pieces, params, damping)(v)
    return exact, trpo.gauss_newton_vector_product(gn_pieces, params, damping)(v)


def test_gauss_newton_product_is_the_kl_hessian_of_a_softmax_and_a_gaussian():
    """J^T H J v with H written out (categorical_fisher_product, gaussian_fisher_product) against
    torch's full Hessian of the mean KL at new = old, on weighted rows and with damping."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    log_std = torch.nn.Parameter(torch.tensor([0.2, -0.4], dtype=torch.float64))
    x = torch.randn(6, 3, dtype=torch.float64, generator=g)
    weights = torch.rand(6, dtype=torch.float64, generator=g)                 # (N,)
    params = [*net.parameters(), log_std]
    old_out, old_log_std = net(x).detach(), log_std.detach().clone()

    def kl_categorical():
        return (losses.categorical_kl(old_out, net(x)) * weights).sum()

    def kl_gaussian():
        return (losses.gaussian_kl(old_out[:, :2], old_log_std, net(x)[:, :2], log_std) * weights).sum()

    def gn_categorical(tangents):
        z, jv = trpo.linearised(net, params[:-1], tangents, lambda: net(x))
        return (z,), (trpo.categorical_fisher_product(z.detach(), jv, weights),)

    def gn_gaussian(tangents):
        holder = torch.nn.ModuleList([net]).append(torch.nn.Module())
        holder[1].log_std = log_std
        z, jv = trpo.linearised(holder, params, tangents, lambda: (net(x)[:, :2], holder[1].log_std))
        return z, trpo.gaussian_fisher_product(z[1].detach(), jv[0], jv[1], weights)

    for kl_fn, gn_fn, n in ((kl_categorical, gn_categorical, len(params) - 1), (kl_gaussian, gn_gaussian, len(params))):
        ps = params[:n]
        v = torch.randn(sum(p.numel() for p in ps), dtype=torch.float64, generator=g)
        exact, gn = _products([(1.0, kl_fn)], [(1.0, gn_fn)], ps, v, damping=0.1)
        torch.testing.assert_close(gn, exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_control_gauss_newton_product_equals_the_double_backward_one(env_id, activation):
    """The control twin (float64): a Categorical's and a diagonal Gaussian's (mean and log-std)
    product, in two weighted micro-batches, equals the exact one to rounding."""
    policy = build_control_policy(Config(env=env_id, activation=activation, log_std_init=-0.5), seed=0).double()
    batch = Collector(make_envs(env_id, 2), seed=0, gamma=0.99).collect(policy, 16)
    batch = batch._map(lambda x: x.double() if x.is_floating_point() else x)
    parts = [(0.5, batch.select_rows(torch.tensor([i]))) for i in range(2)]
    olds = [policy.snapshot_actor(m) for _, m in parts]
    kl_pieces = [(w, lambda m=m, old=old: policy.kl(m, old)) for (w, m), old in zip(parts, olds)]
    gn_pieces = [(w, lambda t, m=m: policy.fisher_outputs(m, t)) for w, m in parts]
    params = policy.actor_parameters()
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact, gn = _products(kl_pieces, gn_pieces, params, v)
    assert (gn - exact).abs().max().item() < 1e-12 * exact.abs().max().item()


def test_control_trpo_update_with_gauss_newton_lands_where_the_exact_one_does():
    """One whole TRPO update (gradient, CG on the products, line search), float64: the same step,
    within 1e-6 of its size (CG amplifies the products' last-digit differences)."""
    cfg = resolve({}, {"num_envs": 2, "n_steps": 32, "value_epochs": 1}, {"algo": "trpo", "env": "Pendulum-v1"})
    after = {}
    for fvp in ("exact", "gauss_newton"):
        policy = build_control_policy(dataclasses.replace(cfg, fvp=fvp), seed=0).double()
        batch = Collector(make_envs("Pendulum-v1", 2), seed=0, gamma=0.99).collect(policy, 32)
        batch = advantages.compute(batch._map(lambda x: x.double() if x.is_floating_point() else x), cfg)
        before = torch.cat([p.detach().reshape(-1) for p in policy.actor_parameters()])
        algo = ALGOS["trpo"]
        metrics = algo.update(policy, algo.make_optimizers(policy, cfg), batch, dataclasses.replace(cfg, fvp=fvp),
                              Progress(1.0, torch.Generator().manual_seed(0)))
        assert metrics["trpo/accepted"] == 1.0
        after[fvp] = torch.cat([p.detach().reshape(-1) for p in policy.actor_parameters()])
    moved = (after["exact"] - before).abs().max().item()
    assert moved > 1e-3 and (after["gauss_newton"] - after["exact"]).abs().max().item() < 1e-6 * moved


@pytest.mark.parametrize("overrides", [{}, {"gradient_checkpointing": True}, {"lora_r": 4}])
def test_lm_gauss_newton_product_equals_the_double_backward_one(tiny_lm, task_file, overrides):
    """The tiny LM at temperature 0.7, completions cut to different lengths (padding weighs
    nothing), two micro-batches of different weights, each one prompt's 3 completions (the
    shared-prompt pass, its KV cache repeated): within 1e-5 of the exact product (float32); with
    gradient checkpointing J v takes a plain pass of its own, with LoRA only the adapters move."""
    cfg = lm_config(tiny_lm, task_file, algo="trpo", temperature=0.7, **overrides)
    work = LMWorkload(cfg, seed=0)
    batch = work.collect()[0]
    keep = torch.tensor([1, 3, 6, 2, 6, 4])                                   # (B,) valid tokens
    batch = batch.replace(mask=batch.mask * (torch.arange(batch.shape[1])[None, :] < keep[:, None]))
    policy = work.policy
    parts = [(float(m.mask.sum() / batch.n_valid), m) for m in batch.split_rows(3)]
    kl_pieces = [(w, lambda m=m, old=policy.snapshot_actor(m): policy.kl(m, old)) for w, m in parts]
    gn_pieces = [(w, lambda t, m=m: policy.fisher_outputs(m, t)) for w, m in parts]
    params = policy.actor_parameters()
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    exact, gn = _products(kl_pieces, gn_pieces, params, v)
    assert exact.abs().max().item() > 1e-2
    assert (gn - exact).abs().max().item() < 1e-5


def test_fsdp_takes_trpo_with_the_gauss_newton_product_only(tiny_lm, task_file):
    """fully_shard's hooks pass first derivatives only: fvp=exact (a double backward) is refused
    with shard=fsdp, fvp=gauss_newton accepted (tests/test_dist.py runs it over 2 ranks)."""
    def cfg(fvp):
        return lm_config(tiny_lm, task_file, algo="trpo", shard="fsdp", fvp=fvp, prompts_per_step=2)
    with pytest.raises(config_mod.ConfigError, match="fvp=gauss_newton"):
        config_mod.check_world(cfg("exact"), 2)
    config_mod.check_world(cfg("gauss_newton"), 2)


def test_lm_trpo_update_with_gauss_newton_lands_where_the_exact_one_does(tiny_lm, task_file):
    """A whole TRPO update of the tiny LM in micro-batches of 2 completions, the products on half
    of them: the Gauss-Newton step is the exact one's within 1e-3 of its size (float32, CG)."""
    cfg = lm_config(tiny_lm, task_file, algo="trpo", micro_batch_size=2, fvp_fraction=0.5)
    batch, after = None, {}
    for fvp in ("exact", "gauss_newton"):
        work = LMWorkload(dataclasses.replace(cfg, fvp=fvp), seed=0)
        if batch is None:  # one batch for both
            batch = advantages.compute(work.collect()[0], cfg)
        before = torch.cat([p.detach().reshape(-1) for p in work.policy.actor_parameters()])
        algo = ALGOS["trpo"]
        metrics = algo.update(work.policy, algo.make_optimizers(work.policy, cfg), batch,
                              dataclasses.replace(cfg, fvp=fvp), Progress(1.0, torch.Generator().manual_seed(0)))
        assert metrics["trpo/accepted"] == 1.0
        after[fvp] = torch.cat([p.detach().reshape(-1) for p in work.policy.actor_parameters()])
    moved = (after["exact"] - before).abs().max().item()
    assert moved > 1e-3 and (after["gauss_newton"] - after["exact"]).abs().max().item() < 1e-3 * moved

"""Control policies and rollouts: fast paths against their naive twins, and behavioural invariants."""
import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from policygrad import checkpoint
from policygrad.algos import ALGOS, Progress
from policygrad.config import Config
from policygrad.control.policy import RunningNorm, fused_mlp, mlp
from policygrad.control.rollout import Collector, ControlWorkload, build_policy, make_envs
from policygrad.core import advantages, trpo
from policygrad.trainer import RunState, load_workload, restore, save_run


class CounterEnv(gym.Env):
    """Observation = steps taken so far; reward 1; never terminates (a TimeLimit truncates it)."""
    observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.t], np.float32), 1.0, False, False, {}


gym.register("policygrad-test/Counter-v0", entry_point=CounterEnv, max_episode_steps=5)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_fused_mlp_matches_the_sequential_twin(activation):
    torch.manual_seed(0)
    body, head = mlp([5, 16, 8], activation), torch.nn.Linear(8, 3)
    layers = [m for m in body if isinstance(m, torch.nn.Linear)] + [head]
    params = [t for m in layers for t in (m.weight, m.bias)]
    x = (torch.randn(2, 7, 5) * 3).requires_grad_()
    target = torch.randn(2, 7, 3)
    naive = head(body(x))
    fast = fused_mlp(x, layers, activation)
    torch.testing.assert_close(fast, naive, atol=2e-6, rtol=1e-5)
    naive_grads = torch.autograd.grad(((naive - target) ** 2).sum(), [x, *params])
    fast_grads = torch.autograd.grad(((fast - target) ** 2).sum(), [x, *params])
    for a, b in zip(fast_grads, naive_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_fused_kl_hessian_matches_the_sequential_twin_away_from_old(env_id, activation, monkeypatch):
    # TRPO differentiates the fused backward again (Fisher-vector products). At theta_old the KL's
    # gradient in the output is 0, which hides activations saved without a graph; off theta_old
    # (the line search, later CG steps of a reused graph) the second derivative must still be exact.
    policy = build_policy(Config(env=env_id, activation=activation, log_std_init=-0.5), seed=0)
    batch = Collector(make_envs(env_id, 2), seed=0, gamma=0.99).collect(policy, 16)
    old = policy.snapshot_actor(batch)
    params = policy.actor_parameters()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    assert policy.kl(batch, old).item() > 1e-3
    v = torch.randn(sum(p.numel() for p in params), generator=g)
    fast = trpo.fisher_vector_product(lambda: policy.kl(batch, old), params, damping=0.0)(v)
    monkeypatch.setattr(policy, "actor_output", lambda obs: policy.actor_head(policy.actor_body(obs)))
    naive = trpo.fisher_vector_product(lambda: policy.kl(batch, old), params, damping=0.0)(v)
    error = (torch.linalg.norm(fast - naive) / torch.linalg.norm(naive)).item()
    assert error < 1e-5, f"relative error {error:.3g} (|naive| = {torch.linalg.norm(naive).item():.3g})"


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_numpy_actor_matches_torch_policy(env_id):
    cfg = Config(env=env_id, log_std_init=-0.5)
    policy = build_policy(cfg, seed=3)
    actor = policy.numpy_snapshot()
    obs = np.random.default_rng(0).normal(size=(6, policy.actor_body[0].in_features)).astype(np.float32)
    actions, log_prob, values = actor.act(obs, np.random.default_rng(1))
    with torch.no_grad():
        x = torch.from_numpy(obs)
        ref_log_prob, _ = policy.log_prob_entropy(policy.actor_output(x), torch.as_tensor(actions))
        np.testing.assert_allclose(values, policy.value(x).numpy(), atol=1e-5)
    np.testing.assert_allclose(log_prob, ref_log_prob.numpy(), atol=1e-5)
    det, _, _ = actor.act(obs, np.random.default_rng(1), deterministic=True)
    expected = policy.actor_output(x).detach()
    expected = expected.argmax(-1) if policy.discrete else expected
    np.testing.assert_allclose(det, expected.numpy(), atol=1e-5)


def test_numpy_categorical_sampling_follows_the_softmax():
    policy = build_policy(Config(env="CartPole-v1", ortho_init=False), seed=0)
    actor = policy.numpy_snapshot()
    obs = np.repeat(np.array([[0.3, -1.0, 0.5, 2.0]], np.float32), 20000, 0)
    actions, _, _ = actor.act(obs, np.random.default_rng(0))
    probs = torch.softmax(policy.actor_output(torch.from_numpy(obs[:1])), -1).detach().numpy()[0]
    assert abs(actions.mean() - probs[1]) < 0.015


def test_same_seed_same_rollout():
    cfg = Config(env="CartPole-v1", num_envs=3)
    batches = []
    for _ in range(2):
        policy = build_policy(cfg, seed=7)
        batches.append(Collector(make_envs(cfg.env, 3), seed=7, gamma=0.99).collect(policy, 40))
    for name in ("obs", "actions", "log_prob", "rewards", "terminated", "values", "next_values"):
        torch.testing.assert_close(getattr(batches[0], name), getattr(batches[1], name))
    other = Collector(make_envs(cfg.env, 3), seed=8, gamma=0.99).collect(build_policy(cfg, seed=7), 40)
    assert not torch.equal(other.actions, batches[0].actions)


def test_truncation_bootstraps_from_the_final_observation():
    cfg = Config(env="policygrad-test/Counter-v0", num_envs=2)
    policy = build_policy(cfg, seed=0)
    batch = Collector(make_envs(cfg.env, 2), seed=0, gamma=0.9).collect(policy, 12)
    assert batch.terminated.sum() == 0
    expected_cut = torch.zeros(12)
    expected_cut[[4, 9]] = 1.0
    torch.testing.assert_close(batch.truncated[0], expected_cut)
    with torch.no_grad():
        final_value = policy.value(torch.tensor([[5.0]])).item()   # the obs after the 5th step
        reset_value = policy.value(torch.tensor([[0.0]])).item()
    assert batch.next_values[0, 4].item() == pytest.approx(final_value, abs=1e-5)
    assert batch.next_values[0, 4].item() != pytest.approx(reset_value, abs=1e-3)
    # elsewhere next_values is the value of the following observation
    torch.testing.assert_close(batch.next_values[0, :4], batch.values[0, 1:5])


def test_gaussian_actions_are_clipped_for_the_env_but_not_in_the_batch():
    cfg = Config(env="Pendulum-v1", log_std_init=3.0)  # std 20 against bounds +-2
    policy = build_policy(cfg, seed=0)
    batch = Collector(make_envs(cfg.env, 2), seed=0, gamma=0.9).collect(policy, 20)
    assert batch.actions.abs().max() > 2.0
    clipped = policy.to_env_actions(batch.actions.reshape(-1, 1).numpy())
    assert np.abs(clipped).max() <= 2.0


def test_running_norm_matches_numpy_moments():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=(n, 2)) for n in (5, 17, 40)]
    norm = RunningNorm((2,))
    for c in chunks:
        norm.update(c)
    data = np.concatenate(chunks)
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-4)
    np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-3)


@pytest.mark.parametrize("algo", ["reinforce", "ppo", "trpo"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_every_trainable_parameter_changes_after_an_update(algo, env_id):
    cfg = Config(algo=algo, env=env_id, num_envs=2, n_steps=64, n_epochs=2, batch_size=32, value_epochs=2)
    policy = build_policy(cfg, seed=0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    batch = Collector(make_envs(env_id, 2), seed=0, gamma=cfg.gamma).collect(policy, cfg.n_steps)
    batch = advantages.compute(batch, cfg)
    spec = ALGOS[algo]
    metrics = spec.update(policy, spec.make_optimizers(policy, cfg), batch, cfg,
                          Progress(1.0, torch.Generator().manual_seed(0)))
    unchanged = [n for n, p in policy.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == [], unchanged
    assert all(np.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("fraction, expected_rows", [(None, 2 * 64), (0.25, 32)])
def test_trpo_fisher_products_see_every_transition_unless_told_otherwise(monkeypatch, fraction, expected_rows):
    """fvp_fraction is a share of transitions, and control's default is all of them (it once took
    1 of the 2 environments of every preset)."""
    from policygrad.resolve import resolve
    overrides = {"num_envs": 2, "n_steps": 64, **({} if fraction is None else {"fvp_fraction": fraction})}
    cfg = resolve({}, overrides, {"algo": "trpo", "env": "CartPole-v1"})
    policy = build_policy(cfg, seed=0)
    batch = advantages.compute(Collector(make_envs("CartPole-v1", 2), seed=0, gamma=cfg.gamma)
                               .collect(policy, cfg.n_steps), cfg)
    seen = []
    kl = policy.kl
    monkeypatch.setattr(policy, "kl", lambda b, old: seen.append(int(b.mask.numel())) or kl(b, old))
    spec = ALGOS["trpo"]
    spec.update(policy, spec.make_optimizers(policy, cfg), batch, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    assert seen == [expected_rows]  # the one KL graph the Fisher-vector products reuse


def test_checkpoint_round_trip_keeps_weights_and_normaliser(tmp_path):
    cfg = Config(env="CartPole-v1", normalize_obs=True, normalize_reward=True, num_envs=2, n_steps=30)
    work = ControlWorkload(cfg, seed=0)
    policy = work.policy
    opts = ALGOS["ppo"].make_optimizers(policy, cfg)
    work.collect()  # moves the normalisers
    assert policy.obs_norm.count.item() > 1
    batch = advantages.compute(work.collect()[0], cfg)
    ALGOS["ppo"].update(policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    shuffle = torch.Generator().manual_seed(5)
    path = save_run(tmp_path, cfg, work, opts, RunState(update=3, env_steps=60), {"shuffle": shuffle})
    assert checkpoint.latest(tmp_path) == path
    loaded_work, loaded_cfg = load_workload(path)
    loaded = loaded_work.policy
    assert loaded_cfg == cfg
    for (name, a), (_, b) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    obs = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(policy.normalize(obs, False), loaded.normalize(obs, False))
    # resume: a fresh workload and optimiser take on every saved state, bit for bit
    fresh = ControlWorkload(cfg, seed=0)
    fresh_opts = ALGOS["ppo"].make_optimizers(fresh.policy, cfg)
    fresh_shuffle = torch.Generator().manual_seed(99)
    state = restore(path, cfg, fresh, fresh_opts, {"shuffle": fresh_shuffle})
    assert (state.update, state.env_steps) == (3, 60)
    saved, got = opts.main.state_dict(), fresh_opts.main.state_dict()
    for idx, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, got["state"][idx][key]), key
    assert torch.equal(fresh_shuffle.get_state(), shuffle.get_state())
    assert fresh.collector.episodes == work.collector.episodes
    assert list(fresh.collector.recent_returns) == list(work.collector.recent_returns)
    assert fresh.collector.rng.random() == work.collector.rng.random()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_one_pass_log_prob_and_kl_match_the_separate_passes(env_id):
    cfg = Config(env=env_id, num_envs=2)
    policy = build_policy(cfg, seed=0)
    batch = Collector(make_envs(env_id, 2), seed=0, gamma=0.99).collect(policy, 16)
    old = policy.snapshot_actor(batch)
    with torch.no_grad():
        for p in policy.actor_parameters():
            p.add_(0.05 * torch.randn_like(p))
    log_prob, kl = policy.log_prob_and_kl(batch, old)
    torch.testing.assert_close(log_prob, policy.log_prob(batch))
    torch.testing.assert_close(kl, policy.kl(batch, old))
    assert kl.item() > 0


@pytest.mark.parametrize("algo", ["reinforce", "ppo", "trpo"])
def test_a_non_finite_update_is_skipped_and_leaves_weights_and_optimiser_alone(algo):
    cfg = Config(env="CartPole-v1", algo=algo, num_envs=2, n_steps=16, batch_size=16)
    work = ControlWorkload(cfg, seed=0)
    opts = ALGOS[algo].make_optimizers(work.policy, cfg)
    good = advantages.compute(work.collect()[0], cfg)
    ALGOS[algo].update(work.policy, opts, good, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    before = {k: v.clone() for k, v in work.policy.state_dict().items()}
    opt_before = [(k, v.clone()) for opt in opts.named().values() for s in opt.state.values() for k, v in s.items()]
    bad = good.replace(advantages=torch.full_like(good.advantages, float("nan")))
    metrics = ALGOS[algo].update(work.policy, opts, bad, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    # a count of the skipped steps, not their share: PPO skips every minibatch of every epoch,
    # TRPO its natural-gradient step (its value steps are finite)
    steps = cfg.n_epochs * (cfg.rollout_size // cfg.batch_size) if algo == "ppo" else 1
    assert metrics["update/nonfinite"] == steps
    # TRPO's separate critic regression still learns from the finite value targets
    kept = [k for k in before if algo != "trpo" or "critic" not in k]
    assert "actor_head.weight" in kept
    for k in kept:
        assert torch.equal(before[k], work.policy.state_dict()[k]), k
    if algo != "trpo":
        opt_after = [(k, v) for opt in opts.named().values() for s in opt.state.values() for k, v in s.items()]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(opt_before, opt_after))


def test_ppo_stops_before_the_step_of_the_minibatch_whose_kl_crosses_target_kl():
    """SB3's order: the KL is read at the parameters before a minibatch's step, and the minibatch
    that crosses 1.5 x target_kl takes no step (#23). Here the first one does: nothing moves."""
    cfg = Config(env="CartPole-v1", algo="ppo", num_envs=2, n_steps=16, batch_size=16, target_kl=0.01)
    work = ControlWorkload(cfg, seed=0)
    opts = ALGOS["ppo"].make_optimizers(work.policy, cfg)
    batch = advantages.compute(work.collect()[0], cfg)
    ALGOS["ppo"].update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    before = {k: v.clone() for k, v in work.policy.state_dict().items()}
    opt_before = [v.clone() for s in opts.main.state.values() for v in s.values()]
    far = advantages.compute(work.collect()[0], cfg)
    far = far.replace(log_prob=far.log_prob - 3.0)  # sampled by a policy far from this one
    metrics = ALGOS["ppo"].update(work.policy, opts, far, cfg, Progress(1.0, torch.Generator().manual_seed(1)))
    assert metrics["policy/early_stop"] == 1.0 and metrics["policy/approx_kl"] > 1.5 * cfg.target_kl
    assert all(torch.equal(before[k], v) for k, v in work.policy.state_dict().items())
    assert metrics["update/nonfinite"] == 0.0 and "policy/grad_norm" not in metrics  # no step taken
    opt_after = [v for s in opts.main.state.values() for v in s.values()]
    assert len(opt_after) == len(opt_before) > 0
    assert all(torch.equal(a, b) for a, b in zip(opt_before, opt_after))

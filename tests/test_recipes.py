"""The options of the one loss the 2025-26 recipes are made of (issue #25): loss aggregation,
asymmetric and dual clips, sequence-level ratios, CISPO, the group-mean baseline, and the named
recipes that preset them. Each on hand-computed numbers, then against independent references written
from how TRL (trl/trainer/grpo_trainer.py) and veRL (verl/trainer/ppo/core_algos.py) compute it."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from policygrad import config as config_mod
from policygrad.algos import ALGOS, Progress
from policygrad.batch import Batch
from policygrad.core import advantages, losses
from policygrad.resolve import RECIPES, resolve

MODES = tuple(losses.LOSS_AGGREGATIONS)


def make_batch(log_prob, advantages_, mask, group=None, rewards=None) -> Batch:
    zeros = torch.zeros_like(mask)
    return Batch(obs=zeros, actions=zeros, log_prob=log_prob, rewards=zeros if rewards is None else rewards,
                 terminated=zeros, truncated=zeros, mask=mask, advantages=advantages_, group=group)


def cfg_of(**keys) -> SimpleNamespace:
    base = dict(loss_agg="token-mean", max_new_tokens=4, clip_eps=0.2, clip_low=None, clip_high=None,
                clip_ratio_c=None, ratio_level="token", surrogate="clip", behaviour_correction="none")
    return SimpleNamespace(**{**base, **keys})


def assert_same(got, ref) -> None:
    """(loss, gradient) pairs equal to 1e-6."""
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def ragged(B: int = 6, T: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random log-probs, old log-probs, per-sequence advantages and a ragged mask (every row keeps at
    least one token), in groups of 3."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)                    # (B,)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()           # (B, T)
    old = -torch.rand(B, T, generator=g) * 2                                # (B, T)
    new = old + 0.3 * torch.randn(B, T, generator=g)                        # (B, T)
    adv = torch.randn(B, generator=g)[:, None].expand(B, T) * mask          # (B, T) one per sequence
    return new, old, adv, mask


# --- aggregation -------------------------------------------------------------------------------
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),                                   # every token alike
    ("seq-mean-token-mean", (2 + 4) / 2),                                   # row means 2 and 4
    ("seq-mean-token-sum-norm", (6 + 4) / (2 * 3)),                         # max_new_tokens = 3
    ("seq-mean-token-sum", (6 + 4) / 2),
])
def test_each_aggregation_on_hand_computed_numbers(mode, expected):
    batch = make_batch(torch.zeros_like(X), torch.zeros_like(X), M)
    got = losses.aggregate(X, batch, cfg_of(loss_agg=mode, max_new_tokens=3))
    assert got.item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_means_weighted_by_their_units_are_the_whole_batch_mean(mode):
    """What algos._accumulate does with any split (here rows 0-1, 2, 3-5, and a stand-in row): the
    micro-batches' means, each times its count of units over the whole batch's, sum to the mean."""
    new, _, adv, mask = ragged()
    batch, cfg = make_batch(new, adv, mask), cfg_of(loss_agg=mode)  # log_prob: the per-token loss
    agg = losses.aggregation(cfg)
    parts = [batch.select_rows(torch.tensor(r)) for r in ([0, 1], [2], [3, 4, 5])] + [batch.stand_in()]
    total = sum(agg.mean(p.log_prob, p, cfg) * agg.count(p) / agg.count(batch) for p in parts)
    assert total.item() == pytest.approx(agg.mean(new, batch, cfg).item(), rel=1e-6)


# --- clipping ----------------------------------------------------------------------------------
def surrogate_loss(ratio: list[float], adv: list[float], **keys) -> torch.Tensor:
    """() the clipped surrogate's loss of one sequence of tokens with these ratios and advantages."""
    ratio_t = torch.tensor([ratio])
    batch = make_batch(torch.zeros_like(ratio_t), torch.tensor([adv]), torch.ones_like(ratio_t))
    return losses.ppo_clip_loss(ratio_t.log(), batch, cfg_of(**keys))[0]


def test_clip_higher_lets_a_ratio_rise_further_than_it_may_fall():
    # ratio 1.25, A = 1: symmetric 0.2 clips to 1.2; clip_high 0.28 keeps 1.25
    assert surrogate_loss([1.25], [1.0]).item() == pytest.approx(-1.2)
    assert surrogate_loss([1.25], [1.0], clip_low=0.2, clip_high=0.28).item() == pytest.approx(-1.25)
    # ratio 0.75, A = -1: min(-0.75, -0.8) = -0.8 under either (the low bound, 0.2, holds)
    assert surrogate_loss([0.75], [-1.0], clip_high=0.28).item() == pytest.approx(0.8)


def test_dual_clip_bounds_the_loss_of_a_negative_advantage():
    # ratio 5, A = -2: PPO's loss max(5 x 2, 1.2 x 2) = 10; the dual clip stops it at c x |A| = 6
    assert surrogate_loss([5.0], [-2.0]).item() == pytest.approx(10.0)
    assert surrogate_loss([5.0], [-2.0], clip_ratio_c=3.0).item() == pytest.approx(6.0)
    # a positive advantage is untouched: ratio 5, A = 2 -> -min(10, 2.4) = -2.4
    assert surrogate_loss([5.0], [2.0], clip_ratio_c=3.0).item() == pytest.approx(-2.4)


def test_sequence_ratio_is_the_geometric_mean_of_the_tokens_and_is_clipped_once():
    # token ratios 2 and 0.5 (and a padded third): geometric mean 1, inside any clip; token-level
    # clipping would cut both
    log_ratio = torch.tensor([[math.log(2.0), math.log(0.5), 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    batch = make_batch(torch.zeros_like(mask), torch.ones_like(mask) * mask, mask)
    seq = losses.ppo_clip_loss(log_ratio, batch, cfg_of(ratio_level="sequence"))[0]
    tok = losses.ppo_clip_loss(log_ratio, batch, cfg_of())[0]
    assert seq.item() == pytest.approx(-1.0)
    assert tok.item() == pytest.approx(-(1.2 + 0.5) / 2)


def test_cispo_weighs_every_token_by_its_clipped_detached_ratio():
    """d loss / d log pi = -sg(clip(ratio)) x A / tokens, for a clipped token too (PPO's clip would
    give it none)."""
    ratio = torch.tensor([[1.5, 0.9, 0.5]])
    log_prob = ratio.log().requires_grad_()
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    batch = make_batch(torch.zeros_like(ratio), adv, torch.ones_like(ratio))
    loss, metrics = losses.cispo_loss(log_prob, batch, cfg_of(clip_low=1.0, clip_high=0.28))
    loss.backward()
    weight = torch.tensor([[1.28, 0.9, 0.5]])
    torch.testing.assert_close(log_prob.grad, -weight * adv / 3)
    assert loss.item() == pytest.approx(-(weight * adv * ratio.log()).sum().item() / 3)
    assert metrics["policy/clip_fraction"] == pytest.approx(1 / 3)


# --- advantages --------------------------------------------------------------------------------
def test_group_mean_baseline_subtracts_the_group_mean_without_the_std():
    rewards = torch.tensor([[1.0], [3.0], [0.0], [10.0]])
    mask = torch.ones_like(rewards)
    batch = make_batch(mask * 0, None, mask, group=torch.tensor([0, 0, 1, 1]), rewards=rewards)
    cfg = SimpleNamespace(advantage="sequence", baseline="group-mean", normalize_advantages=False)
    out = advantages.compute(batch, cfg)
    assert out.advantages[:, 0].tolist() == [-1.0, 1.0, -5.0, 5.0]


# --- against TRL and veRL ----------------------------------------------------------------------
# Independent references of the anchors' formulas (read from their public source, not copied).
def trl_per_token(new, old, adv, mask, eps_low, eps_high, level):
    """TRL GRPOTrainer: coef_1 = exp(log ratio) per token, or per sequence (importance_sampling_level
    sequence: the masked mean of the token log ratios); -min(coef_1 A, clamp(coef_1) A)."""
    log_ratio = new - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    return -torch.min(coef_1 * adv, coef_2 * adv)


def trl_reduce(per_token, mask, loss_type, max_completion_length):
    """TRL's loss_type: grpo (each sequence's token mean, then the mean), dr_grpo (the sum over
    B x max_completion_length), dapo (tokens of the global batch: here one process)."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def verl_agg(loss_mat, mask, mode, scale_factor):
    """veRL's agg_loss (its newer form: a sequence's norm divides each sequence, the mean over rows
    with a token)."""
    seq_mask = (mask.sum(-1) > 0).float()
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    sums = (loss_mat * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        sums = sums / (mask.sum(-1) + 1e-8)
    elif mode == "seq-mean-token-sum-norm":
        sums = sums / scale_factor
    return (sums * seq_mask).sum() / seq_mask.sum()


def verl_dual_clip(new, old, adv, mask, low, high, c, mode):
    ratio = torch.exp(new - old)
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clipped = torch.maximum(l1, l2)
    lower = torch.min(-adv * c, clipped)
    return verl_agg(torch.where(adv < 0, lower, clipped), mask, mode, 5)


def verl_gspo(new, old, adv, mask, low, high):
    """veRL's GSPO: the sequence's mean log ratio, detached, re-attached per token as
    log pi - sg(log pi) + sg(log s_i); seq-mean-token-mean."""
    seq = ((new - old) * mask).sum(-1) / mask.sum(-1)
    log_token = new - new.detach() + seq.detach()[:, None]
    ratio = torch.exp(log_token)
    loss = -torch.min(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)
    return verl_agg(loss, mask, "seq-mean-token-mean", None)


def ours(new, old, adv, mask, **keys):
    log_prob = new.clone().requires_grad_()
    cfg = cfg_of(**keys)
    loss, _ = losses.POLICY_LOSSES["ppo"](log_prob, make_batch(old, adv, mask), cfg)
    loss.backward()
    return loss, log_prob.grad


def theirs(fn, new, *args):
    log_prob = new.clone().requires_grad_()
    loss = fn(log_prob, *args)
    loss.backward()
    return loss, log_prob.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss_type, mode", [("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum-norm"),
                                             ("dapo", "token-mean")])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_and_gradient_match_trl(seed, loss_type, mode, level):
    new, old, adv, mask = ragged(seed=seed)
    got = ours(new, old, adv, mask, loss_agg=mode, clip_low=0.2, clip_high=0.28, ratio_level=level,
               max_new_tokens=5)
    ref = theirs(lambda lp: trl_reduce(trl_per_token(lp, old, adv, mask, 0.2, 0.28, level), mask, loss_type, 5),
                 new)
    assert_same(got, ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_dual_clip_matches_verl_in_every_aggregation(seed, mode):
    new, old, adv, mask = ragged(seed=seed)
    new = old + 3 * (new - old)  # large ratios, for the dual clip to bind
    got = ours(new, old, adv, mask, loss_agg=mode, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0,
               max_new_tokens=5)
    ref = theirs(lambda lp: verl_dual_clip(lp, old, adv, mask, 0.2, 0.28, 3.0, mode), new)
    assert_same(got, ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_matches_verl_value_and_gradient(seed):
    new, old, adv, mask = ragged(seed=seed)
    new = old + 0.01 * (new - old)  # inside GSPO's narrow range for some rows, outside for others
    got = ours(new, old, adv, mask, loss_agg="seq-mean-token-mean", ratio_level="sequence", clip_low=3e-4,
               clip_high=4e-4)
    ref = theirs(lambda lp: verl_gspo(lp, old, adv, mask, 3e-4, 4e-4), new)
    assert_same(got, ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_cispo_matches_verl(seed, mode):
    new, old, adv, mask = ragged(seed=seed)

    def verl_cispo(lp):
        clipped = torch.clamp(torch.exp(lp - old), 1 - 1.0, 1 + 0.28).detach()
        return verl_agg(-clipped * adv * lp, mask, mode, 5)
    got = ours(new, old, adv, mask, surrogate="cispo", loss_agg=mode, clip_low=1.0, clip_high=0.28, max_new_tokens=5)
    ref = theirs(verl_cispo, new)
    assert_same(got, ref)


@pytest.mark.parametrize("baseline, whiten", [("group", False), ("group-mean", False), ("group-mean", True)])
def test_group_advantages_match_verl(baseline, whiten):
    """veRL's grpo (group-whitened, epsilon 1e-6), Dr. GRPO's group mean (norm_adv_by_std_in_grpo
    false) and reinforce_plus_plus_baseline (group mean, then whitened over the batch's tokens)."""
    g = torch.Generator().manual_seed(3)
    B, T = 9, 4
    _, _, _, mask = ragged(B, T, seed=3)
    rewards = torch.zeros(B, T)
    last = mask.sum(1).long() - 1
    rewards[torch.arange(B), last] = torch.randn(B, generator=g)
    group = torch.arange(3).repeat_interleave(3)
    batch = make_batch(torch.zeros(B, T), None, mask, group=group, rewards=rewards)
    got = advantages.compute(batch, SimpleNamespace(advantage="sequence", baseline=baseline,
                                                    normalize_advantages=whiten)).advantages
    scores = rewards.sum(1)
    mean = torch.stack([scores[group == i].mean() for i in range(3)])[group]
    std = torch.stack([scores[group == i].std() for i in range(3)])[group]
    ref = (scores - mean) / (std + 1e-6) if baseline == "group" else scores - mean
    ref = ref[:, None] * mask
    if whiten:  # verl_F.masked_whiten: unbiased variance, rsqrt(var + 1e-8)
        mu = (ref * mask).sum() / mask.sum()
        var = (((ref - mu) * mask) ** 2).sum() / (mask.sum() - 1)
        ref = (ref - mu) * torch.rsqrt(var + 1e-8) * mask
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


# --- expected gradients ------------------------------------------------------------------------
def test_sequence_sums_are_unbiased_and_per_sequence_token_means_are_not():
    """A two-step policy over {a, b, end} (end stops: lengths 1 and 2), enumerated: the expected
    gradient of seq-mean-token-sum is -grad J exactly, seq-mean-token-sum-norm's is -grad J /
    max_new_tokens (Dr. GRPO: a constant scale), and seq-mean-token-mean's is not proportional to it
    (each completion weighed by 1 / its length: GRPO's length bias, Liu et al. 2025)."""
    logits = torch.tensor([[0.3, -0.2, 0.1], [0.5, 0.0, -0.4]], requires_grad=True)  # (steps, K)
    reward = {(0, 0): 1.0, (0, 1): -0.5, (1, 0): 0.2, (1, 1): 2.0, (2,): 0.7}
    log_p = torch.log_softmax(logits, -1)
    sequences = [(2,)] + [s for s in itertools.product(range(3), repeat=2) if s[0] != 2 and s[1] != 2]
    prob = {s: sum(log_p[t, a] for t, a in enumerate(s)).exp() for s in sequences}
    assert sum(p.item() for p in prob.values()) < 1.0 + 1e-6
    exact = torch.autograd.grad(sum(prob[s] * reward[s] for s in sequences), logits, retain_graph=True)[0]
    expected = {}
    for mode in MODES:
        total = torch.zeros_like(logits)
        for s in sequences:  # a batch of one completion, advantage = its reward
            mask = torch.ones(1, len(s))
            lp = torch.stack([log_p[t, a] for t, a in enumerate(s)])[None, :]
            batch = make_batch(lp.detach(), torch.full_like(mask, reward[s]), mask)
            loss, _ = losses.reinforce_loss(lp, batch, cfg_of(loss_agg=mode, max_new_tokens=2))
            total += prob[s].detach() * torch.autograd.grad(loss, logits, retain_graph=True)[0]
        expected[mode] = total
    # the enumeration leaves out sequences ending in 'end' at step 2 (reward 0 there): J sums the
    # rest, and their gradient is what each estimator's expectation must equal
    torch.testing.assert_close(expected["seq-mean-token-sum"], -exact, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(expected["seq-mean-token-sum-norm"], -exact / 2, atol=1e-6, rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(expected["seq-mean-token-mean"].flatten(), -exact.flatten(), 0)
    assert cos < 0.9, cos  # 0.82 here


# --- config: recipes and refusals --------------------------------------------------------------
def test_the_registry_of_each_new_key_is_its_choices():
    assert set(losses.LOSS_AGGREGATIONS) == set(config_mod.CHOICES["loss_agg"])
    assert set(RECIPES) | {"none"} == set(config_mod.CHOICES["recipe"])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_presets_its_keys_and_the_user_overrides_any(tiny_lm, task_file, name):
    flags = {"task": str(task_file), "model": str(tiny_lm)}
    cfg = resolve({}, {"recipe": name}, flags)
    for key, value in RECIPES[name].items():
        assert getattr(cfg, key) == value, (name, key)
    if RECIPES[name]["algo"] == "ppo":  # the recipe's algo picks the algorithm's LM defaults
        assert cfg.n_epochs == 2 and cfg.lr == 1.5e-5
    over = resolve({}, {"recipe": name, "normalize_advantages": True, "lr": 0.123}, flags)
    assert over.normalize_advantages is True and over.lr == 0.123


def test_defaults_are_unchanged_without_a_recipe(tiny_lm, task_file):
    cfg = resolve({}, {}, {"task": str(task_file), "model": str(tiny_lm), "algo": "ppo"})
    assert (cfg.recipe, cfg.loss_agg, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c, cfg.ratio_level,
            cfg.surrogate) == ("none", "token-mean", None, None, None, "token", "clip")


@pytest.mark.parametrize("keys, message", [
    ({"algo": "trpo", "loss_agg": "seq-mean-token-mean"}, "loss_agg=seq-mean-token-mean with TRPO"),
    ({"algo": "ppo", "use_value_head": True, "ratio_level": "sequence"}, "ratio_level=sequence clips one ratio"),
    ({"algo": "ppo", "clip_ratio_c": 0.5}, "clip_ratio_c=0.5 must be above 1"),
    ({"algo": "ppo", "surrogate": "cispo", "clip_ratio_c": 3.0}, "surrogate=cispo clips its importance weight"),
    ({"algo": "reinforce", "clip_high": 0.28}, "clip_high is PPO's"),
    ({"recipe": "grpo", "algo": "trpo"}, "with TRPO"),
])
def test_options_that_do_not_fit_the_run_are_refused_in_one_line(tiny_lm, task_file, keys, message):
    with pytest.raises(config_mod.ConfigError, match=message):
        resolve({}, keys, {"task": str(task_file), "model": str(tiny_lm)})


def test_a_recipe_in_a_control_run_is_refused():
    with pytest.raises(config_mod.ConfigError, match="recipe is a language-model key"):
        resolve({}, {"recipe": "grpo"}, {"env": "CartPole-v1"})


# --- every recipe trains the tiny model -----------------------------------------------------------
LM_KEYS = {"prompts_per_step": 2, "samples_per_prompt": 3, "max_new_tokens": 6, "eval_prompts": 2,
           "logprob_chunk": 4, "lr": 1e-3, "micro_batch_size": 2}


@pytest.mark.parametrize("name, extra", [
    *[(name, {}) for name in sorted(RECIPES)],
    # PPO with a critic keeps the options that fit it
    ("dapo", {"use_value_head": True, "advantage": "gae", "clip_ratio_c": 3.0, "loss_agg": "seq-mean-token-mean"}),
    ("cispo", {"use_value_head": True, "advantage": "gae"}),
    # TRPO with the Dr. GRPO baseline
    ("none", {"algo": "trpo", "baseline": "group-mean", "fvp_fraction": 0.5}),
])
def test_every_recipe_trains_the_tiny_model(tiny_lm, task_file, name, extra):
    cfg = resolve({}, {**LM_KEYS, "recipe": name, **extra}, {"task": str(task_file), "model": str(tiny_lm)})
    from policygrad.lm.rollout import LMWorkload
    work = LMWorkload(cfg, seed=0)
    spec = ALGOS[cfg.algo]
    opts = spec.make_optimizers(work.policy, cfg)
    before = [p.detach().clone() for p in work.policy.actor_parameters()]
    for step in range(2):
        batch = advantages.compute(work.collect()[0], cfg)
        metrics = spec.update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(step)))
        assert metrics.get("update/nonfinite", 0.0) == 0.0 and all(math.isfinite(v) for v in metrics.values()), metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, work.policy.actor_parameters()))


def test_recipe_by_name_from_the_cli_and_from_python(tiny_lm, task_file, monkeypatch):
    """`train --recipe NAME` passes it as a flag (above every other layer, as --algo), and
    make_config(recipe=NAME) presets it; a Config object, taken whole, refuses recipe= in one line."""
    import policygrad
    from policygrad import cli, errors, resolve as resolve_mod
    seen = {}

    def stop(file_values, overrides, flags):  # no --algo: the recipe names it, and no run starts
        seen.update(flags)
        raise errors.UsageError("stop here")
    monkeypatch.setattr(resolve_mod, "resolve", stop)
    assert cli.main(["train", "--recipe", "dapo", "--task", str(task_file), "--model", str(tiny_lm),
                     "--out", "x"]) == 2
    assert seen["recipe"] == "dapo" and seen["algo"] is None
    monkeypatch.undo()
    cfg = policygrad.make_config(task=str(task_file), model=str(tiny_lm), recipe="dapo", clip_high=0.3)
    assert (cfg.algo, cfg.clip_low, cfg.clip_high, cfg.kl_coef) == ("ppo", 0.2, 0.3, 0.0)
    with pytest.raises(errors.UsageError, match="a Config object is taken whole"):
        policygrad.make_config(cfg, recipe="grpo")


def test_group_mean_baseline_per_turn_of_multi_turn_episodes():
    """Each turn's return-to-go minus the mean of the same turn's over the episodes of its seed."""
    cfg = SimpleNamespace(baseline="group-mean")
    returns = torch.tensor([[3.0, 1.0], [1.0, 0.0], [5.0, 2.0], [7.0, 0.0]])  # (B, K)
    valid = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    batch = SimpleNamespace(group=torch.tensor([0, 0, 1, 1]))
    out = advantages._per_turn_baselined(returns, batch, valid, cfg)
    # turn 0: seeds' means 2 and 6; turn 1: episode 1 has none, so episode 0 is alone (mean 1)
    assert out.tolist() == [[1.0, 0.0], [-1.0, 0.0], [-1.0, 1.0], [1.0, -1.0]]

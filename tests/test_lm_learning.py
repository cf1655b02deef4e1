"""What a language-model rollout hands to learning, checked against hand-written twins on a tiny
random LM: per-token rewards (task score on the last token, KL penalty on every token), reward
whitening, GAE over each completion with a value head, and a value head that fits its returns."""
import pytest
import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from policygrad.algos import ALGOS, Progress
from policygrad.config import Config
from policygrad.resolve import resolve
from policygrad.core import advantages
from policygrad.core.losses import value_loss
from policygrad.lm.rollout import LMWorkload

KL_COEF = 0.2


def lm_config(tiny_lm, task_file, **overrides) -> Config:
    values = {"prompts_per_step": 2, "samples_per_prompt": 3, "max_new_tokens": 6, "eval_prompts": 2,
              "logprob_chunk": 4, "lr": 1e-3, "kl_coef": KL_COEF, "temperature": 1.0, **overrides}
    return resolve({}, values, {"task": str(task_file), "model": str(tiny_lm),
                                "algo": overrides.get("algo", "reinforce")})


def drifted_workload(cfg: Config) -> LMWorkload:
    """A workload whose policy differs from its reference (so every KL term is non-zero) and ends
    some completions early: the policy's EOS logit is raised, which also makes EOS far likelier
    under the policy than under the reference."""
    work = LMWorkload(cfg, seed=0)
    model = work.policy.model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        enc = work.policy.tokenizer(["Say something nice about item 3."], return_tensors="pt")
        direction = model.model(**enc).last_hidden_state[0].mean(0)                 # (H,)
        eos = next(iter(work.policy.eos_ids))
        model.get_output_embeddings().weight[eos] = 5.0 * direction / direction.norm() ** 2
    return work


def collect_with_padding(work: LMWorkload):
    """The first batch (of a few) that has both a completion cut by EOS and a full-length one."""
    for _ in range(5):
        batch, metrics = work.collect()
        lengths = batch.mask.sum(1)
        if (lengths < batch.shape[1]).any() and (lengths == batch.shape[1]).any():
            return batch, metrics
    raise AssertionError(f"no batch with both padded and full-length completions; lengths {lengths.tolist()}")


def hand_scores(work: LMWorkload, batch) -> torch.Tensor:
    """(B,) the task's reward recomputed outside policygrad: VADER compound + 0.5 / (1 + length)."""
    tok, vader = work.policy.tokenizer, SentimentIntensityAnalyzer()
    texts = [tok.decode(a[m.bool()], skip_special_tokens=True).strip() for a, m in zip(batch.actions, batch.mask)]
    return torch.tensor([vader.polarity_scores(c)["compound"] + 0.5 / (1 + len(c)) for c in texts])


def naive_hidden(model, batch) -> torch.Tensor:
    """(B, T, H) final hidden states at the positions that predict each completion token, from one
    plain forward pass over the whole sequence (RoPE is shift-invariant: no position ids needed)."""
    T = batch.actions.shape[1]
    out = model.model(input_ids=batch.obs, attention_mask=batch.obs_mask.long())
    return out.last_hidden_state[:, -T - 1:-1]


def naive_log_prob(model, batch, temperature: float) -> torch.Tensor:
    """(B, T) log-probability of each completion token, full-vocabulary log-softmax; 0 on padding."""
    T = batch.actions.shape[1]
    logits = model(input_ids=batch.obs, attention_mask=batch.obs_mask.long()).logits[:, -T - 1:-1]
    log_p = torch.log_softmax(logits.float() / temperature, -1)
    return log_p.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1) * batch.mask


def last_token(batch) -> torch.Tensor:
    """(B, T) 1.0 on each completion's last valid token."""
    out = torch.zeros_like(batch.mask)
    out[torch.arange(batch.shape[0]), batch.mask.sum(1).long() - 1] = 1.0
    return out


# --- reward shaping ----------------------------------------------------------------------------
def test_kl_in_reward_puts_the_score_on_the_last_token_and_the_k1_penalty_on_every_token(tiny_lm, task_file):
    """As a reward penalty only k1 gives the exact gradient of KL(policy || reference) (the config
    refuses k2 and k3 there): reward = -kl_coef * (log pi - log pi_ref) on every valid token, plus
    the task score on the last."""
    cfg = lm_config(tiny_lm, task_file, kl_in="reward", kl_estimator="k1")
    work = drifted_workload(cfg)
    batch, _ = collect_with_padding(work)
    mask, last = batch.mask, last_token(batch)
    with torch.no_grad():
        log_prob = naive_log_prob(work.policy.model, batch, cfg.temperature)       # (B, T)
        ref_log_prob = naive_log_prob(work.policy.reference, batch, cfg.temperature)
    torch.testing.assert_close(batch.log_prob, log_prob, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.ref_log_prob, ref_log_prob, atol=1e-4, rtol=1e-4)
    k1 = (log_prob - ref_log_prob) * mask                                            # (B, T)
    assert (k1[mask.bool()] != 0).all()  # the policy really differs from the reference
    expected = hand_scores(work, batch)[:, None] * last - KL_COEF * k1
    torch.testing.assert_close(batch.rewards, expected, atol=1e-4, rtol=1e-4)
    assert (batch.rewards[mask == 0] == 0).all()
    # the sign: where the policy likes a token more than the reference, the penalty is a cost;
    # where it likes it less, k1 pays back
    inner = (mask * (1 - last)).bool()                                               # no task score
    likelier, rarer = inner & (log_prob > ref_log_prob), inner & (log_prob < ref_log_prob)
    assert likelier.any() and (batch.rewards[likelier] < 0).all()
    assert rarer.any() and (batch.rewards[rarer] > 0).all()
    # the EOS tokens the drift made likely are penalised hardest
    eos = next(iter(work.policy.eos_ids))
    ended = last.bool() & (batch.actions == eos)
    assert ended.any() and (k1[ended] > 1.0).all()


def test_kl_in_loss_leaves_the_rewards_free_of_kl(tiny_lm, task_file):
    cfg = lm_config(tiny_lm, task_file, kl_in="loss")
    work = drifted_workload(cfg)
    batch, _ = collect_with_padding(work)
    assert ((batch.log_prob - batch.ref_log_prob).abs() * batch.mask).sum() > 0
    torch.testing.assert_close(batch.rewards, hand_scores(work, batch)[:, None] * last_token(batch))


def test_whitened_scores_have_mean_zero_and_std_one_before_the_kl_penalty(tiny_lm, task_file):
    for kl_in in ("reward", "loss"):
        cfg = lm_config(tiny_lm, task_file, kl_in=kl_in, kl_estimator="k1", whiten_rewards=True)
        work = drifted_workload(cfg)
        batch, _ = collect_with_padding(work)
        scores = hand_scores(work, batch)                                            # (B,)
        assert scores.std() > 0.01
        whitened = (scores - scores.mean()) / scores.std()   # unbiased std, over the whole batch
        penalty = KL_COEF * (batch.log_prob - batch.ref_log_prob) * batch.mask if kl_in == "reward" else 0.0
        score_part = batch.rewards + penalty                                         # (B, T)
        on_last = score_part[last_token(batch).bool()]                               # (B,) in row order
        torch.testing.assert_close(on_last, whitened, atol=1e-4, rtol=1e-4)
        assert abs(on_last.mean().item()) < 1e-5 and abs(on_last.std().item() - 1.0) < 1e-4
        torch.testing.assert_close(score_part * (1 - last_token(batch)), torch.zeros_like(score_part),
                                   atol=1e-5, rtol=0)


# --- GAE with a value head -----------------------------------------------------------------------
def naive_lm_gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over each completion's valid tokens, one token at a time; the completion ends
    terminated at its last token (no bootstrap after it)."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
            ret[b, t] = running + values[b, t].item()
    return adv, ret


def value_config(tiny_lm, task_file, **overrides) -> Config:
    return lm_config(tiny_lm, task_file, algo="ppo", use_value_head=True, advantage="gae", gamma=1.0,
                     gae_lambda=0.95, normalize_advantages=False, **overrides)


def test_lm_gae_with_a_value_head_equals_the_token_loop(tiny_lm, task_file):
    cfg = value_config(tiny_lm, task_file, kl_in="reward")
    work = drifted_workload(cfg)
    head = work.policy.value_head
    with torch.no_grad():  # a non-zero critic (the head starts at zero)
        head.weight.copy_(0.3 * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(2)))
        head.bias.fill_(0.1)
    batch, _ = collect_with_padding(work)
    with torch.no_grad():
        values = head(naive_hidden(work.policy.model, batch)).squeeze(-1) * batch.mask    # (B, T)
    assert (values[batch.mask.bool()] != 0).all()
    torch.testing.assert_close(batch.values, values, atol=1e-4, rtol=1e-4)
    assert (batch.values[batch.mask == 0] == 0).all()
    out = advantages.compute(batch, cfg)
    adv, ret = naive_lm_gae(batch.rewards, values, batch.mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(out.advantages, adv, atol=1e-4, rtol=1e-4)
    valid = batch.mask.bool()
    torch.testing.assert_close(out.returns[valid], ret[valid], atol=1e-4, rtol=1e-4)


def test_the_value_head_learns_the_returns_of_a_fixed_batch(tiny_lm, task_file):
    cfg = value_config(tiny_lm, task_file, kl_in="reward", value_lr=1e-2, n_epochs=4, batch_size=6)
    work = drifted_workload(cfg)
    spec = ALGOS["ppo"]
    opts = spec.make_optimizers(work.policy, cfg)
    batch = advantages.compute(collect_with_padding(work)[0], cfg)

    def loss() -> float:
        with torch.no_grad():
            return value_loss(work.policy.values(batch), batch).item()

    start = loss()
    assert start > 0.01  # the head starts at zero: its loss is the returns' mean square
    progress = Progress(1.0, torch.Generator().manual_seed(0))
    for _ in range(10):
        spec.update(work.policy, opts, batch, cfg, progress)
    assert loss() < 0.2 * start

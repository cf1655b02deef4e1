"""Language-model policy, baselines, rewards and tasks, on a tiny randomly initialised LM."""
import dataclasses
import json
import math

import pytest
import torch

from policygrad.algos import ALGOS, Progress
from policygrad.batch import Batch
from policygrad.config import Config
from policygrad.resolve import resolve
from policygrad.core import advantages
from policygrad.lm import models, rewards, tasks
from policygrad.lm.generation import token_log_probs
from policygrad.lm.policy import chunked_log_probs
from policygrad.lm.rollout import LMWorkload, PromptCursor


def lm_config(tiny_lm, task_file, **overrides) -> Config:
    values = {"prompts_per_step": 2, "samples_per_prompt": 3, "max_new_tokens": 6, "eval_prompts": 2,
              "logprob_chunk": 4, "lr": 1e-3, **overrides}
    return resolve({}, values, {"task": str(task_file), "model": str(tiny_lm), "algo": overrides.get("algo", "reinforce")})


# --- log-probabilities ------------------------------------------------------------------------
def test_chunked_log_probs_match_the_naive_full_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 7))
    fast, entropy = chunked_log_probs(hidden, head, tokens, temperature=0.7, chunk=3, with_entropy=True,
                                      entropy_grad=True)
    logits = head(hidden) / 0.7
    naive = token_log_probs(logits, tokens)
    torch.testing.assert_close(fast, naive)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy, -(p * torch.log_softmax(logits, -1)).sum(-1))
    g_fast = torch.autograd.grad(fast.sum(), hidden, retain_graph=True)[0]
    g_naive = torch.autograd.grad(naive.sum(), hidden)[0]
    torch.testing.assert_close(g_fast, g_naive)


def test_sampling_log_probs_equal_the_training_forward(tiny_lm, task_file):
    """Left padding, position ids and the completion positions must line up exactly: the log-probs
    recorded while sampling are those the learner recomputes."""
    cfg = lm_config(tiny_lm, task_file, temperature=0.8)
    work = LMWorkload(cfg, seed=0)
    texts = ["a", "a much longer prompt here"]  # different lengths: left padding is exercised
    batch = work.policy.generate(texts, cfg, seed=3)
    with torch.no_grad():
        recomputed = work.policy.log_prob(batch)
    torch.testing.assert_close(recomputed, batch.log_prob, atol=1e-4, rtol=1e-4)
    assert batch.obs_mask[0, 0] == 0  # the short prompt is left-padded


def test_shared_prompt_pass_equals_the_plain_one_values_and_gradients(tiny_lm, task_file):
    """The fast path (each prompt once, its KV cache repeated for its samples) against the naive
    twin (every row in full), with left padding and completions that end at different lengths."""
    cfg = lm_config(tiny_lm, task_file, temperature=1.0, samples_per_prompt=3, use_value_head=True)
    policy = LMWorkload(cfg, seed=0).policy
    texts = [t for t in ["a", "a much longer prompt here", "mid prompt"] for _ in range(3)]
    batch = policy.generate(texts, cfg, seed=5, samples_per_prompt=3)
    assert batch.obs_mask[0, 0] == 0 and batch.mask.sum() > 0

    def run(share: bool):
        policy.share_prompts = share
        policy.model.zero_grad(set_to_none=True)
        ref = policy.reference_log_prob(batch)
        log_prob, entropy, values = policy.evaluate(batch)
        (log_prob.sum() + entropy.sum() + values.sum()).backward()
        grads = [p.grad.clone() for p in policy.actor_parameters()]
        return [ref, log_prob.detach(), entropy.detach(), values.detach(), *grads]

    for shared, plain in zip(run(True), run(False)):
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)
    # rows that do not come in runs of one prompt take the plain path
    policy.share_prompts = True
    mixed = batch.select_rows(torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8]))
    with torch.no_grad():
        assert torch.equal(policy.hidden_states(policy.reference, mixed), policy._hidden(policy.reference, mixed))


def test_shared_prefill_samples_what_plain_generate_samples(tiny_lm, task_file):
    cfg = lm_config(tiny_lm, task_file, temperature=1.0)
    work = LMWorkload(cfg, seed=0)
    texts = [t for t in ["a", "a much longer prompt here", "mid prompt"] for _ in range(4)]
    plain = work.policy.generate(texts, cfg, seed=7)
    shared = work.policy.generate(texts, cfg, seed=7, samples_per_prompt=4)
    assert torch.equal(shared.actions, plain.actions) and torch.equal(shared.obs_mask, plain.obs_mask)
    torch.testing.assert_close(shared.log_prob, plain.log_prob, atol=1e-5, rtol=1e-5)


def test_completion_mask_stops_after_the_first_eos(tiny_lm, task_file):
    work = LMWorkload(lm_config(tiny_lm, task_file), seed=0)
    eos = next(iter(work.policy.eos_ids))
    tokens = torch.tensor([[5, 6, eos, 7, eos], [5, 5, 5, 5, 5]])
    mask = work.policy.completion_mask(tokens)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


# --- baselines --------------------------------------------------------------------------------
def test_rloo_vectorised_equals_the_loop():
    scores = torch.tensor([1.0, 2.0, 4.0, 0.5, -1.0, 3.0, 7.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2, 3])
    loop = []
    for i in range(len(scores)):
        others = [scores[j].item() for j in range(len(scores)) if group[j] == group[i] and j != i]
        loop.append(sum(others) / len(others) if others else 0.0)
    torch.testing.assert_close(advantages.rloo_baseline(scores, group), torch.tensor(loop))


def test_sequence_advantages_per_baseline():
    """2 prompts x 3 completions; a completion's score is the sum of its valid token rewards
    (padding rewards, here 9, must not count): group 0 scores 1, 3, 5; group 1 scores 5, 7, 18."""
    rewards = torch.tensor([[0.0, 1.0, 9.0], [1.0, 2.0, 9.0], [2.0, 3.0, 0.0],
                            [5.0, 9.0, 9.0], [3.0, 4.0, 0.0], [6.0, 6.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0],
                         [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    z = torch.zeros(6, 3)
    b = Batch(obs=z, actions=z, log_prob=z, rewards=rewards, terminated=z, truncated=z, mask=mask,
              group=torch.tensor([0, 0, 0, 1, 1, 1]), baseline=torch.full((6,), 2.5))
    scores = torch.tensor([1.0, 3.0, 5.0, 5.0, 7.0, 18.0])
    expected = {
        "none": scores,
        "moving-average": scores - 2.5,
        # leave-one-out: 1 - (3+5)/2, 3 - (1+5)/2, 5 - (1+3)/2; 5 - (7+18)/2, 7 - (5+18)/2, 18 - (5+7)/2
        "rloo": torch.tensor([-3.0, 0.0, 3.0, -7.5, -4.5, 12.0]),
        # group 0: mean 3, deviations -2, 0, 2, unbiased var 8/2 = 4, std 2
        # group 1: mean 10, deviations -5, -3, 8, unbiased var 98/2 = 49, std 7
        "group": torch.tensor([-2 / (2 + 1e-6), 0.0, 2 / (2 + 1e-6), -5 / (7 + 1e-6), -3 / (7 + 1e-6), 8 / (7 + 1e-6)]),
    }
    cfg = Config(advantage="sequence", normalize_advantages=False)
    for name, per_completion in expected.items():
        a, returns = advantages._sequence(b, Config(baseline=name))
        torch.testing.assert_close(a, per_completion[:, None] * mask, msg=name)  # 0 on padding
        torch.testing.assert_close(returns, scores[:, None].expand(6, 3), msg=name)
        out = advantages.compute(b, dataclasses.replace(cfg, baseline=name))
        torch.testing.assert_close(out.advantages, per_completion[:, None] * mask, msg=name)
    # whitening over the valid tokens (13 of them) comes after the baseline
    out = advantages.compute(b, Config(advantage="sequence", baseline="rloo", normalize_advantages=True))
    valid = (expected["rloo"][:, None] * mask)[mask.bool()]
    torch.testing.assert_close(out.advantages[mask.bool()], (valid - valid.mean()) / (valid.std() + 1e-8))
    assert (out.advantages[~mask.bool()] == 0).all()


def test_a_completion_alone_in_its_group_gets_no_baseline_and_zero_group_advantage():
    scores = torch.tensor([4.0, 1.0, 3.0])
    group = torch.tensor([0, 0, 1])
    torch.testing.assert_close(advantages.rloo_baseline(scores, group), torch.tensor([1.0, 4.0, 0.0]))
    b = Batch(obs=torch.zeros(3, 1), actions=torch.zeros(3, 1), log_prob=torch.zeros(3, 1),
              rewards=scores[:, None], terminated=torch.zeros(3, 1), truncated=torch.zeros(3, 1),
              mask=torch.ones(3, 1), group=group)
    a, _ = advantages._sequence(b, Config(baseline="group"))
    # group 0: mean 2.5, std sqrt(4.5); group 1: one completion, std 0, advantage 0 (not nan)
    s = math.sqrt(4.5) + 1e-6
    torch.testing.assert_close(a[:, 0], torch.tensor([1.5 / s, -1.5 / s, 0.0]))


# --- updates ----------------------------------------------------------------------------------
@pytest.mark.parametrize("algo, extra", [
    ("reinforce", {}), ("ppo", {}), ("ppo", {"use_value_head": True, "advantage": "gae"}),
    ("trpo", {"max_kl": 0.05}), ("trpo", {"max_kl": 0.05, "use_value_head": True, "advantage": "gae"}),
    ("reinforce", {"kl_in": "loss"})])
def test_every_trainable_parameter_changes_after_an_update(tiny_lm, task_file, algo, extra):
    cfg = lm_config(tiny_lm, task_file, algo=algo, **extra)
    work = LMWorkload(cfg, seed=0)
    spec = ALGOS[algo]
    opts = spec.make_optimizers(work.policy, cfg)
    before = {n: p.detach().clone() for n, p in work.policy.named_parameters() if p.requires_grad}
    head = {n for n in before if n.startswith("value_head")}
    assert head == ({"value_head.weight", "value_head.bias"} if cfg.use_value_head else set())
    batch, metrics = work.collect()
    batch = advantages.compute(batch, cfg)
    out = spec.update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    if algo == "trpo":
        assert out["trpo/accepted"] == 1.0, out
    unchanged = [n for n, p in work.policy.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []  # the value head's weight and bias included
    assert all(not p.requires_grad for p in work.policy.reference.parameters())
    assert math.isfinite(metrics["kl/to_reference"])


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm",
                                      "seq-mean-token-sum"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_lm, task_file, loss_agg):
    """Whatever the aggregation (each micro-batch's mean weighed by its tokens or its sequences),
    with the KL term and the entropy bonus aggregated alike, on completions of different lengths
    (micro-batches of as many sequences and unlike token counts: weighing one by the other's count
    misses)."""
    from dist_workers import vary_lengths
    grads = []
    for micro in (0, 2):
        cfg = lm_config(tiny_lm, task_file, micro_batch_size=micro, max_grad_norm=0.0, loss_agg=loss_agg,
                        kl_in="loss", kl_estimator="k3", ent_coef=0.01)
        work = LMWorkload(cfg, seed=0)
        opts = ALGOS["reinforce"].make_optimizers(work.policy, cfg)
        batch = advantages.compute(vary_lengths(work.collect()[0]), cfg)
        ALGOS["reinforce"].update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator()))
        grads.append(torch.cat([f.param.grad.clone() for f in opts.main_params]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_prompt_cursor_covers_each_prompt_once_per_epoch():
    cursor = PromptCursor(10, seed=1)
    first = cursor.take(10)
    assert sorted(first) == list(range(10))
    second = cursor.take(10)
    assert sorted(second) == list(range(10)) and second != first
    resumed = PromptCursor(10, seed=1, **{"epoch": 0, "position": 4})
    assert resumed.take(6) == first[4:]


# --- rewards ----------------------------------------------------------------------------------
def test_builtin_rewards():
    extras = {"answer": [7, 7], "reference": ["le chat est noir", "le chat est noir"]}
    def score(spec, completions):
        return rewards.RewardSet([rewards.build(spec)])(["p"] * len(completions), completions, extras).tolist()
    assert score("vader", ["I love this wonderful film", "terrible awful"])[0] > 0.5
    assert score("last-number", ["It is 3, no, 7", "7 or 8"]) == [1.0, 0.0]
    assert score("exact-match", ["7.", "seven"]) == [1.0, 0.0]
    assert score({"reward": "contains", "words": ["chat"]}, ["un chat", "un chien"]) == [1.0, 0.0]
    assert score({"reward": "length", "target": 4, "tolerance": 0}, ["a b c d", "a b"]) == [1.0, 0.5]
    chrf = score("chrf", ["le chat est noir", "bonjour"])
    assert chrf[0] == pytest.approx(1.0) and chrf[1] < 0.3
    assert score("bleu", ["le chat est noir", "x"])[0] == pytest.approx(1.0)


def test_weighted_python_reward_from_a_task_file(tiny_lm, task_file):
    task = tasks.load(str(task_file), {"max_new_tokens"})
    assert [len(task.rows(s)) for s in tasks.SPLITS] == [24, 3, 3]
    out = task.rewards(["p", "p"], ["good", "good good good"], {"answer": ["1", "2"]})
    vader = rewards.build("vader").fn(["p"], ["good"], {})[0]
    assert out[0] == pytest.approx(vader + 0.5 / 5)


@pytest.mark.parametrize("body, message", [
    ("def f(prompts, completions, **kw):\n    raise KeyError('x')\n", "raised KeyError"),
    ("def f(prompts, completions, **kw):\n    return [1.0]\n", "returned 1 values for 2"),
    ("def f(prompts, completions, **kw):\n    return [1.0, float('nan')]\n", "returned nan"),
])
def test_misbehaving_reward_functions_are_named(tmp_path, body, message):
    (tmp_path / "r.py").write_text(body)
    reward = rewards.RewardSet([rewards.build("python:r.py:f", tmp_path)])
    with pytest.raises(rewards.RewardError, match=message) as e:
        reward(["p", "p"], ["first completion", "second"], {})
    assert "'python:r.py:f'" in str(e.value)


def test_reward_build_errors(tmp_path):
    with pytest.raises(rewards.RewardError, match="not found"):
        rewards.build("python:missing.py:f", tmp_path)
    (tmp_path / "r.py").write_text("x = 1\n")
    with pytest.raises(rewards.RewardError, match="function 'g' not found"):
        rewards.build("python:r.py:g", tmp_path)
    with pytest.raises(rewards.RewardError, match="unknown reward 'vadr'"):
        rewards.build("vadr")


# --- data -------------------------------------------------------------------------------------
def test_data_formats_and_errors(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,answer\nhello,1\nworld,2\nagain,3\n")
    assert tasks.read_rows(tmp_path / "a.csv")[1] == {"prompt": "world", "answer": "2"}
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": ["x", "y"], "reference": ["a", "b"]}), tmp_path / "a.parquet")
    assert tasks.read_rows(tmp_path / "a.parquet")[0] == {"prompt": "x", "reference": "a"}
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(tasks.TaskError, match=r"bad.jsonl:2: not valid JSON"):
        tasks.read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "noprompt.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(tasks.TaskError, match=r"noprompt.jsonl:1: no 'prompt' column"):
        tasks.read_rows(tmp_path / "noprompt.jsonl")
    with pytest.raises(tasks.TaskError, match="unknown task 'nope'"):
        tasks.load("nope", set())


def test_splits_are_deterministic_and_disjoint():
    rows = [{"prompt": f"p{i}"} for i in range(50)]
    a, b = tasks.cut_splits(rows), tasks.cut_splits(list(reversed(rows)))
    assert a == b
    assert [len(a[s]) for s in ("train", "validation", "test")] == [40, 5, 5]
    seen = [r["prompt"] for s in a.values() for r in s]
    assert len(set(seen)) == 50


def test_splits_are_cut_by_prompt_so_no_prompt_is_in_two_of_them():
    """Preference pairs, 1 to 6 per prompt (#23): every row of a prompt lands in one split, and
    each held-out split still holds about 10% of the rows."""
    rows = [{"prompt": f"p{i}", "chosen": f"c{j}", "rejected": f"r{j}"} for i in range(40) for j in range(1 + i % 6)]
    splits = tasks.cut_splits(rows)
    where = {}
    for split, part in splits.items():
        for r in part:
            assert where.setdefault(r["prompt"], split) == split, r["prompt"]
    assert sorted(map(str, rows)) == sorted(str(r) for part in splits.values() for r in part)
    for split in ("validation", "test"):
        assert abs(len(splits[split]) - len(rows) // 10) <= 3, {s: len(v) for s, v in splits.items()}
    prompts = lambda cut: {s: {r["prompt"] for r in v} for s, v in cut.items()}  # noqa: E731
    assert prompts(tasks.cut_splits(list(reversed(rows)))) == prompts(splits)  # the row order does not matter
    with pytest.raises(tasks.TaskError, match="at least 3 prompts; got 2"):
        tasks.cut_splits([{"prompt": "a"}] * 5 + [{"prompt": "b"}] * 5, whole_prompts_only=True)
    # a prompt set of fewer prompts than splits (one prompt asked again and again) is cut by rows
    repeated = tasks.cut_splits([{"prompt": "a", "i": i} for i in range(20)])
    assert [len(repeated[s]) for s in ("validation", "test", "train")] == [2, 2, 16]
    with pytest.raises(tasks.TaskError, match="at least 3 rows; got 2"):
        tasks.cut_splits([{"prompt": "a"}] * 2)


def test_builtin_tasks_load():
    review = tasks.builtin("positive-review")
    assert sum(len(v) for v in review.splits.values()) >= 300
    arith = tasks.builtin("arithmetic")
    row = arith.rows("test")[0]
    a, op, b = row["prompt"].split()[2:5]
    assert eval(f"{a}{op}{b.rstrip('?')}") == row["answer"]
    assert arith.rows("test") == tasks.builtin("arithmetic").rows("test")  # fixed seed per split


def test_unknown_model_is_a_model_error(tmp_path):
    with pytest.raises(models.ModelError, match="unknown model"):
        models.resolve(str(tmp_path / "nowhere"))
    with pytest.raises(models.ModelError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_a_task_is_a_gymnasium_env():
    env = tasks.TaskEnv(tasks.builtin("arithmetic"), "test")
    obs, info = env.reset(seed=3)
    assert obs.startswith("What is")
    _, reward, terminated, truncated, _ = env.step(f"The answer is {info['row']['answer']}")
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert env.reset(seed=3)[0] == obs


def test_training_data_from_a_users_text_env(tmp_path, monkeypatch):
    (tmp_path / "my_text_env.py").write_text(
        "import gymnasium as gym\n"
        "class Echo(gym.Env):\n"
        "    def reset(self, seed=None, options=None):\n"
        "        super().reset(seed=seed)\n"
        "        self.word = ['apple', 'pear', 'plum'][int(self.np_random.integers(3))]\n"
        "        return f'Say {self.word}', {}\n"
        "    def step(self, action):\n"
        "        return '', float(self.word in action), True, False, {}\n")
    monkeypatch.chdir(tmp_path)
    task = tasks.load("my_text_env:Echo", set())
    rows = task.rows("validation")
    word = rows[0]["prompt"].split()[-1]
    env = task.env()  # a new env for each episode, reset to the row's seed
    env.reset(seed=rows[0]["env_seed"])
    assert env.step(f"ok {word}")[1] == 1.0 and env.step("nothing")[1] == 0.0
    assert {r["env_seed"] for r in task.rows("train")}.isdisjoint(r["env_seed"] for r in rows)
    with pytest.raises(tasks.TaskError, match="not found"):
        tasks.load("my_text_env:Missing", set())


def test_one_pass_log_prob_and_kl_match_the_separate_passes(tiny_lm, task_file):
    cfg = lm_config(tiny_lm, task_file, algo="trpo")
    work = LMWorkload(cfg, seed=0)
    batch = work.collect()[0]
    old = work.policy.snapshot_actor(batch)
    with torch.no_grad():
        for p in work.policy.actor_parameters():
            p.add_(0.01 * torch.randn_like(p))
        log_prob, kl = work.policy.log_prob_and_kl(batch, old)
        torch.testing.assert_close(log_prob, work.policy.log_prob(batch), atol=1e-5, rtol=1e-5)
        # the exact KL against a direct full-vocabulary computation
        logits = work.policy.model(input_ids=batch.obs, attention_mask=batch.obs_mask.long()).logits
        new = torch.log_softmax(logits[:, -batch.actions.shape[1] - 1:-1] / cfg.temperature, -1)
        direct = ((old.exp() * (old - new)).sum(-1) * batch.mask).sum() / batch.mask.sum()
    assert kl.item() > 0
    torch.testing.assert_close(kl, direct, atol=1e-5, rtol=1e-3)

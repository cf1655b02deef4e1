"""Integration on the real default model (SmolLM2-135M-Instruct) and a learning check on CartPole.
Marked slow; `make test` still runs them."""
import json

import pytest
import torch

pytestmark = pytest.mark.slow


def vader_compound(texts: list[str]) -> list[float]:
    """The positive-review reward recomputed outside policygrad."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def plain_log_probs(model, batch, temperature: float) -> torch.Tensor:
    """(B, T, V) log-softmax at the positions that predict each completion token, from one plain
    transformers forward pass over the whole sequence."""
    T = batch.actions.shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch.obs, attention_mask=batch.obs_mask.long()).logits[:, -T - 1:-1]
    return torch.log_softmax(logits.float() / temperature, -1)


def watch_workload(monkeypatch) -> dict:
    """Keep the run's workload, and every sample() call's (n, batch, completions, rewards)."""
    from policygrad import trainer
    seen = {"samples": []}
    build = trainer.build_workload

    def watched(cfg, path=None):
        work = seen["work"] = build(cfg, path)
        sample = work.sample

        def recorded(rows, n, seed):
            batch, completions, rewards = sample(rows, n, seed)
            seen["samples"].append((n, batch, completions, rewards))
            return batch, completions, rewards
        work.sample = recorded
        return work
    monkeypatch.setattr(trainer, "build_workload", watched)
    return seen


@pytest.mark.parametrize("algo", ["reinforce", "ppo", "trpo"])
def test_two_steps_of_each_algorithm_on_the_default_model(tmp_path, monkeypatch, algo):
    """Two training steps through the CLI (in-process, so the trained policy can be compared with
    what was saved), then: the logged rewards are VADER of the sampled completions, KL to the
    reference starts at 0 and is positive after training, every weight tensor moved, and the saved
    policy folder loads with plain transformers and gives the in-memory policy's log-probs."""
    from transformers import AutoModelForCausalLM

    from policygrad import checkpoint, cli
    from policygrad.lm import models

    out = tmp_path / algo
    seen = watch_workload(monkeypatch)
    # TRPO's 15 conjugate-gradient iterations, each a double backward through 135M weights, made this
    # the suite's slowest test (156 s); 5 still give a direction every weight moves along, at max_kl
    fewer_cg = ["cg_iters=5"] if algo == "trpo" else []
    try:
        rc = cli.main(["train", "--algo", algo, "--task", "positive-review", "--steps", "2", "--out", str(out),
                       "--no-progress", "prompts_per_step=2", "samples_per_prompt=2", "max_new_tokens=8",
                       "eval_every=0", "--seed", "1", *fewer_cg])
    finally:
        torch.set_num_threads(1)  # train() set the run's own thread count
    assert rc == 0
    work, cfg = seen["work"], seen["work"].cfg
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["train/completion_length"] > 0 for r in rows)

    # the logged train reward is the mean VADER compound score of that step's completions
    train = [s for s in seen["samples"] if s[0] == cfg.samples_per_prompt]
    assert len(train) == 2
    for row, (_, batch, completions, rewards) in zip(rows, train):
        assert len(completions) == 4 and any(completions)
        assert rewards.tolist() == pytest.approx(vader_compound(completions), abs=1e-9)
        assert row["train/reward_mean"] == pytest.approx(sum(vader_compound(completions)) / 4, abs=1e-6)

    # the final test evaluation: every sample's reward recomputed from the completion written to samples/
    final = json.loads((out / "final_eval.json").read_text())
    samples = [json.loads(line) for line in (out / "samples" / "test-step00002.jsonl").read_text().splitlines()]
    assert final["test/n"] == len(samples) == 32
    recomputed = vader_compound([s["completion"] for s in samples])
    assert [s["reward"] for s in samples] == pytest.approx(recomputed, abs=1e-9)
    assert final["test/reward_mean"] == pytest.approx(sum(recomputed) / 32, abs=1e-6)

    # step 1's KL is computed before any update: policy == reference, so 0 up to float error
    assert abs(rows[0]["kl/to_reference"]) < 1e-3, rows[0]["kl/to_reference"]

    # the saved policy loads with plain transformers; every weight tensor moved away from the base model
    saved = AutoModelForCausalLM.from_pretrained(checkpoint.latest(out) / "policy", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(models.resolve(cfg.model), dtype=torch.float32).eval()
    base_weights = dict(base.named_parameters())
    unchanged = [n for n, p in saved.named_parameters() if torch.equal(p, base_weights[n])]
    assert len(base_weights) > 0 and unchanged == []
    in_memory = dict(work.policy.model.named_parameters())
    assert all(torch.equal(p, in_memory[n]) for n, p in saved.named_parameters())

    # ... and gives the in-memory policy's log-probs on the last training batch; its exact KL to the
    # base model, summed over the vocabulary, is now positive
    batch = train[-1][1]
    saved_lp = plain_log_probs(saved, batch, cfg.temperature)                      # (B, T, V)
    with torch.no_grad():
        policy_lp = work.policy.log_prob(batch)                                    # (B, T)
    chosen = saved_lp.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1) * batch.mask
    torch.testing.assert_close(chosen, policy_lp, atol=1e-4, rtol=1e-4)
    base_lp = plain_log_probs(base, batch, cfg.temperature)
    kl = ((saved_lp.exp() * (saved_lp - base_lp)).sum(-1) * batch.mask).sum() / batch.mask.sum()
    assert kl.item() > 1e-3, kl.item()  # measured: 0.02 (trpo, max_kl 0.02) to 0.2 nats per token


def test_ppo_learns_cartpole(tmp_path):
    from policygrad.resolve import resolve
    from policygrad.trainer import train
    cfg = resolve({}, {"eval_episodes": 10, "eval_every": 0}, {"algo": "ppo", "env": "CartPole-v1",
                                                               "total_steps": 60_000, "seed": 1})
    summary = train(cfg, tmp_path, progress=False)
    assert summary["final_eval_return_mean"] >= 400


def test_a_lora_trpo_run_on_the_default_model_saves_an_adapter_peft_and_merge_load(tmp_path, monkeypatch):
    """LoRA (rank 8, every linear layer of attention and MLP, tied embeddings untouched) with TRPO's
    natural-gradient step over the adapter alone: KL 0 at the first step, the checkpoint's adapter
    loads in PEFT on the base model and `merge` writes plain weights, both giving the policy's
    log-probs on the last training batch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from policygrad import checkpoint, cli
    from policygrad.lm import models

    out = tmp_path / "lora"
    seen = watch_workload(monkeypatch)
    try:
        rc = cli.main(["train", "--algo", "trpo", "--task", "positive-review", "--steps", "2", "--out", str(out),
                       "--no-progress", "prompts_per_step=2", "samples_per_prompt=2", "max_new_tokens=8",
                       "eval_every=0", "--seed", "1", "lora_r=8", "fvp_fraction=0.5"])
        assert rc == 0
        assert cli.main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    finally:
        torch.set_num_threads(1)
    work, cfg = seen["work"], seen["work"].cfg
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["kl/to_reference"]) < 1e-3 and rows[1]["trpo/accepted"] == 1.0
    trainable = sum(p.numel() for p in work.policy.actor_parameters())
    assert 0 < trainable < 0.05 * sum(p.numel() for p in work.policy.model.parameters())

    batch = [s for s in seen["samples"] if s[0] == cfg.samples_per_prompt][-1][1]
    with torch.no_grad():
        policy_lp = work.policy.log_prob(batch)                                    # (B, T)
    base = AutoModelForCausalLM.from_pretrained(models.resolve(cfg.model), dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, checkpoint.latest(out) / "policy").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for model in (adapted, merged):
        lp = plain_log_probs(model, batch, cfg.temperature)
        chosen = lp.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1) * batch.mask
        torch.testing.assert_close(chosen, policy_lp, atol=2e-4, rtol=1e-4)


def test_ppo_learns_cartpole_as_two_processes(tmp_path):
    """The same run as test_ppo_learns_cartpole launched as 2 processes (4 environments each, the
    same global batch): it reaches the same threshold within the same environment steps."""
    import json
    import subprocess
    import sys
    args = ["--algo", "ppo", "--env", "CartPole-v1", "--total-steps", "60000", "--seed", "1", "--no-progress",
            "--nproc", "2", "--out", str(tmp_path / "run"), "eval_episodes=10", "eval_every=0"]
    r = subprocess.run([sys.executable, "-m", "policygrad", "train", *args], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    final = json.loads((tmp_path / "run" / "final_eval.json").read_text())
    assert final["eval/return_mean"] >= 400
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env_steps"] == 60_000 - 60_000 % 256

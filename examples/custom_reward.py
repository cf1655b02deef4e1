"""A reward that is a closure over your own state, on prompts held in memory.

The reward counts words from a list the caller keeps (and may change between runs), minus a
penalty for repeating a word; the untrained model is the baseline the trained one must beat.
Run: .venv/bin/python examples/custom_reward.py (several minutes on a CPU).
"""
import policygrad

liked = {"great", "love", "wonderful", "fun", "brilliant", "beautiful", "best"}
calls = []


def warmth(prompts, completions, **columns):
    """One float per completion: liked words (up to 2) minus 0.2 per repeated word."""
    calls.append(len(completions))
    scores = []
    for text in completions:
        words = [w.strip(".,!?\"'").lower() for w in text.split()]
        repeats = len(words) - len(set(words))
        scores.append(min(2, sum(w in liked for w in words)) / 2 - 0.2 * min(repeats, 5))
    return scores


subjects = ["heist", "space", "family", "war", "horror", "musical", "western", "spy", "sports", "robot"]
rows = [{"prompt": f"Write one sentence about a {s} movie you saw {when}."}
        for s in subjects for when in ["yesterday", "last week", "as a child", "twice", "on a plane"]]

result = policygrad.train(algo="reinforce", model="smollm2-135m", data=rows, rewards=warmth,
                          total_steps=40, max_new_tokens=32, seed=1, out="runs/custom-reward")
before = policygrad.evaluate(result, base=True)  # the untrained model, same test prompts and seeds
print(f"test reward {before.mean_reward:.3f} -> {result.final.mean_reward:.3f} "
      f"(KL {result.final.kl_to_reference:.2f} nats); the reward was called {len(calls)} times")
for s in result.final.samples[:3]:
    print(f"{s['reward']:+.2f}  {s['completion']!r}")

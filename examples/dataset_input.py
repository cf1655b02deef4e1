"""A `datasets.Dataset` in memory as the prompts (pip install datasets), and the reward as a function.

The rows are the built-in positive-review task's own, made into a DatasetDict with its train,
validation and test splits: any Dataset with a `prompt` (or chat `messages`) column works the same.
Run: .venv/bin/python examples/dataset_input.py (about 7 minutes on 2 CPU cores: benchmarks/api.py
trains the same run).
"""
import datasets
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

import policygrad

splits = policygrad.Task.load("positive-review").splits
data = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
analyzer = SentimentIntensityAnalyzer()


def positivity(prompts, completions, **columns):
    return [analyzer.polarity_scores(c)["compound"] for c in completions]


result = policygrad.train(algo="reinforce", model="smollm2-135m", data=data, rewards=positivity,
                          total_steps=40, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=32,
                          kl_coef=0.1, seed=1)  # no out=: nothing is kept on disk
before = policygrad.evaluate(result, base=True)  # the untrained model, same test prompts and seeds
print(f"test reward {before.mean_reward:.3f} -> {result.final.mean_reward:.3f}, "
      f"KL {result.final.kl_to_reference:.2f} nats")
result.policy.save_pretrained("runs/dataset-input-model")  # a plain transformers model
result.tokenizer.save_pretrained("runs/dataset-input-model")

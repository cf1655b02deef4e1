"""A multi-seed sweep of two algorithms, collected into a table.

Each run is one train() call in memory (out=None); its closing evaluation and the history of
every update come back in the result. Run: .venv/bin/python examples/sweep.py (about 2 minutes).
"""
import statistics

import policygrad

table = []
for algo in ["ppo", "trpo"]:
    for seed in [1, 2, 3]:
        result = policygrad.train(algo=algo, env="CartPole-v1", total_steps=50_000, seed=seed, progress=False)
        evaluation = policygrad.evaluate(result, episodes=10)
        table.append({"algo": algo, "seed": seed, "return": evaluation.mean_return,
                      "updates": len(result.history), "wall_s": result.summary["wall_s"]})

print(f"{'algo':<6}{'seed':>6}{'return':>10}{'updates':>9}{'wall_s':>9}")
for row in table:
    print(f"{row['algo']:<6}{row['seed']:>6}{row['return']:>10.1f}{row['updates']:>9}{row['wall_s']:>9.1f}")
for algo in ["ppo", "trpo"]:
    returns = [row["return"] for row in table if row["algo"] == algo]
    print(f"{algo}: mean return {statistics.mean(returns):.1f} over {len(returns)} seeds")

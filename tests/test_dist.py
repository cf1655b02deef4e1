"""Several processes (torch.distributed, gloo, CPU): the same update as one process, collective
decisions that cannot hang, and the launch."""
import json

import pytest
import torch
from safetensors.torch import load_file

import dist_workers as w
from policygrad import config as config_mod
from policygrad import resolve as resolve_mod
from policygrad.batch import Batch


def test_minibatch_parts_over_ranks_are_the_single_process_minibatches():
    """Every rank draws the same global order; the ranks' parts of each minibatch together are the
    minibatch one process draws, and a rank with no rows in one gets a stand-in that weighs nothing."""
    B, T = 8, 3
    batch = Batch(obs=torch.arange(B * T, dtype=torch.float32).reshape(B, T), actions=torch.zeros(B, T),
                  log_prob=torch.zeros(B, T), rewards=torch.zeros(B, T), terminated=torch.zeros(B, T),
                  truncated=torch.zeros(B, T), mask=torch.ones(B, T))
    single = [mb.obs[:, 0].tolist() for mb in batch.minibatches(3, torch.Generator().manual_seed(4))]
    parts = [list(block.minibatches(3, torch.Generator().manual_seed(4), rank, 2))
             for rank, block in enumerate(w.block(batch, r, 2) for r in range(2))]
    for i, rows in enumerate(single):
        joined = [x for rank in range(2) for x, m in zip(parts[rank][i].obs[:, 0].tolist(),
                                                         parts[rank][i].mask[:, 0].tolist()) if m]
        assert sorted(joined) == sorted(rows)
    stand_ins = [p for rank in parts for p in rank if p.mask.sum() == 0]
    assert all(p.shape[0] == 1 for p in stand_ins)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory, tiny_lm, task_file):
    """Global batches collected in one process, the single-process update of each, then the same
    update split over 2 spawned ranks."""
    torch.set_num_threads(1)  # as the ranks: an in-process train() elsewhere may have changed it
    folder = tmp_path_factory.mktemp("dist")
    lm_paths = (str(tiny_lm), str(task_file))
    single = {}
    for name in w.CASES:
        cfg = w.case_config(name, lm_paths)
        work = w.workload(cfg)
        batch, _ = work.collect()
        w.save_batch(w.vary_lengths(batch) if cfg.is_lm else batch, folder / f"{name}.batch")
        before = w.weights(work.policy)
        whole = w.load_batch(folder / f"{name}.batch")
        metrics = w.one_update(cfg, work, whole if cfg.is_lm else w.in_float64(whole))
        single[name] = (before, w.weights(work.policy), metrics)
    w.run_ranks(w.equivalence_worker, (str(folder), lm_paths, list(w.CASES)))
    return folder, single


def test_every_recipe_has_a_two_rank_case():
    """A recipe added to resolve.RECIPES joins the matrix above (issue #25)."""
    assert set(resolve_mod.RECIPES) <= {extra.get("recipe") for _, extra in w.CASES.values()}


@pytest.mark.parametrize("name", list(w.CASES))
def test_update_split_over_two_ranks_equals_the_single_process_update(equivalence, name):
    """Weights after one update on a batch split over 2 ranks equal the single-process update on the
    whole batch, both ranks hold the same weights bit for bit, and the logged metrics are the whole
    batch's. Sums run in another order, and cancelling sums, Adam's first step (g / (|g| + eps))
    and TRPO's conjugate gradient amplify that rounding: control runs in float64 and agrees within
    1e-6 of the update's size, a language model in float32 within 1e-3 of it. (Weighting each rank's
    mean alike instead of by its valid tokens misses by more than the whole update on every lm case:
    checked by hand.)"""
    folder, single = equivalence
    before, after, metrics = single[name]
    assert_update_equal(folder, name, before, after, metrics)


def assert_update_equal(folder, name: str, before: dict, after: dict, metrics: dict) -> None:
    """The 2 ranks' weights and metrics (files in folder) against the single-process update."""
    ranks = [load_file(str(folder / f"{name}.rank{r}.safetensors")) for r in range(2)]
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    assert moved > 1e-4, f"{name}: the single-process update barely moved the weights"
    tolerance = (1e-3 if name.startswith("lm-") else 1e-6) * moved
    sharded = "fsdp" in name  # the whole weights are gathered onto rank 0 only
    assert set(ranks[0]) >= set(after), f"{name}: missing weights"
    for k in after:
        if not sharded:
            assert torch.equal(ranks[0][k], ranks[1][k]), f"{name}: ranks disagree on {k}"
        # plus a few float32 ulps of the weight itself (a norm weight of 1 moved by lr lands there)
        close = (ranks[0][k] - after[k]).abs() <= tolerance + 3e-7 * after[k].abs()
        assert close.all(), f"{name}: {k} differs by {(ranks[0][k] - after[k]).abs().max().item():.3g}"
    split = json.loads((folder / f"{name}.rank0.json").read_text())
    for key, value in metrics.items():
        if key.startswith(("policy/", "value/", "trpo/", "kl/", "ptx/")):
            assert split[key] == pytest.approx(value, rel=1e-3, abs=1e-5), f"{name}: metric {key}"


@pytest.fixture(scope="module")
def dynamic_equivalence(tmp_path_factory, tiny_lm, task_file):
    """Dynamic sampling in one process, its task rewards scripted (w.DYNAMIC_CASES): the rounds it
    sampled, its kept batch and its update; then 2 spawned ranks, each handed its block of every
    recorded round, through the same collect and update."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("dynamic")
    lm_paths = (str(tiny_lm), str(task_file))
    single = {}
    for name, (_, _, script) in w.DYNAMIC_CASES.items():
        cfg = w.dynamic_config(name, lm_paths)
        work = w.workload(cfg)
        rounds, rewards = w.record_rounds(work, script)
        batch, collected = work.collect()
        for i, drawn in enumerate(rounds):
            w.save_batch(drawn, folder / f"{name}.round{i}.batch")
        (folder / f"{name}.rewards.json").write_text(json.dumps(rewards))
        before = w.weights(work.policy)
        metrics = w.one_update(cfg, work, batch)
        single[name] = (batch, collected, before, w.weights(work.policy), metrics)
    w.run_ranks(w.dynamic_worker, (str(folder), lm_paths, list(w.DYNAMIC_CASES)))
    return folder, single


@pytest.mark.parametrize("name", list(w.DYNAMIC_CASES))
def test_dynamic_sampling_over_two_ranks_keeps_and_updates_as_one_process(dynamic_equivalence, name):
    """The groups kept from every rank's rewards, laid out in equal blocks (a group moved to the
    rank whose block holds it; a short step's padding too), are one process's batch row for row:
    tokens, masks and log-probs exactly. The counts of what was drawn, kept and dropped agree, and
    the update is the single-process one (tolerances as above)."""
    folder, single = dynamic_equivalence
    batch, collected, before, after, metrics = single[name]
    kept, rounds = (2, 2) if name.endswith("short") else (4, 2)
    assert (collected["train/kept_groups"], collected["train/draws"]) == (kept, rounds)
    parts = [load_file(str(folder / f"{name}.rank{r}.batch")) for r in range(2)]
    for key in ("obs", "mask", "log_prob"):
        assert torch.equal(torch.cat([p[key] for p in parts]), getattr(batch, key)), f"{name}: {key}"
    torch.testing.assert_close(torch.cat([p["ref_log_prob"] for p in parts]), batch.ref_log_prob,
                               atol=1e-5, rtol=1e-5)
    if name.endswith("short"):
        assert parts[1]["mask"].sum() == 0 and parts[0]["mask"].sum(1).min() > 0  # rank 1: padding alone
    split = [json.loads((folder / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    for key in ("train/draws", "train/kept_groups", "train/dropped_groups", "train/sampled_reward_mean",
                "train/reward_mean", "train/flat_group_share"):
        assert split[0][key] == split[1][key] == collected[key], f"{name}: {key}"
    assert split[0]["kl/to_reference"] == pytest.approx(collected["kl/to_reference"], rel=1e-4, abs=1e-6)
    assert_update_equal(folder, name, before, after, metrics)


def test_ranks_whose_data_disagree_stop_ppo_epochs_together(tmp_path):
    """One rank's block alone would stop PPO's epochs early, the other's would not: the decision
    is taken on the global KL, both ranks stop at the same minibatch, and the run finishes. A loss
    that is not finite on one rank only makes both skip the step."""
    w.run_ranks(w.early_stop_worker, (str(tmp_path),), timeout_s=120)
    stops = [json.loads((tmp_path / f"stops.rank{r}.json").read_text()) for r in range(2)]
    assert stops[0] == stops[1] and max(stops[0][:3]) == 1.0
    # rank 1's NaN loss: both ranks skip every step (8 epochs x 4 minibatches, each counted)
    assert stops[0][3:5] == [32.0, 1.0]
    assert stops[0][5:] == [1.0, 0.0]  # dist.agree: rank 1's True is both ranks' decision
    a, b = (load_file(str(tmp_path / f"early.rank{r}.safetensors")) for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides,world,message", [
    ({"prompts_per_step": 3}, 2, "does not split evenly over 2 processes"),
    ({"prompts_per_step": 2}, 4, "4 processes need at least 4 prompts_per_step"),
    ({"shard": "fsdp"}, 1, "shard=fsdp splits a model over the processes"),
])
def test_a_batch_that_does_not_fit_the_processes_is_refused(tiny_lm, task_file, overrides, world, message):
    cfg = resolve_mod.resolve({}, overrides, {"algo": "reinforce", "task": str(task_file), "model": str(tiny_lm)})
    with pytest.raises(config_mod.ConfigError, match=message):
        config_mod.check_world(cfg, world)


def test_evaluation_over_two_ranks_equals_the_single_process_one(tmp_path, tiny_lm):
    """20 validation prompts (or text-env seeds) in chunks of 8: rank 0 samples two chunks and rank 1
    one, each with the chunk's own seed, replicated and with FSDP (sampling gathered once around the
    chunks: gathered per chunk, the ranks' different chunk counts paired one rank's all-gather with
    the other's gather of results); every number and sample equals one process's evaluation."""
    from lm_helpers import write_task
    task = write_task(tmp_path, [{"prompt": f"Tell me about {i}."} for i in range(200)],
                      "data: prompts.jsonl\nrewards: [vader]\nmax_new_tokens: 6\n")
    lm_paths = (str(tiny_lm), str(task))
    torch.set_num_threads(1)  # as the ranks: sampling's float sums depend on the thread count
    singles = {kind: w.workload(w.eval_config(lm_paths, episodes=kind == "episodes")).evaluate("validation")
               for kind in ("prompts", "episodes")}
    assert singles["prompts"]["eval/n"] == singles["episodes"]["eval/n"] == 20
    assert "eval/episode/turns_mean" in singles["episodes"]
    w.run_ranks(w.evaluation_worker, (str(tmp_path), lm_paths))
    for kind, single in singles.items():
        for shard in ("ddp", "fsdp"):
            got = json.loads((tmp_path / f"eval-{kind}-{shard}.json").read_text())
            assert got == json.loads(json.dumps(single)), (kind, shard)

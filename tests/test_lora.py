"""LoRA adapters (PEFT) on a tiny random model: the reference is the same model with the adapter
off (no second copy) or, from adapter=PATH, the starting adapter; only the adapter (and a value
head) trains, with every algorithm, TRPO over the adapter's parameters alone; checkpoints hold an
adapter folder PEFT loads, `merge` writes plain transformers weights with the same log-probs; bad
LoRA input is one line and loses nothing."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from lm_helpers import make_tiny_lm, write_task
from policygrad.algos import ALGOS, Progress
from policygrad.config import ConfigError
from policygrad.resolve import resolve
from policygrad.core import advantages
from policygrad.lm import adapters
from policygrad.lm.rollout import LMWorkload
from policygrad.lm.scoring import kl_per_completion


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A tiny model, a task, a starting adapter made for that model (random, non-zero B), and an
    adapter made for another model (a wider one)."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("lora")
    model = make_tiny_lm(folder / "tiny")
    task = write_task(folder, [{"prompt": f"Tell me about item {i}."} for i in range(24)],
                      "data: prompts.jsonl\nrewards:\n  - vader\n  - {reward: length, target: 4}\n"
                      "max_new_tokens: 6\n")
    for name, hidden in (("adapter", None), ("foreign", 48)):
        base_path = model if hidden is None else make_tiny_lm(folder / "wide", seed=1)
        if hidden is not None:  # a model of another width
            cfg = json.loads((base_path / "config.json").read_text())
            cfg.update(hidden_size=hidden, intermediate_size=96)
            (base_path / "config.json").write_text(json.dumps(cfg))
            base = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(model).config.__class__(**cfg))
        else:
            base = AutoModelForCausalLM.from_pretrained(base_path)
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        torch.manual_seed(3)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        peft.save_pretrained(folder / name)
    return {"model": model, "task": task, "adapter": folder / "adapter", "foreign": folder / "foreign"}


def lora_cfg(setup, algo="reinforce", **overrides):
    values = {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "eval_prompts": 2,
              "logprob_chunk": 4, "lr": 1e-2, **overrides}
    if "adapter" not in values and "lora_r" not in values:
        values["lora_r"] = 4
    return resolve({}, values, {"task": str(setup["task"]), "model": str(setup["model"]), "algo": algo})


def base_log_probs(setup, batch) -> torch.Tensor:
    """(B, T) log-probs of the bare base model, loaded on its own with plain transformers."""
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    return plain_log_probs(model, batch)


def plain_log_probs(model, batch) -> torch.Tensor:
    T = batch.actions.shape[1]
    attention = batch.obs_mask.long()
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=batch.obs[:, :-1], attention_mask=attention[:, :-1],
                       position_ids=positions[:, :-1]).logits[:, -T:].float()
    return torch.log_softmax(logits, -1).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1) * batch.mask


def perturb_adapter(work, scale=0.3):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in work.policy.actor_parameters():
            p.add_(scale * torch.randn_like(p))


def test_the_reference_is_the_model_with_the_adapter_off_and_no_second_copy(lora_setup):
    work = LMWorkload(lora_cfg(lora_setup), seed=0)
    assert work.policy.reference is work.policy.model  # one set of weights
    names = [n for n, p in work.policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    perturb_adapter(work)
    batch = work.collect()[0]
    expected = base_log_probs(lora_setup, batch)
    torch.testing.assert_close(batch.ref_log_prob, expected, atol=1e-5, rtol=1e-5)
    assert (batch.log_prob - batch.ref_log_prob).abs().max() > 0.05  # the adapter is on in the policy


@pytest.mark.parametrize("start, reference", [("new", None), ("adapter", "initial"), ("adapter", "base")])
def test_kl_at_the_first_step(lora_setup, start, reference):
    """A new adapter starts as the base model, and a starting adapter is its own reference by
    default: KL ~0 at the first step. lora_reference=base measures from the bare base model."""
    extra = {} if start == "new" else {"adapter": str(lora_setup["adapter"])}
    if reference == "base":
        extra["lora_reference"] = "base"
    work = LMWorkload(lora_cfg(lora_setup, **extra), seed=0)
    batch = work.collect()[0]
    kl = kl_per_completion(batch).abs().max().item()
    if reference == "base":
        torch.testing.assert_close(batch.ref_log_prob, base_log_probs(lora_setup, batch), atol=1e-5, rtol=1e-5)
        assert kl > 0.1
    else:
        assert kl < 1e-4, kl
    if start == "adapter":  # the policy is the starting adapter, not the base model
        assert (batch.log_prob - base_log_probs(lora_setup, batch)).abs().max() > 0.05


def test_the_initial_reference_stays_put_while_the_adapter_trains(lora_setup):
    cfg = lora_cfg(lora_setup, adapter=str(lora_setup["adapter"]))
    work = LMWorkload(cfg, seed=0)
    first = work.collect()[0]
    perturb_adapter(work)
    assert all(p.requires_grad for p in work.policy.actor_parameters())
    with torch.no_grad():
        again = work.policy.reference_log_prob(first)
    torch.testing.assert_close(again, first.ref_log_prob, atol=1e-6, rtol=1e-6)
    assert all(p.requires_grad for p in work.policy.actor_parameters())  # switching back re-arms it
    reference_names = [n for n, p in work.policy.model.named_parameters() if adapters.REFERENCE in n]
    assert reference_names and not any(p.requires_grad for n, p in work.policy.model.named_parameters()
                                       if adapters.REFERENCE in n)


@pytest.mark.parametrize("algo, extra", [
    ("reinforce", {}),
    ("ppo", {"batch_size": 2, "use_value_head": True, "advantage": "gae"}),
    ("trpo", {"max_kl": 0.05}),
])
def test_only_the_adapter_and_the_value_head_train(lora_setup, algo, extra):
    cfg = lora_cfg(lora_setup, algo, **extra)
    work = LMWorkload(cfg, seed=0)
    perturb_adapter(work, 0.05)  # B away from 0, so that A gets gradients too
    frozen = {n: p.detach().clone() for n, p in work.policy.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in work.policy.named_parameters() if p.requires_grad}
    batch = advantages.compute(work.collect()[0], cfg)
    a = ALGOS[algo]
    metrics = a.update(work.policy, a.make_optimizers(work.policy, cfg), batch, cfg,
                       Progress(1.0, torch.Generator().manual_seed(1)))
    assert metrics.get("trpo/accepted", 1.0) == 1.0 and metrics.get("update/nonfinite", 0.0) == 0.0
    params = dict(work.policy.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    now = dict(work.policy.named_parameters())
    assert all(not torch.equal(now[n], v) for n, v in trained.items()), [n for n, v in trained.items()
                                                                          if torch.equal(now[n], v)]
    if extra.get("use_value_head"):
        assert any(n.startswith("value_head") for n in trained)
    if algo == "trpo":  # the natural-gradient step spans the adapter alone
        n_adapter = sum(p.numel() for n, p in work.policy.model.named_parameters() if "lora_" in n)
        assert sum(p.numel() for p in work.policy.actor_parameters()) == n_adapter


def cli(*args):
    return subprocess.run([sys.executable, "-m", "policygrad.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def lora_run(lora_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run") / "run"
    r = cli("train", "--algo", "reinforce", "--task", lora_setup["task"], "--model", lora_setup["model"],
            "--steps", 2, "--out", out, "--no-progress", "lora_r=4", "lr=0.05", "prompts_per_step=2",
            "eval_prompts=2", "eval_every=0")
    assert r.returncode == 0, r.stderr
    return out


def test_the_checkpoint_holds_an_adapter_folder_peft_loads(lora_setup, lora_run):
    from peft import PeftModel
    from policygrad.trainer import load_workload

    folder = lora_run / "checkpoints" / (lora_run / "checkpoints" / "latest").read_text().strip()
    assert (folder / "policy" / "adapter_config.json").is_file()
    assert not (folder / "policy" / "model.safetensors").exists()  # no copy of the base weights
    work, cfg = load_workload(folder)
    batch = work.sample(work.task.rows("test")[:3], 2, seed=0)[0]
    base = AutoModelForCausalLM.from_pretrained(lora_setup["model"])
    loaded = PeftModel.from_pretrained(base, folder / "policy").eval()
    torch.testing.assert_close(plain_log_probs(loaded, batch), batch.log_prob, atol=1e-5, rtol=1e-5)
    assert (batch.log_prob - batch.ref_log_prob).abs().max() > 1e-3  # training moved it


def test_merge_writes_plain_transformers_weights_with_the_same_log_probs(lora_setup, lora_run, tmp_path):
    from policygrad.trainer import load_workload

    r = cli("merge", lora_run, "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    work, _ = load_workload(lora_run / "checkpoints" / (lora_run / "checkpoints" / "latest").read_text().strip())
    batch = work.sample(work.task.rows("test")[:3], 2, seed=0)[0]
    torch.testing.assert_close(plain_log_probs(merged, batch), batch.log_prob, atol=1e-4, rtol=1e-4)
    r = cli("merge", lora_run, "--out", tmp_path / "merged")  # never over an existing folder
    assert r.returncode == 2 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_rounding_loss_of_a_merge_on_hand_computed_weights():
    """bfloat16 steps by 2^-7 near 1: an update of 2^-7 survives the cast, one of 2^-9 is lost, so
    ||error|| / ||update|| = 2^-9 / sqrt(2^-14 + 2^-18) = 1 / sqrt(17); float32 loses nothing."""
    from policygrad.merging import rounding_loss
    base = {"w": torch.ones(2), "other": torch.zeros(3)}
    merged = {"w": torch.tensor([1 + 2 ** -7, 1 + 2 ** -9])}
    assert rounding_loss(base, merged, torch.bfloat16) == pytest.approx(1 / 17 ** 0.5)
    assert rounding_loss(base, merged, torch.float32) == 0.0 and rounding_loss(base, base, torch.bfloat16) == 0.0


@pytest.fixture(scope="module")
def bf16_run(lora_setup, tmp_path_factory):
    """A LoRA run on a bfloat16 base whose adapter adds a small update, B @ A * alpha / r of std
    1e-4 in every layer (what a short run at a small lr leaves), and that update in float32."""
    import policygrad
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bf16")
    AutoModelForCausalLM.from_pretrained(lora_setup["model"], dtype=torch.bfloat16).save_pretrained(folder / "base")
    AutoTokenizer.from_pretrained(lora_setup["model"]).save_pretrained(folder / "base")
    policygrad.train(algo="reinforce", task=str(lora_setup["task"]), model=str(folder / "base"), lora_r=4,
                     lora_alpha=8, total_steps=1, eval_every=0, prompts_per_step=2, samples_per_prompt=2,
                     eval_prompts=2, out=folder / "run", progress=False)
    latest = folder / "run" / "checkpoints" / (folder / "run" / "checkpoints" / "latest").read_text().strip()
    weights = load_file(str(latest / "policy" / adapters.ADAPTER_WEIGHTS))
    update = {}
    for a_key in [k for k in weights if "lora_A" in k]:
        b_key = a_key.replace("lora_A", "lora_B")
        weights[b_key] = torch.randn_like(weights[b_key])
        delta = weights[b_key] @ weights[a_key] * 2.0  # alpha / r = 8 / 4
        weights[b_key] *= 1e-4 / delta.std()
        name = a_key.removeprefix(adapters.PREFIX).replace(".lora_A.weight", ".weight")
        update[name] = weights[b_key] @ weights[a_key] * 2.0
    save_file(weights, str(latest / "policy" / adapters.ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder, update


def test_merge_on_a_bfloat16_base_keeps_a_small_update_in_float32(bf16_run, capsys):
    """#23: merging into bf16 weights and saving in bf16 rounded an update of std 1e-4 ~55% wrong.
    By default the merged weights are float32 (config.json says so) and merged - base is the
    adapter's update; --dtype bfloat16 saves bf16 and warns, one line, how much of it rounds away."""
    import policygrad
    from policygrad import cli as cli_mod
    from policygrad.merging import MergeWarning

    folder, update = bf16_run
    base = dict(AutoModelForCausalLM.from_pretrained(folder / "base").named_parameters())
    merged = AutoModelForCausalLM.from_pretrained(policygrad.merge(folder / "run", folder / "f32"))
    assert merged.dtype == torch.float32 and json.loads((folder / "f32" / "config.json").read_text())["dtype"] == "float32"
    weights = dict(merged.named_parameters())
    got = torch.cat([(weights[k] - base[k].float()).flatten() for k in update])
    want = torch.cat([v.flatten() for v in update.values()])
    assert (got - want).norm() / want.norm() < 1e-3
    with pytest.warns(MergeWarning, match=r"saving in bfloat16 rounds away [1-9]\d% of the update's norm"):
        policygrad.merge(folder / "run", folder / "bf16", dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(folder / "bf16").dtype == torch.bfloat16
    assert json.loads((folder / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert cli_mod.main(["merge", str(folder / "run"), "--out", str(folder / "half"), "--dtype", "float16"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if "policygrad:" in line] == err[-1:] and "policygrad: warning: saving in " \
        "float16 rounds away" in err[-1]
    with pytest.warns(MergeWarning):  # base: the base model's own dtype
        assert AutoModelForCausalLM.from_pretrained(policygrad.merge(folder / "run", folder / "own", dtype="base")
                                                    ).dtype == torch.bfloat16
    with pytest.raises(policygrad.merging.MergeError, match="dtype 'int8' is not one of: float32, bfloat16"):
        policygrad.merge(folder / "run", folder / "x", dtype="int8")


@pytest.mark.parametrize("overrides, message", [
    (["lora_r=4", "lora_target_modules=[qq_proj]"], "name no linear layer"),
    (["adapter=/nonexistent/adapter"], "does not exist"),
    (["adapter={model}"], "is not a PEFT adapter folder"),
    (["adapter={foreign}"], "was made for another base model"),
    (["lora_r=4", "lora_target_modules=[]"], "names no module"),
    (["lora_alpha=8"], "this run fine-tunes every weight"),
    (["adapter={adapter}", "lora_r=8"], "brings its own"),
    (["lora_r=4", "lora_reference=base"], "without adapter=PATH"),
])
def test_bad_lora_input_is_one_line_and_loses_nothing(lora_setup, tmp_path, overrides, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("precious: true\n")
    args = [o.format(**{k: str(v) for k, v in lora_setup.items()}) for o in overrides]
    r = cli("train", "--algo", "reinforce", "--task", lora_setup["task"], "--model", lora_setup["model"],
            "--out", out, "--overwrite", *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert (out / "config.yaml").read_text() == "precious: true\n"


def test_a_lora_run_without_lr_takes_the_lora_default(lora_setup):
    cfg = resolve({}, {"lora_r": 16}, {"task": str(lora_setup["task"]), "model": str(lora_setup["model"]),
                                       "algo": "reinforce"})
    assert cfg.lr == 3e-4
    with pytest.raises(ConfigError, match="lora_dropout must lie in"):
        resolve({}, {"lora_r": 4, "lora_dropout": 1.5}, {"task": str(lora_setup["task"]), "algo": "reinforce"})

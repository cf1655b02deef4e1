"""Devices and precision: `device` resolves to what the machine has or fails in one line; under
bfloat16 and float16 the trainable weights and Adam's state stay float32, the logits and log-probs
are float32, the old log-probs equal the training pass's exactly, the log-probs stay near float32's,
and a tiny model learns its task as it does in float32."""
import subprocess
import sys

import pytest
import torch

from lm_helpers import make_tiny_lm, write_task
from policygrad import placement
from policygrad.algos import ALGOS, Progress
from policygrad.config import ConfigError
from policygrad.resolve import resolve
from policygrad.core import advantages
from policygrad.lm.rollout import LMWorkload
from policygrad.placement import DeviceError, Placement, resolve_device, resolve_dtype


# --- device resolution ------------------------------------------------------------------------------
def fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")


def test_auto_is_the_first_gpu_where_there_is_one_and_the_cpu_here(monkeypatch):
    assert resolve_device("auto") == torch.device("cpu")  # this machine has no GPU
    assert resolve_device("cpu") == torch.device("cpu")
    fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto", small_model=True) == torch.device("cpu")  # control's MLPs
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_each_process_of_a_launch_takes_the_gpu_its_local_rank_names(monkeypatch):
    """Under torchrun (4 processes on this machine, this one LOCAL_RANK 3): auto and cuda are
    cuda:3; one named GPU for all of them, or fewer GPUs than processes, is refused in one line."""
    fake_gpus(monkeypatch, 4)
    for key, value in {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 3)
    with pytest.raises(DeviceError, match="names one GPU, and 4 processes share"):
        resolve_device("cuda:0")
    fake_gpus(monkeypatch, 2)
    with pytest.raises(DeviceError, match="4 processes on this machine need a GPU each"):
        resolve_device("auto")


@pytest.mark.parametrize("name, gpus, message", [
    ("cuda", 0, "torch sees no CUDA GPU"),
    ("cuda:2", 2, "has 2 CUDA GPU(s)"),
    ("cuda:x", 1, "is not a device"),
    ("tpu", 0, "is not a device"),
])
def test_an_absent_device_is_refused_in_one_line(monkeypatch, name, gpus, message):
    fake_gpus(monkeypatch, gpus)
    with pytest.raises(DeviceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(name)


def test_mps_is_refused_where_there_is_none(monkeypatch):
    monkeypatch.setattr(placement, "_mps_available", lambda: False)
    with pytest.raises(DeviceError, match="no Apple GPU"):
        resolve_device("mps")


def test_a_dtype_the_device_cannot_do_is_refused(monkeypatch):
    fake_gpus(monkeypatch, 1, bf16=False)
    with pytest.raises(DeviceError, match="Tesla V100 cannot compute in it"):
        resolve_dtype("bfloat16", torch.device("cuda", 0))
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float32
    assert resolve_dtype("float16", torch.device("cuda", 0)) == torch.float16


def test_control_runs_stay_on_the_cpu():
    cfg = resolve({}, {"device": "cuda"}, {"env": "CartPole-v1", "algo": "ppo"})
    with pytest.raises(DeviceError, match="control policies train on the CPU"):
        placement.resolve(cfg)
    assert placement.resolve(resolve({}, {}, {"env": "CartPole-v1", "algo": "ppo"})).device.type == "cpu"
    with pytest.raises(ConfigError, match="dtype is a language-model key"):
        resolve({}, {"dtype": "bfloat16"}, {"env": "CartPole-v1", "algo": "ppo"})


def test_train_on_an_absent_gpu_is_one_line_and_loses_nothing(tiny_lm, task_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("precious: true\n")
    r = subprocess.run([sys.executable, "-m", "policygrad.cli", "train", "--algo", "reinforce", "--task",
                        str(task_file), "--model", str(tiny_lm), "--out", str(out), "--overwrite",
                        "device=cuda"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "device=cuda" in r.stderr and "no CUDA GPU" in r.stderr
    assert (out / "config.yaml").read_text() == "precious: true\n"


# --- precision ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def letters_task(tmp_path_factory):
    """A task the tiny model learns in a few steps: the share of lowercase ASCII letters in a
    completion (about 0.1 at random)."""
    folder = tmp_path_factory.mktemp("letters")
    model = make_tiny_lm(folder / "tiny")
    (folder / "rewards.py").write_text(
        "def letters(prompts, completions):\n"
        "    return [sum(ch.isascii() and ch.islower() for ch in c) / max(len(c), 1) for c in completions]\n")
    task = write_task(folder, [{"prompt": f"Write item {i}:"} for i in range(60)],
                      "data: prompts.jsonl\nrewards:\n  - 'python:rewards.py:letters'\nmax_new_tokens: 6\n")
    return model, task


def letters_cfg(letters_task, dtype: str, algo: str = "reinforce", **overrides):
    model, task = letters_task
    values = {"prompts_per_step": 4, "samples_per_prompt": 4, "eval_every": 0, "kl_coef": 0.0, "lr": 1e-2,
              "dtype": dtype, **overrides}
    return resolve({}, values, {"task": str(task), "model": str(model), "algo": algo, "total_steps": 12})


def one_update(cfg, seed: int = 0):
    work = LMWorkload(cfg, seed=seed)
    batch = advantages.compute(work.collect()[0], cfg)
    algo = ALGOS[cfg.algo]
    opts = algo.make_optimizers(work.policy, cfg)
    metrics = algo.update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(1)))
    return work, opts, batch, metrics


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_log_probs_in_half_precision_stay_near_float32(letters_task, dtype):
    """The same completions scored by the same weights: the bfloat16 pass (8-bit mantissa
    activations, float32 logits) within 0.05 nats per token of the float32 one; float16 within 0.01."""
    full = LMWorkload(letters_cfg(letters_task, "float32"), seed=0)
    half = LMWorkload(letters_cfg(letters_task, dtype), seed=0)
    batch = full.collect()[0]
    with torch.no_grad():
        exact, approx = full.policy.log_prob(batch), half.policy.log_prob(batch)
    assert approx.dtype == torch.float32
    difference = ((approx - exact) * batch.mask).abs().max().item()
    assert 0 < difference < (0.05 if dtype == "bfloat16" else 0.01), difference


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_keeps_float32_where_it_matters(letters_task, dtype):
    """Trainable weights and Adam's moments float32; the frozen reference in the compute dtype;
    under autocast the old log-probs come from the training pass, so every ratio starts at exactly 1."""
    work, opts, batch, metrics = one_update(letters_cfg(letters_task, dtype, algo="ppo", batch_size=16))
    assert all(p.dtype == torch.float32 for p in work.policy.actor_parameters())
    assert all(v.dtype == torch.float32 for s in opts.main.state.values() for v in s.values() if v.numel() > 1)
    assert {p.dtype for p in work.policy.reference.parameters()} == {placement.DTYPES[dtype]}
    assert batch.log_prob.dtype == torch.float32
    fresh = LMWorkload(letters_cfg(letters_task, dtype, algo="ppo", batch_size=16), seed=0)
    batch = fresh.collect()[0]
    with torch.no_grad():
        assert torch.equal(fresh.policy.log_prob(batch), batch.log_prob)
    assert metrics["update/nonfinite"] == 0.0
    assert (opts.scaler is not None) == (dtype == "float16")
    if dtype == "float16":
        assert metrics["update/loss_scale"] > 1.0


def test_logits_are_float32_under_autocast(letters_task):
    work = LMWorkload(letters_cfg(letters_task, "bfloat16"), seed=0)
    from policygrad.lm.policy import float32_head
    head = work.policy.model.get_output_embeddings()
    hidden = torch.randn(2, 3, head.in_features).bfloat16()
    with work.policy.placement.autocast():
        logits = float32_head(head)(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.float() @ head.weight.float().T)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_run_learns_the_tiny_task_as_float32_does(letters_task, tmp_path, dtype):
    """12 REINFORCE steps from the same seed: held-out reward rises from ~0.1 in both precisions,
    and the half-precision run ends within 0.1 of the float32 one."""
    from policygrad.trainer import train
    cfg = letters_cfg(letters_task, "float32")
    base = LMWorkload(cfg, seed=cfg.seed).evaluate("test")["test/reward_mean"]
    full = train(cfg, tmp_path / "full", progress=False)["final_test_reward_mean"]
    half = train(letters_cfg(letters_task, dtype), tmp_path / "half", progress=False)["final_test_reward_mean"]
    assert full > base + 0.15 and half > base + 0.15, (base, full, half)
    assert abs(half - full) < 0.1, (full, half)


def test_the_placement_of_a_float32_cpu_run_changes_nothing():
    p = Placement(torch.device("cpu"), torch.float32)
    assert not p.mixed and not p.needs_loss_scale
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_eval_and_sample_take_a_device_and_refuse_an_absent_one(tiny_lm, task_file, tmp_path):
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "policygrad.cli"]
    r = subprocess.run([*cli, "train", "--algo", "reinforce", "--task", str(task_file), "--model", str(tiny_lm),
                        "--steps", "1", "--out", str(out), "--no-progress", "eval_every=0", "prompts_per_step=2",
                        "eval_prompts=2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "sample", str(out), "--prompt", "Hi", "--device", "cpu"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and '"completion"' in r.stdout, r.stderr
    for command in (["eval", str(out)], ["sample", str(out), "--prompt", "Hi"]):
        r = subprocess.run([*cli, *command, "--device", "cuda:1"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in r.stderr, r.stderr


def test_a_float16_runs_loss_scale_is_saved_and_restored(letters_task, tmp_path):
    from policygrad.trainer import restore, save_run, RunState
    cfg = letters_cfg(letters_task, "float16")
    work, opts, _, _ = one_update(cfg)
    opts.scaler.update(1234.0)  # a scale the fresh scaler would not have
    generators = {"shuffle": torch.Generator().manual_seed(0)}
    path = save_run(tmp_path, cfg, work, opts, RunState(update=1), generators)
    fresh = LMWorkload(cfg, seed=0)
    fresh_opts = ALGOS[cfg.algo].make_optimizers(fresh.policy, cfg)
    assert fresh_opts.scaler.get_scale() != 1234.0
    restore(path, cfg, fresh, fresh_opts, generators)
    assert fresh_opts.scaler.get_scale() == 1234.0

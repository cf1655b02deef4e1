"""benchmarks/gpu.py end to end on the CPU: tiny random models, full fine-tuning and LoRA, one step."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMES = ("step_s", "generate_s", "sampling_s", "reference_s", "train_s")


def test_gpu_benchmark_runs_on_cpu_and_reports_every_number():
    # one thread: tiny matmuls on two busy cores slow down ~10x when two threads contend
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--dtype", "float32",
                        "--tiny", "--steps", "1", "--models", "smollm2-135m", "--modes", "full,lora",
                        "--prompts", "2", "--samples", "2", "--prompt-len", "8", "--new-tokens", "8"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"device", "torch", "transformers", "peft", "job", "results", "target", "peak_flops"} <= set(report)
    assert report["device"] == "cpu" and report["peak_flops"] is None
    results = {row["mode"]: row for row in report["results"]}
    assert set(results) == {"full", "lora"}
    for row in results.values():
        assert row["model"] == "smollm2-135m"
        assert all(row[k] > 0 for k in TIMES), row
        assert row["generated_tokens_per_s"] > 0 and row["train_tokens_per_s"] > 0
        assert row["full_length"] and row["nonfinite_updates"] == 0  # forced to full length, finite updates
        assert row["mfu_train"] is None and row["peak_memory_gib"] is None  # no GPU: no peak, no memory
        assert row["flops"]["train"] > row["flops"]["reference"] > 0
    assert results["lora"]["trainable_params"] < results["full"]["trainable_params"]
    # full fine-tuning's training pass is 6N per position, LoRA's 4N
    assert results["full"]["flops"]["train"] == 1.5 * results["lora"]["flops"]["train"]
    assert "smollm2-135m" in r.stderr and "MFU train" in r.stderr  # the human table

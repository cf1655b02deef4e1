"""What the benchmark scripts share: the CPU's name (beside every timing) and running a policygrad
command as a user would, in its own process."""
import json
import subprocess
import sys


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def run_cli(*args: str) -> dict:
    """Run `python -m policygrad ARGS`; the JSON line it prints last ({} when it prints none, as
    `train` does), or exit with the command's last error line."""
    done = subprocess.run([sys.executable, "-m", "policygrad", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"policygrad {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    last = (done.stdout.strip().splitlines() or ["{}"])[-1]
    return json.loads(last) if last.startswith("{") else {}

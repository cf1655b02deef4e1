"""`policygrad train --nproc N`: N ranks on this machine, started as torchrun starts them.

Nothing here touches torch.distributed (dist.py joins the group in each rank); this module only
starts the processes, watches them and hands back one exit code.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from . import checkpoint, trainer
from . import config as config_mod
from .errors import LaunchError


def check_processes(nproc: Optional[int], cfg, launched_world: int) -> int:
    """The number of processes the run will have (--nproc, or torchrun's), checked against the
    batch before any process starts."""
    if nproc is not None:
        if nproc < 1:
            raise LaunchError(f"--nproc must be at least 1; got {nproc}")
        if launched_world > 1:
            raise LaunchError("--nproc starts its own processes, and this one was started by torchrun "
                              f"(WORLD_SIZE={launched_world}): drop --nproc")
    world = nproc if nproc is not None else launched_world
    config_mod.check_world(cfg, world)
    return world


def check_resume_world(out: Path, cfg, overwrite: bool, world: int) -> None:
    """Before launching: a run that will resume must resume at the process count that wrote it."""
    if overwrite or not (out / "config.yaml").is_file():
        return
    path = checkpoint.latest(out)
    if path is not None and (path / "state.json").is_file():
        try:
            saved = json.loads((path / "state.json").read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return  # the run itself reports a corrupt checkpoint
        if isinstance(saved.get("config"), dict) and config_mod.same_run(saved["config"], config_mod.to_dict(cfg)):
            trainer.check_resume_world(saved, path, world)


def without_nproc(argv: list[str]) -> list[str]:
    """The command line a launched rank runs: this one without --nproc N (or an abbreviation of
    it that argparse accepted, such as --np)."""
    out, skip = [], False
    for item in argv:
        flag = item.split("=", 1)[0]
        if skip:
            skip = False
        elif len(flag) >= 4 and "--nproc".startswith(flag):
            skip = "=" not in item
        else:
            out.append(item)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a spawned rank (Linux): a SIGKILL of the launcher ends the rank too, as torchrun's do."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(argv: list[str], nproc: int) -> int:
    """Run `python -m policygrad ARGV` as N ranks on this machine with the environment torchrun
    gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), so a
    worker cannot tell the two launches apart. If one rank fails, the others get a few seconds to
    notice and stop, then are terminated; the exit code is 2 when any rank met a user error. Errors
    reach the user as the ranks wrote them (one line each)."""
    port = free_port()
    procs = []
    for r in range(nproc):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GROUP_RANK": "0", "ROLE_RANK": str(r)}
        procs.append(subprocess.Popen([sys.executable, "-m", "policygrad", *argv], env=env,
                                      preexec_fn=_die_with_parent))
    try:
        while all(p.poll() in (None, 0) for p in procs) and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        deadline = time.time() + 5.0  # a failed rank's peers notice it and stop on their own
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    # a rank killed by a signal exits as a shell reports it (128 + the signal)
    codes = [c if c >= 0 else 128 - c for c in (p.returncode for p in procs) if c not in (0, -signal.SIGTERM)]
    # a user error (2) is the cause; the peers' lost-contact errors (1) follow from it
    return 2 if 2 in codes else (codes[0] if codes else 0)

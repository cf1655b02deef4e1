"""Run logging: metrics.jsonl (one JSON object per update), TensorBoard events, Weights & Biases
(optional), a progress bar and a closing summary table. Only rank 0 writes; other ranks get a logger
that does nothing."""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm  # a notebook widget in Jupyter, the terminal bar elsewhere

from .checkpoint import write_text_atomic
from .errors import LoggingError


def write_samples(out_dir: Path, name: str, samples: list[dict]) -> None:
    """An evaluation's samples as out_dir/samples/NAME.jsonl (generated text kept as it is, so a
    reader splits lines at "\n" only)."""
    folder = out_dir / "samples"
    folder.mkdir(exist_ok=True)
    with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")


def start_wandb(out_dir: Path, config: dict):
    """A W&B run in out_dir/wandb, offline unless WANDB_MODE says otherwise (`wandb sync` uploads
    it later); its id is kept in the run folder so that a resumed run logs into the same W&B run."""
    try:
        import wandb  # optional: only wandb=true needs it
    except ImportError:
        raise LoggingError("--wandb needs the wandb package: pip install wandb") from None
    id_file = out_dir / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    mode = os.environ.get("WANDB_MODE", "offline")
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "policygrad"), name=out_dir.name, id=run_id,
                          dir=str(out_dir), config=config, resume="allow", mode=mode,
                          settings=wandb.Settings(silent=True))
    except Exception as e:  # wandb's own errors (no network, no login) vary by version
        raise LoggingError(f"wandb could not start in {mode} mode ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); unset WANDB_MODE to log offline") from None


class RunLogger:
    def __init__(self, out_dir: Path, total: int, unit: str, enabled: bool = True, progress: bool = True,
                 done: int = 0, purge_step: Optional[int] = None, wandb_config: Optional[dict] = None):
        """done: units already trained (a resumed run); purge_step: drop TensorBoard events from
        this step on, which the resumed run writes again."""
        self.enabled = enabled
        self.out_dir = out_dir
        self.metrics_file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.tb = self.wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported here: slow, rank 0 only
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=purge_step)
            if wandb_config is not None:
                self.wandb = start_wandb(out_dir, wandb_config)
        self.bar = tqdm(total=total, initial=done, unit=unit, dynamic_ncols=True, file=sys.stderr,
                        disable=not (enabled and progress), smoothing=0.1)
        self.last: dict[str, float] = {}

    def log(self, step: int, metrics: dict, advance: int, headline: Optional[str] = None) -> None:
        self.bar.update(advance)
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        scalars = {k: v for k, v in metrics.items()
                   if "/" in k and isinstance(v, (int, float)) and math.isfinite(v)}
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        self.last.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if headline and headline in metrics and metrics[headline] is not None:
            self.bar.set_postfix_str(f"{headline.split('/')[-1]}={metrics[headline]:.1f}", refresh=False)

    def warn(self, message: str) -> None:
        """One line on stderr that does not break the progress bar."""
        if self.enabled:
            self.bar.write(f"policygrad: warning: {message}", file=sys.stderr)

    def run_mean(self, key: str) -> Optional[float]:
        """Mean of `key` over every update in metrics.jsonl (a resumed run's earlier updates too)."""
        if not self.enabled:
            return None
        self.metrics_file.flush()
        values = [row[key] for row in map(json.loads, (self.out_dir / "metrics.jsonl").read_text().splitlines())
                  if isinstance(row.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    def log_final(self, step: int, metrics: dict) -> None:
        """The closing evaluation: TensorBoard and final_eval.json (metrics.jsonl is per update)."""
        if not self.enabled or not metrics:
            return
        write_text_atomic(self.out_dir / "final_eval.json", json.dumps(metrics, indent=1))
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.summary.update(scalars)

    def close(self) -> None:
        self.bar.close()
        if not self.enabled:
            return
        self.tb.flush()
        self.tb.close()
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_table(rows: dict) -> str:
    width = max(len(k) for k in rows) if rows else 0
    lines = []
    for key, value in rows.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)

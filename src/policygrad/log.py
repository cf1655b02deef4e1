"""Run logging: metrics.jsonl (one JSON object per update), TensorBoard events, a progress bar and a
closing summary table. Only rank 0 writes; other ranks get a logger that does nothing."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm


class RunLogger:
    def __init__(self, out_dir: Path, total: int, unit: str, enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.out_dir = out_dir
        self.metrics_file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported here: slow, rank 0 only
            self.tb = SummaryWriter(str(out_dir / "tb"))
        self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr,
                        disable=not (enabled and progress), smoothing=0.1)
        self.last: dict[str, float] = {}

    def log(self, step: int, metrics: dict, advance: int, headline: Optional[str] = None) -> None:
        self.bar.update(advance)
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        for key, value in metrics.items():
            if "/" in key and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.last.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if headline and headline in metrics and metrics[headline] is not None:
            self.bar.set_postfix_str(f"{headline.split('/')[-1]}={metrics[headline]:.1f}", refresh=False)

    def log_final(self, step: int, metrics: dict) -> None:
        """The closing evaluation: TensorBoard and final_eval.json (metrics.jsonl is per update)."""
        if not self.enabled or not metrics:
            return
        (self.out_dir / "final_eval.json").write_text(json.dumps(metrics, indent=1))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.bar.close()
        if not self.enabled:
            return
        self.tb.flush()
        self.tb.close()
        self.metrics_file.close()


def format_table(rows: dict) -> str:
    width = max(len(k) for k in rows) if rows else 0
    lines = []
    for key, value in rows.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)

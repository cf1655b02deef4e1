"""Learning curves from run folders: one line per run, or a mean line with a min-max band per group of
seeds. The math (EMA, grouping, band) is pure and tested on hand-computed numbers; matplotlib is
imported only inside `plot_runs`, so importing the package stays fast and headless-safe."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import yaml

from .errors import PlotError


FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
# A seed part is a whole dash/underscore/dot-separated token: `seed1`, `seed-2`, `seed=4` or `s3`,
# so `ppo-s1000steps` or `lr3e-4` are left alone.
SEED_PART = re.compile(r"(?i)(?:^|[-_.])(?:seed[-_=]?|s)\d+(?=$|[-_.])")


def group_name(name: str) -> str:
    """The run folder name without its seed part: `ppo-seed1` and `ppo-seed2` both give `ppo`."""
    stripped = SEED_PART.sub("", name).strip("-_.")
    return stripped or "seed*"  # runs named just `seed1`, `seed2` still form one group


def ema(values: list[float], smooth: float) -> list[float]:
    """TensorBoard's smoothing: an EMA debiased by 1 - smooth**n, so the first points are not pulled
    towards 0 (the scalar dashboard's `resmoothDataset`). Per point, not per x distance."""
    out, acc = [], 0.0
    for n, v in enumerate(values, start=1):
        acc = acc * smooth + (1 - smooth) * v
        out.append(acc / (1 - smooth ** n))
    return out


def band(curves: list[tuple[list[float], list[float]]]) -> tuple[np.ndarray, ...]:
    """Mean, min and max over runs at the x values that every run has. Only measured points are used:
    interpolating onto the union would invent values between evaluations, and the shortest run (a
    killed seed) ends the band rather than the band silently narrowing to fewer seeds."""
    common = sorted(set.intersection(*(set(xs) for xs, _ in curves)))
    if not common:
        return (np.array([]),) * 4
    at = [dict(zip(xs, ys)) for xs, ys in curves]
    ys = np.array([[run[x] for x in common] for run in at], dtype=float)  # (runs, points)
    return np.array(common, dtype=float), ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_rows(run: Path) -> list[dict]:
    """metrics.jsonl rows; a line that is not a JSON object (a run killed mid-write) is skipped."""
    if not run.is_dir():
        raise PlotError(f"run folder '{run}' does not exist; pass folders written by `policygrad train`")
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"'{run}' has no metrics.jsonl; pass folders written by `policygrad train`")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def default_x(run: Path) -> str:
    """Language-model runs count updates (`step`); control runs count environment steps."""
    cfg_path = run / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else None
    except yaml.YAMLError:
        raise PlotError(f"'{cfg_path}' is not valid YAML; pass --x step or --x env_steps") from None
    return "step" if isinstance(cfg, dict) and cfg.get("task") is not None else "env_steps"


def series(rows: list[dict], x: str, metric: str) -> tuple[list[float], list[float]]:
    """(x, metric) where both are finite, sorted by x. A resumed run re-logs some steps; the last
    line for an x wins, as it is the one the surviving checkpoint lineage produced."""
    points = {row[x]: row[metric] for row in rows if finite(row.get(x)) and finite(row.get(metric))}
    xs = sorted(points)
    return xs, [points[k] for k in xs]


def check_args(run_dirs: list[Path], out: Path, smooth: float) -> None:
    if not run_dirs:
        raise PlotError("no run folders given; pass one or more folders written by `policygrad train`")
    if not 0 <= smooth < 1:
        raise PlotError(f"--smooth {smooth} is outside [0, 1); use 0 for raw values, e.g. 0.6 to smooth")
    if out.suffix.lower() not in FORMATS:
        raise PlotError(f"--out '{out}' has an unsupported suffix '{out.suffix}'; use one of {', '.join(FORMATS)}")


def save_atomic(fig, out: Path) -> None:
    """Write beside the target, then rename, so a reader never sees half an image."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, format=out.suffix.lower().lstrip(".").replace("jpg", "jpeg"))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_runs(run_dirs: list[Path], metric: str | list[str], out: Path, smooth: float = 0.6,
              x: str | None = None) -> dict:
    """Plot `metric` of each run (seed groups as mean + min-max band) into `out`; several metrics
    (a learned proxy reward and the rule it learnt from, say) go into one figure, a line per run
    and metric. Return a summary: {"out", "groups": {name: n_runs}, "points": finite metric values
    read, "skipped": runs without a metric}."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    run_dirs, out = [Path(r) for r in run_dirs], Path(out)
    check_args(run_dirs, out, smooth)
    groups: dict[str, list] = {}
    skipped, seen, x_keys, points = [], set(), set(), 0
    for run in run_dirs:
        rows = read_rows(run)
        seen.update(k for row in rows for k, v in row.items() if "/" in k and finite(v))
        key = x or default_x(run)
        for name in metrics:
            xs, ys = series(rows, key, name)
            if not xs:
                skipped.append(str(run) if len(metrics) == 1 else f"{run} ({name})")
                continue
            x_keys.add(key)
            points += len(xs)
            label = group_name(run.resolve().name) + (f": {name}" if len(metrics) > 1 else "")
            groups.setdefault(label, []).append((xs, ema(ys, smooth)))
    if not groups:
        known = sorted(seen)
        listed = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        where = f" with a finite '{x}'" if x else ""
        raise PlotError(f"metric '{', '.join(metrics)}' is in none of the runs{where}; metrics found: "
                        f"{listed or 'none'}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: only plotting loads it
    from matplotlib.figure import Figure  # a bare Figure on Agg: no pyplot, no global backend switch

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curves in groups.items():
        if len(curves) == 1:
            ax.plot(*curves[0], label=name, marker="o" if len(curves[0][0]) == 1 else None)  # 1 point: no line
            continue
        bx, mean, lo, hi = band(curves)
        if not len(bx):
            raise PlotError(f"the runs of group '{name}' share no {'/'.join(sorted(x_keys))} values; "
                            "plot them separately or pass --x update")
        line, = ax.plot(bx, mean, label=f"{name} (mean of {len(curves)}, min-max)",
                        marker="o" if len(bx) == 1 else None)
        ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    name = metrics[0] if len(metrics) == 1 else "value (metric in the legend)"  # long names overflow an axis
    ax.set(title=name if len(metrics) == 1 else f"{len(metrics)} metrics", xlabel=" / ".join(sorted(x_keys)),
           ylabel=name)
    ax.grid(alpha=0.3)
    ax.legend()
    save_atomic(fig, out)
    return {"out": str(out), "groups": {n: len(c) for n, c in groups.items()}, "points": points,
            "skipped": skipped}

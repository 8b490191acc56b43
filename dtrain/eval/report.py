"""Reporting a sweep: a rich table, a FID-vs-NFE plot (PNG), JSON rows, and W&B (table, line plot, grids).

wandb and matplotlib are imported only when used, so ``dtrain.eval`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dtrain import fileio
from dtrain.eval.grids import image_grid
from dtrain.eval.sweep import SweepRow

__all__ = ["print_table", "plot_fid_vs_nfe", "log_wandb", "write_json", "series", "scalars", "summary_line"]


def logger_mode(mode: str) -> str:
    """The W&B mode a run logs in: ``$WANDB_MODE`` (online, offline or disabled, as wandb's own messages tell users
    to set it) over the recipe's ``logger.mode``, unless the recipe says ``disabled`` (CSV logs: wandb is never
    imported). ``disabled`` from either writes the CSV logs."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = "offline" if env == "dryrun" else env  # wandb's old name for offline
    return mode if mode == "disabled" or env not in ("online", "offline", "disabled") else env


_LOGIN = """import sys, wandb
try:
    ok = wandb.login(verify=False)
except Exception as e:
    print(str(e).splitlines()[0] if str(e) else type(e).__name__, file=sys.stderr)
    sys.exit(3)
sys.exit(0 if ok else 3)
"""


def check_wandb_login(mode: str, key: str) -> None:
    """Online W&B needs credentials: looked up now (``wandb.login``, nothing sent), so a missing login is one line
    naming ``key`` before any work, not a traceback after it. In a fresh process without a terminal: this process's
    wandb may have set itself up offline already (its settings are global), and a prompt would wait forever."""
    if mode != "online":
        return
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "online", "WANDB_SILENT": "true"}
    try:
        r = subprocess.run([sys.executable, "-c", _LOGIN], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return  # undecided: wandb.init will say
    if r.returncode != 0:
        from dtrain.errors import InputError

        why = (r.stderr.strip().splitlines() or ["no API key"])[-1]
        raise InputError(f"{key}: online W&B needs a login: run `wandb login` or set WANDB_API_KEY, or log offline "
                         f"and `wandb sync` later ({why})")


def series(rows: Sequence[SweepRow | Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """line label (``label`` if a row has one, else the sampler) -> (NFEs, FIDs), in sweep order."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        d = r.to_dict() if isinstance(r, SweepRow) else r
        xs, ys = out.setdefault(d.get("label") or d["sampler"], ([], []))
        xs.append(int(d["nfe"]))
        ys.append(float(d["fid"]))
    return out


def scalars(rows: Sequence[SweepRow], prefix: str = "eval") -> dict[str, float]:
    """Each point's chartable numbers: ``{prefix}/fid/{sampler}_nfe{n}`` and, where scored,
    ``{prefix}/class_acc/{sampler}_nfe{n}``."""
    out: dict[str, float] = {}
    for r in rows:
        out[f"{prefix}/fid/{r.sampler}_nfe{r.nfe}"] = float(r.fid)
        if r.class_acc is not None:
            out[f"{prefix}/class_acc/{r.sampler}_nfe{r.nfe}"] = float(r.class_acc)
    return out


def summary_line(rows: Sequence[SweepRow]) -> str:
    """The sweep in one terminal line: ``ddim@8 FID 12.34 (acc 0.91), ...``."""
    return ", ".join(f"{r.sampler}@{r.nfe} FID {r.fid:.2f}" + (f" (acc {r.class_acc:.2f})" if r.class_acc is not None
                                                                else "") for r in rows)


def print_table(rows: Sequence[SweepRow], title: str = "FID vs NFE", console: Any = None) -> None:
    """The sweep as a rich table on stdout (or ``console``)."""
    from rich.console import Console
    from rich.table import Table

    has_acc = any(r.class_acc is not None for r in rows)
    has_is = any(r.inception_score is not None for r in rows)
    t = Table(title=title)
    cols = ["sampler", "NFE", "FID", *(["class acc"] if has_acc else []), *(["IS"] if has_is else []), "samples", "s"]
    for col in cols:
        t.add_column(col, justify="left" if col == "sampler" else "right")
    for r in rows:
        t.add_row(r.sampler, str(r.nfe), f"{r.fid:.3f}",
                  *([f"{r.class_acc:.4f}" if r.class_acc is not None else "-"] if has_acc else []),
                  *([f"{r.inception_score:.3f}" if r.inception_score is not None else "-"] if has_is else []),
                  str(r.num), f"{r.seconds:.1f}")
    (console or Console()).print(t)


def plot_fid_vs_nfe(rows: Sequence[SweepRow | Mapping[str, Any]], path: str | Path, *, floor: float | None = None,
                    title: str = "FID vs NFE") -> Path:
    """Line plot, one line per sampler, log-log axes; ``floor``: the real-vs-real FID as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, (xs, ys) in series(rows).items():
        ax.plot(xs, ys, marker="o", ms=3.5, label=name)
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label=f"real vs real ({floor:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set(xlabel="NFE (network evaluations per sample)", ylabel="FID", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(rows: Sequence[SweepRow], path: str | Path, **info: Any) -> Path:
    """Rows (without grids) plus run information as JSON."""
    return fileio.write_json(path, {**info, "rows": [r.to_dict() for r in rows]})


def log_wandb(rows: Sequence[SweepRow], run: Any = None, *, step: int | None = None, prefix: str = "eval",
              upscale: int = 4) -> None:
    """Log to W&B: a table of every point, FID vs NFE as a line plot (one line per sampler), a sample grid
    per point (image data) and each point's :func:`scalars` (FID, class accuracy).

    ``run``: the active run by default."""
    import wandb

    run = run or wandb.run
    if run is None:
        raise RuntimeError("log_wandb: no W&B run (call wandb.init or pass the run)")
    cols = ["sampler", "nfe", "steps", "fid", "class_acc", "inception_score", "num", "seconds"]
    table = wandb.Table(columns=cols, data=[[r.to_dict()[c] for c in cols] for r in rows])
    lines = series(rows)
    payload: dict[str, Any] = {
        f"{prefix}/fid_table": table,
        f"{prefix}/fid_vs_nfe": wandb.plot.line_series(
            xs=[xs for xs, _ in lines.values()], ys=[ys for _, ys in lines.values()], keys=list(lines),
            title="FID vs NFE", xname="NFE"),
    }
    payload.update(scalars(rows, prefix))
    for r in rows:
        if r.grid is not None and r.grid.ndim == 4:  # images (vector data such as the GMM gets no grid)
            payload[f"{prefix}/samples/{r.sampler}_nfe{r.nfe}"] = wandb.Image(
                image_grid(r.grid, upscale=upscale), caption=f"{r.sampler}, NFE {r.nfe}, FID {r.fid:.2f}")
    if step is not None:
        payload["trainer/global_step"] = step
    run.log(payload)

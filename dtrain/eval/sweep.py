"""FID against NFE: sample with each registered sampler at each budget, score every point, on any number of ranks.

The global sample set is fixed by (seed, num, batch_size), not by the world size: sample i starts from
x_T = sigma(t_max) z_i with z_i from its own generator (seed, i), and has label i mod num_classes (balanced
classes); global batch b = indices [b B, (b+1) B) is sampled by rank b mod world_size, with the sampler's
own noise from the generator (seed, b). Every point of a sweep reuses the same x_T (common random numbers). Features are
summed across ranks, so each point scores exactly ``num`` samples.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.guidance import CFGDenoiser
from dtrain.errors import InputError
from dtrain.samplers import SAMPLERS, check_sampler, run, steps_for_nfe
from dtrain.samplers.base import derive_seed, prior_std

if TYPE_CHECKING:  # torchmetrics is imported when a sweep runs, not by recipe validation
    from dtrain.eval.features import FeatureExtractor
    from dtrain.eval.fid import RefStats

__all__ = ["SweepRow", "parse_specs", "fid_sweep", "global_batches", "indexed_noise", "generate", "KEY"]

KEY = "eval.samplers"
Spec = tuple[str, list[int]]


def parse_specs(specs: str | Sequence[str | Spec], key: str = KEY) -> list[Spec]:
    """``["ddim:1,2,4", "dpm++2m:4,8"]`` (or ("ddim", [1, 2, 4]) pairs) -> [(sampler, [nfe, ...])].

    Any sampler registered in ``dtrain.samplers.SAMPLERS`` is accepted (few-step students register theirs).
    """
    if isinstance(specs, str):
        specs = specs.split()
    out: list[Spec] = []
    for spec in specs:
        if isinstance(spec, str):
            name, sep, nfes = spec.partition(":")
            if not sep or not nfes:
                hint = (" (a list element that is only a number: on the command line OmegaConf splits "
                        "eval.samplers=[ddim:1,2] at the comma; quote each spec: 'eval.samplers=[\"ddim:1,2\"]')"
                        if spec.strip().isdigit() else "")
                raise InputError(f"{key}: {spec!r} must be 'sampler:nfe,nfe,...' (e.g. 'ddim:1,2,4'){hint}")
            try:
                budgets = [int(n) for n in nfes.split(",")]
            except ValueError:
                raise InputError(f"{key}: {spec!r}: NFE values must be integers") from None
        else:
            name, budgets = spec[0], [int(n) for n in spec[1]]
        name = name.strip()
        if name not in SAMPLERS:
            raise InputError(f"{key}: unknown sampler {name!r}; choose one of {SAMPLERS.names()}")
        if not budgets or min(budgets) < 1:
            raise InputError(f"{key}: {name}: NFE values must be >= 1, got {budgets}")
        out.append((name, budgets))
    return out


def global_batches(num: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, range]]:
    """(batch index, sample indices) of the global batches this rank samples: b = rank, rank + world, ..."""
    if num < 1 or batch_size < 1:
        raise InputError(f"eval: num and batch_size must be >= 1, got {num}, {batch_size}")
    n_batches = -(-num // batch_size)
    return [(b, range(b * batch_size, min(num, (b + 1) * batch_size))) for b in range(rank, n_batches, world_size)]


def indexed_noise(indices: Iterable[int], shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32
                  ) -> Tensor:
    """x_T for the given global sample indices, each from its own generator (independent of batching)."""
    xs = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(derive_seed(seed, 0, i)), dtype=dtype)
          for i in indices]
    return torch.stack(xs)


def labels_for(indices: range, num_classes: int) -> Tensor | None:
    """Balanced labels i mod num_classes (None for unconditional models)."""
    return torch.arange(indices.start, indices.stop) % num_classes if num_classes > 0 else None


@torch.no_grad()
def generate(
    denoiser: DenoiserLike,
    sampler: str,
    nfe: int,
    batches: Sequence[tuple[int, range]],
    *,
    shape: Sequence[int],
    num_classes: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    spacing: str | None = None,
    **opts: Any,
) -> Iterable[tuple[Tensor, Tensor | None]]:
    """Yield (samples, labels) for each global batch; the same (seed, batch) gives the same samples anywhere.

    x_T = sigma(t_max) z (the samplers start at the schedule's t_max).
    """
    sigma_max = prior_std(denoiser.schedule)
    for b, idx in batches:
        x_T = sigma_max * indexed_noise(idx, shape, seed)
        y = labels_for(idx, num_classes)
        g = torch.Generator().manual_seed(derive_seed(seed, 1, b))
        x0 = run(sampler, denoiser, x_T.to(device), nfe, cond=None if y is None else y.to(device), generator=g,
                 spacing=spacing, **opts)
        yield x0, y


@dataclass
class SweepRow:
    """One point of a sweep; ``grid`` holds the first samples of rank 0 for a sample grid (not serialised)."""

    sampler: str
    nfe: int  # network evaluations per sample (the grid's steps times the sampler's cost per step)
    steps: int
    fid: float
    num: int
    seconds: float  # sampling and scoring, wall clock
    class_acc: float | None = None
    inception_score: float | None = None
    grid: Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("grid")
        return d


def fid_sweep(
    denoiser: DenoiserLike,
    specs: str | Sequence[str | Spec],
    *,
    num: int,
    batch_size: int,
    shape: Sequence[int],
    extractor: FeatureExtractor,
    ref: RefStats,
    num_classes: int = 0,
    guidance: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    spacing: str | None = None,
    grid_size: int = 64,
    progress: bool = True,
    ref_source: str = "",
    console: Any = None,
    guide: Callable[[Any, float, int], Any] | None = None,
    grids: Mapping[tuple[str, int], Tensor] | None = None,
    stop: Callable[[], bool] | None = None,
    done: Mapping[tuple[str, int], SweepRow] | None = None,
    on_row: Callable[[SweepRow], None] | None = None,
) -> list[SweepRow]:
    """FID (and class accuracy / IS) at each (sampler, NFE); call on every rank, rank 0 prints the table.

    ``num_classes > 0``: class-conditional with balanced labels (label ``num_classes`` is the null class) and
    guidance ``guidance`` applied by ``guide(model, w, null_label)`` (default: classifier-free guidance; a bundle
    kind's own, e.g. w as an input of a guided PD student: ``dtrain.export.bundle.kind_guide``); the class accuracy
    is scored when the extractor classifies the same ``num_classes`` labels (FID-digits). ``grids``: the time grid
    of a (sampler, NFE) point where it is not the default one (a bundle's stored grid, e.g. a PD student's). Budgets
    that come to the step count of an earlier point of the same sampler are skipped with a warning. ``stop``:
    called before each point on every rank (the same number of times: it may be a collective); True ends the
    sweep with the rows so far (a training run asked to stop). ``done``: rows of points already scored, by
    (sampler, steps) (an interrupted ``dtrain eval`` resumed), returned in their place without sampling;
    ``on_row``: called with each new row as it is scored (to persist it). Returns the same rows on every rank
    (grids: rank 0 only).
    """
    from dtrain.eval.fid import FID, dist_rank

    plan = parse_specs(specs)
    for name, _ in plan:
        check_sampler(name, denoiser, KEY)
    rank, world = dist_rank()
    device = torch.device(device) if device is not None else _device_of(denoiser)
    if num_classes > 0 and guidance != 1.0:
        denoiser = (guide or CFGDenoiser)(denoiser, guidance, num_classes)
    metric = FID(extractor, ref, shape=shape, device=device, ref_source=ref_source)
    batches = global_batches(num, batch_size, rank, world)
    score_labels = num_classes > 0 and extractor.num_classes == num_classes  # the classifier knows these labels
    points, seen = [], set()
    for name, budgets in plan:
        for n in budgets:
            key = (name, steps_for_nfe(name, n))
            if key in seen:
                warnings.warn(f"{KEY}: {name}:{n} runs the {key[1]} step(s) of an earlier point; skipped", stacklevel=2)
                continue
            seen.add(key)
            points.append((name, n))
    bar = _progress(progress and rank == 0, console)
    lines = progress and rank == 0 and not bar.console.is_terminal  # a SLURM log: a line per point, not a bar

    def said(row: SweepRow, cached: bool = False) -> None:
        if lines:
            acc = "" if row.class_acc is None else f", class acc {row.class_acc:.3f}"
            how = "cached: scored by an earlier run" if cached else f"{row.seconds:.1f} s"
            print(f"FID sweep {len(rows)}/{len(points)}: {row.sampler} NFE {row.nfe}: FID {row.fid:.4f}{acc} ({how})",
                  flush=True)

    rows: list[SweepRow] = []
    with bar:
        task = bar.add_task("FID sweep", total=len(points) * len(batches))
        for name, budget in points:
            if stop is not None and stop():
                break
            steps = steps_for_nfe(name, budget)
            if done is not None and (name, steps) in done:
                rows.append(done[(name, steps)])
                said(rows[-1], cached=True)
                bar.advance(task, len(batches))
                continue
            bar.update(task, description=f"{name} NFE {budget}")
            metric.reset()
            grid: list[Tensor] = []
            t0 = time.perf_counter()
            for x0, y in generate(denoiser, name, budget, batches, shape=shape, num_classes=num_classes, seed=seed,
                                  device=device, spacing=spacing, grid=(grids or {}).get((name, budget))):
                metric.update(x0, y if score_labels else None)
                if rank == 0 and sum(len(g) for g in grid) < grid_size:
                    grid.append(x0[: grid_size - sum(len(g) for g in grid)].float().cpu())
                bar.advance(task)
            res = metric.compute()  # syncs ranks (and the GPU): the time covers sampling and scoring
            seconds = time.perf_counter() - t0
            if res["count"] != num:  # a broken split would silently change the estimate
                raise RuntimeError(f"FID sweep: scored {res['count']} samples, expected {num}")
            rows.append(SweepRow(name, SAMPLERS.get(name).nfe(steps), steps, res["fid"], num, seconds,
                                 res.get("class_acc"), res.get("inception_score"),
                                 torch.cat(grid) if grid else None))
            said(rows[-1])
            if on_row is not None:
                on_row(rows[-1])
    if rank == 0 and progress:
        from dtrain.eval.report import print_table

        print_table(rows, title=f"FID vs NFE (guidance w = {guidance:g})" if num_classes > 0 else "FID vs NFE",
                    console=console)
    return rows


def _device_of(denoiser: Any) -> torch.device:
    try:
        return next(denoiser.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _progress(show: bool, console: Any = None) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not show)

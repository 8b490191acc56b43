"""FID on torchmetrics' ``FrechetInceptionDistance`` with pluggable features, reference statistics
with metadata, and exact sums across ranks (Heusel et al. 2017, arXiv 1706.08500).

FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2}), in float64. torchmetrics keeps running sums
(sum f, sum f f^T, n) that it adds over ranks at ``compute``; reference statistics enter as the same sums on
rank 0 only (zero elsewhere), so the synced metric is exact for any world size. Reference files (.npz) carry
the extractor name, its weights' sha256, the image resolution and the count, and are refused when they do
not match the evaluation.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

from dtrain.data.digits import digits_arrays
from dtrain.errors import InputError
from dtrain.eval.features import BUILTIN_REFS, FeatureExtractor

__all__ = ["RefStats", "RefStatsError", "FID", "ClassStats", "make_fid", "compute_ref_stats", "load_ref", "dist_rank",
           "BUILTIN_REFS"]

REF_FORMAT = 1


class RefStatsError(InputError):
    """Reference statistics that do not fit the evaluation (or are not a valid file)."""


def dist_rank() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------
# torchmetrics' state <-> (mu, sigma, n): the only place that converts between sums and moments


def _get_stats(metric: FrechetInceptionDistance, side: str) -> tuple[np.ndarray, np.ndarray, int]:
    n = int(getattr(metric, f"{side}_features_num_samples"))
    if n < 2:
        raise ValueError(f"FID: need at least 2 {side} samples, got {n}")
    s, ss = getattr(metric, f"{side}_features_sum").double(), getattr(metric, f"{side}_features_cov_sum").double()
    mu = s / n
    sigma = (ss - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy(), n


def _set_stats(metric: FrechetInceptionDistance, side: str, mu: np.ndarray, sigma: np.ndarray, n: int,
               here: bool = True) -> None:
    """Write (mu, sigma, n) as torchmetrics' sums; ``here=False`` writes zeros (the other ranks' share)."""
    dev = getattr(metric, f"{side}_features_sum").device
    m = torch.as_tensor(mu, dtype=torch.float64, device=dev)
    S = torch.as_tensor(sigma, dtype=torch.float64, device=dev)
    k = float(n) if here else 0.0
    setattr(metric, f"{side}_features_sum", k * m)
    setattr(metric, f"{side}_features_cov_sum", (k - 1 if here else 0.0) * S + k * torch.outer(m, m))
    setattr(metric, f"{side}_features_num_samples", torch.tensor(n if here else 0, device=dev))


# ---------------------------------------------------------------------------------------------
# Reference statistics


@dataclass
class RefStats:
    """Feature mean and covariance of a reference set, with what they were computed with. ``key``: where they were
    named (the field ``eval.ref_stats``, or a flag: ``--ref-stats``), for the errors of ``check``; not saved."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = field(default="eval.ref_stats", compare=False, repr=False)

    @property
    def count(self) -> int:
        return int(self.meta.get("count", 0))

    def save(self, path: str | Path) -> Path:
        from dtrain.fileio import replacing

        path = Path(path)
        with replacing(path) as f:  # whole or not at all; a file object keeps np.savez from appending ".npz"
            np.savez(f, mu=self.mu.astype(np.float64), sigma=self.sigma.astype(np.float64),
                     meta=np.array(json.dumps({"format": REF_FORMAT, **self.meta}, sort_keys=True)))
        return path

    @staticmethod
    def read_meta(path: str | Path, key: str = "eval.ref_stats") -> dict[str, Any]:
        """The metadata of a statistics file without its arrays (an .npz's members are read one by one, on use);
        ``RefStatsError`` naming ``key`` when it is no such file."""
        with _reading(path, key), np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
        if not isinstance(meta, dict):
            raise RefStatsError(f"{key}: {path}: its metadata is not a mapping")
        return meta

    @classmethod
    def load(cls, path: str | Path, key: str = "eval.ref_stats") -> RefStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{key}: reference statistics not found: {path} (make them with "
                                    f"`python tools/fid_ref_stats.py --out {path} ...`, or use a built-in: "
                                    f"{', '.join(BUILTIN_REFS)})")
        with _reading(path, key), np.load(path, allow_pickle=False) as z:
            mu, sigma, meta = z["mu"], z["sigma"], json.loads(str(z["meta"]))
        if meta.get("format") != REF_FORMAT or mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise RefStatsError(f"{key}: {path}: unsupported format {meta.get('format')} or shapes "
                                f"mu {mu.shape}, sigma {sigma.shape}")
        return cls(mu.astype(np.float64), sigma.astype(np.float64), meta, key)

    def check(self, extractor: FeatureExtractor, shape: Sequence[int] | None = None, source: str = "") -> None:
        """Refuse statistics made with another extractor, other weights or another resolution."""
        want = {"extractor": extractor.name, "weights_sha256": extractor.weights_sha256,
                "num_features": extractor.num_features}
        if extractor.preprocess:  # files made before it was recorded: refused (another resize)
            want["preprocess"] = extractor.preprocess
        if shape is not None:
            want["resolution"] = [int(s) for s in shape]
        bad = [f"{k}: file has {self.meta.get(k)!r}, evaluation uses {v!r}" for k, v in want.items()
               if self.meta.get(k) != v]
        if bad:
            where = f" {source}" if source else ""
            same = "feature extractor" if self.key.startswith("--") else "eval.feature_extractor"
            raise RefStatsError(
                f"{self.key}: reference statistics{where} do not match this evaluation ("
                + "; ".join(bad)
                + f"); recompute them with tools/fid_ref_stats.py using the same {same} and weights"
            )


@contextlib.contextmanager
def _reading(path: str | Path, key: str) -> Iterator[None]:
    """numpy's errors reading a statistics file as one ``RefStatsError`` naming ``key`` and the file."""
    try:
        yield
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        why = "not an .npz archive" if "pickle" in str(e) else str(e)  # numpy's reason, not its hint to allow pickle
        raise RefStatsError(f"{key}: {path} is not a dtrain reference-statistics file (.npz with mu, sigma, meta): "
                            f"{why}") from None


def ref_meta(extractor: FeatureExtractor, shape: Sequence[int], count: int, source: str) -> dict[str, Any]:
    return {"extractor": extractor.name, "weights_sha256": extractor.weights_sha256,
            "num_features": extractor.num_features, "resolution": [int(s) for s in shape],
            "count": int(count), "source": source, **({"preprocess": extractor.preprocess} if extractor.preprocess
                                                       else {})}


@torch.no_grad()
def compute_ref_stats(extractor: FeatureExtractor, batches: Iterable[Tensor], source: str = "",
                      device: str | torch.device = "cpu", sync: bool = True,
                      shape: Sequence[int] | None = None) -> RefStats:
    """mu / sigma of ``extractor`` features over image batches in [-1, 1].

    ``sync``: each rank passed its own share; the sums are added over ranks (False: this rank's data only).
    ``shape``: the images' (C, H, W) (else the first batch's), which a rank left without images needs.
    """
    metric = make_fid(extractor).to(device)
    shape = tuple(shape) if shape is not None else None
    for x in batches:
        shape = shape or tuple(x.shape[1:])
        metric.update(x.to(device), real=True)
    sync = sync and dist_rank()[1] > 1
    metric.sync(should_sync=sync)
    mu, sigma, n = _get_stats(metric, "real")
    metric.unsync(should_unsync=sync)
    if shape is None:
        raise ValueError("fid_ref_stats: the dataset yielded no images")
    return RefStats(mu, sigma, ref_meta(extractor, shape, n, source))


def load_ref(spec: str | Path, extractor: FeatureExtractor, device: str | torch.device = "cpu",
             key: str = "eval.ref_stats") -> RefStats:
    """``eval.ref_stats``: an .npz from tools/fid_ref_stats.py, or a built-in name (``digits:train`` ...); errors name
    ``key`` (the field, or a flag: ``--ref-stats``)."""
    if str(spec) in BUILTIN_REFS:
        split = str(spec).split(":", 1)[1]
        x, _ = digits_arrays(split)
        ref = compute_ref_stats(extractor, x.split(512), f"sklearn digits, split {split}", device, sync=False)
        ref.key = key
        return ref
    if str(spec).startswith("digits:"):
        raise RefStatsError(f"{key}: unknown built-in reference statistics {str(spec)!r}; choose one of "
                            f"{list(BUILTIN_REFS)} or give a .npz file from tools/fid_ref_stats.py")
    return RefStats.load(spec, key)


# ---------------------------------------------------------------------------------------------
# Metrics


def make_fid(extractor: FeatureExtractor, ref: RefStats | None = None) -> FrechetInceptionDistance:
    """torchmetrics FID on ``extractor``; ``ref`` fills the real side (rank 0's share, kept across ``reset``)."""
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=ref is None, normalize=False)
    metric.orig_dtype = torch.float64  # compute() casts to the features' dtype; a rank without samples has none
    if ref is not None:
        if ref.mu.size != extractor.num_features:
            raise RefStatsError(f"{ref.key}: {ref.mu.size} features, extractor {extractor.name!r} gives "
                                f"{extractor.num_features}")
        _set_stats(metric, "real", ref.mu, ref.sigma, ref.count, here=dist_rank()[0] == 0)
    return metric


class ClassStats(Metric):
    """Class accuracy of conditional samples and the Inception Score (Salimans et al. 2016, arXiv 1606.03498).

    IS = exp(E_x KL(p(y|x) || p(y))) with one split, from the summed p(y|x) and sum_y p log p: exact over ranks.
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.add_state("p_sum", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("plogp_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("labelled", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor | None = None) -> None:
        logp = torch.log_softmax(logits.double(), dim=1)
        p = logp.exp()
        self.p_sum += p.sum(0)
        self.plogp_sum += (p * logp).sum()
        self.n += logits.shape[0]
        if labels is not None:
            self.correct += (logits.argmax(1) == labels.to(logits.device)).sum()
            self.labelled += labels.numel()

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if int(self.n) > 0:
            pbar = self.p_sum / self.n
            kl = self.plogp_sum / self.n - (pbar * pbar.clamp_min(1e-300).log()).sum()
            out["inception_score"] = float(kl.exp())
        if int(self.labelled) > 0:
            out["class_acc"] = float(self.correct) / float(self.labelled)
        return out


class FID:
    """FID of generated images against reference statistics, plus class accuracy and IS where the extractor
    has a classifier head. ``update`` on each rank's share; ``compute`` syncs (exact totals)."""

    def __init__(self, extractor: FeatureExtractor, ref: RefStats, *, shape: Sequence[int] | None = None,
                 device: str | torch.device = "cpu", ref_source: str = "") -> None:
        ref.check(extractor, shape, ref_source)
        self.extractor = extractor
        self.fid = make_fid(extractor, ref).to(device)
        self.classes = ClassStats(extractor.num_classes).to(device) if extractor.num_classes else None
        self.nonfinite = torch.zeros((), dtype=torch.long, device=device)  # samples with a NaN / inf value

    @torch.no_grad()
    def update(self, x: Tensor, labels: Tensor | None = None) -> None:
        """Score a batch of samples; non-finite ones (a diverged model) are counted, scored as zeros, and make
        ``compute``'s FID nan (quantised to uint8 they would look like black images and give a finite FID)."""
        x = x.to(self.fid.device)
        bad = ~torch.isfinite(x.flatten(1)).all(1)
        self.nonfinite += bad.sum()
        x = torch.where(bad.reshape(-1, *[1] * (x.ndim - 1)), torch.zeros_like(x), x)
        self.fid.update(x, real=False)
        if self.classes is not None:
            self.classes.update(self.extractor.logits(x), labels)

    def compute(self) -> dict[str, float]:
        with warnings.catch_warnings():  # a rank may hold no samples of its own (num < world_size x batch)
            warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")
            out = {"fid": float(self.fid.compute()), "count": int(self._synced(self.fid.fake_features_num_samples))}
        if self.classes is not None:
            out.update(self.classes.compute())
        if (bad := self._synced(self.nonfinite)) > 0:
            warnings.warn(f"FID: {bad} of {out['count']} samples are not finite (NaN / inf); FID reported as nan",
                          stacklevel=2)
            out["fid"], out["nonfinite"] = math.nan, bad
        return out

    @staticmethod
    def _synced(n: Tensor) -> int:
        """A count summed over ranks."""
        n = n.clone()
        if dist_rank()[1] > 1:
            torch.distributed.all_reduce(n)
        return int(n)

    def reset(self) -> None:
        self.nonfinite.zero_()
        self.fid.reset()
        if self.classes is not None:
            self.classes.reset()

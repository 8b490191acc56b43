"""Feature extractors for FID, by registry name: ``digits`` (a small CNN trained on sklearn digits),
``inception`` (Inception-v3 pool3 from a local weights file) and ``raw`` (the flattened input itself).

Every extractor takes images in [-1, 1] as ``[B, C, H, W]`` (``raw``: any shape) and returns float64
features ``[B, num_features]``; ``logits`` (where the network has a classifier head) give the class
accuracy of conditional samples and the Inception Score. ``weights_sha256`` identifies the weights, so
reference statistics computed with other weights are refused (``dtrain.eval.fid``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from dtrain.errors import InputError, first_line
from dtrain.registry import Registry

__all__ = [
    "EXTRACTORS",
    "FeatureExtractor",
    "DigitsNet",
    "DigitsFeatures",
    "InceptionFeatures",
    "RawFeatures",
    "build_extractor",
    "file_sha256",
    "DIGITS_WEIGHTS",
    "INCEPTION_URL",
    "BUILTIN_REFS",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_WEIGHTS = ASSETS / "digits_classifier.safetensors"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_KEY = "eval.feature_extractor_weights_path"
BUILTIN_REFS = ("digits:train", "digits:test", "digits:all")  # eval.ref_stats names computed in memory


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FeatureExtractor(nn.Module):
    """Base: ``forward(x) -> float64 [B, num_features]``; ``logits(x)`` when there is a classifier head."""

    name: str = ""
    num_features: int = 0
    num_classes: int = 0
    weights_sha256: str = ""
    preprocess: str = ""  # how inputs are resized etc., where that is a choice (recorded with reference stats)
    input_shape: tuple[int, ...] | None = None  # (C, H, W) the extractor accepts; None: any
    key: str = "eval.feature_extractor"  # what named it (a flag): errors about its input name this

    def check_input(self, x: Tensor) -> None:
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            want = "x".join(map(str, self.input_shape))
            raise ValueError(
                f"{self.key}: {self.name!r} takes images [B, {', '.join(map(str, self.input_shape))}] "
                f"({want}) in [-1, 1], got {list(x.shape)}; for other data use 'raw' (pixels as features, no "
                f"weights) or 'inception' (any size, its weights file)"
            )

    def train(self, mode: bool = True) -> FeatureExtractor:  # frozen: never leaves eval mode
        return super().train(False)

    def logits(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"feature extractor {self.name!r} has no classifier head")


# ---------------------------------------------------------------------------------------------
# digits: a small CNN on sklearn's 8x8 digits; features are the pooled last conv layer (like Inception's pool3)


class DigitsNet(nn.Module):
    """Four 3x3 convolutions on 8x8 inputs, global average pool -> ``width * 2`` features -> 10 logits."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(2 * w, num_classes)
        self.num_features, self.num_classes = 2 * w, num_classes

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class DigitsFeatures(FeatureExtractor):
    """FID-digits: ``DigitsNet`` trained by tools/train_digits_classifier.py (weights in dtrain/assets)."""

    name = "digits"
    input_shape = (1, 8, 8)

    def __init__(self, weights_path: str | Path | None = None, weights_key: str = WEIGHTS_KEY) -> None:
        super().__init__()
        path = Path(weights_path) if weights_path is not None else DIGITS_WEIGHTS
        if path.is_dir():
            raise InputError(f"{weights_key}: {path} is a directory; give the digits classifier .safetensors file")
        if not path.is_file():
            raise FileNotFoundError(
                f"{weights_key}: digits classifier weights not found at {path}; they ship with dtrain "
                f"(dtrain/assets/digits_classifier.safetensors) and are rebuilt by "
                f"`python tools/train_digits_classifier.py --overwrite-shipped`"
            )
        from safetensors import safe_open

        self.weights_sha256 = file_sha256(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            self.net = DigitsNet(width=int(meta.get("width", 32)))
            self.net.load_state_dict(state)
        except Exception as e:  # not safetensors (SafetensorError), or another network's tensors (RuntimeError)
            raise InputError(f"{weights_key}: {path} is not a digits classifier .safetensors file (from "
                             f"tools/train_digits_classifier.py): {first_line(e)}") from None
        self.net.requires_grad_(False).eval()
        self.num_features, self.num_classes = self.net.num_features, self.net.num_classes

    def _prep(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return x.to(self.net.head.weight.dtype).clamp(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(self._prep(x)).double()

    def logits(self, x: Tensor) -> Tensor:
        return self.net(self._prep(x)).double()


# ---------------------------------------------------------------------------------------------
# inception: torchmetrics' torch-fidelity port of the TF FID network (pool3, 2048 features)


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 (FID's network, arXiv 1706.08500) from a local weights file; never downloads.

    Images in [-1, 1] with 1 or 3 channels, any size: quantized to uint8 like saved PNGs, then resized
    to 299x299 inside the network.
    """

    name = "inception"

    def __init__(self, weights_path: str | Path | None = None, weights_key: str = WEIGHTS_KEY) -> None:
        super().__init__()
        if weights_path is not None and Path(weights_path).is_dir():
            raise InputError(f"{weights_key}: {weights_path} is a directory; give the FID Inception weights file "
                             f"(pt_inception-2015-12-05.pth from {INCEPTION_URL})")
        if weights_path is None or not Path(weights_path).is_file():
            where = "is not set" if weights_path is None else f"points to a missing file: {weights_path}"
            raise FileNotFoundError(
                f"{weights_key} {where}. The 'inception' feature extractor never downloads at run time: "
                f"fetch the FID Inception weights once (curl -L -o pt_inception-2015-12-05.pth {INCEPTION_URL}) "
                f"and set {WEIGHTS_KEY}=<that file> (or --weights on the command line)"
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ModuleNotFoundError as e:  # pragma: no cover - torch-fidelity is a dependency
            raise ModuleNotFoundError("the 'inception' feature extractor needs torch-fidelity: pip install "
                                      "torch-fidelity") from e
        try:
            torch.load(weights_path, map_location="cpu", weights_only=True)  # refuse pickled code before the real load
            # antialias=False: torch-fidelity's TF1-style bilinear resize to 299, as the reference TF FID (torch's
            # half-pixel resize moved a smooth 32x32 image's pixels by 12 grey levels on average)
            self.net = NoTrainInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], str(weights_path),
                                          antialias=False)
            self.preprocess = "tf1-bilinear-299"
        except Exception as e:  # pickled code (UnpicklingError), another network's weights (RuntimeError), ...
            raise InputError(f"{weights_key}: {weights_path} is not the FID Inception weights file "
                             f"(pt_inception-2015-12-05.pth from {INCEPTION_URL}): {first_line(e)}") from None
        self.weights_sha256 = file_sha256(weights_path)
        self.num_features, self.num_classes = 2048, 1008

    def _both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.key}: 'inception' takes images [B, 1 or 3, H, W], got {list(x.shape)}")
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
        feats, logits = self.net._torch_fidelity_forward(u8)
        return feats.double(), logits.double()

    def forward(self, x: Tensor) -> Tensor:
        return self._both(x)[0]

    def logits(self, x: Tensor) -> Tensor:
        return self._both(x)[1]


# ---------------------------------------------------------------------------------------------
# raw: the flattened sample itself (low-dimensional data such as the GMM; closed-form tests)


class RawFeatures(FeatureExtractor):
    """Identity features: FID in data space (the Frechet distance of the samples themselves)."""

    name = "raw"

    def __init__(self, weights_path: str | Path | None = None, shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if shape is None:
            raise ValueError(f"{self.key}: 'raw' needs the sample shape")
        self.input_shape = tuple(int(s) for s in shape)
        self.num_features = math.prod(self.input_shape)
        self.weights_sha256 = hashlib.sha256(json.dumps(["raw", *self.input_shape]).encode()).hexdigest()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return x.flatten(1).double()


EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry("feature extractor")
EXTRACTORS.register("digits", lambda weights_path, shape, weights_key: DigitsFeatures(weights_path, weights_key))
EXTRACTORS.register("inception", lambda weights_path, shape, weights_key: InceptionFeatures(weights_path, weights_key))
EXTRACTORS.register("raw", lambda weights_path, shape, weights_key: RawFeatures(weights_path, shape))


def build_extractor(name: str, weights_path: str | Path | None = None, shape: Sequence[int] | None = None, *,
                    key: str = "eval.feature_extractor", weights_key: str = WEIGHTS_KEY) -> FeatureExtractor:
    """A feature extractor by registry name; errors name ``key`` (its flag or recipe key) or ``weights_key``."""
    extractor = EXTRACTORS.get(name, key)(weights_path, shape, weights_key)
    extractor.key = key
    return extractor

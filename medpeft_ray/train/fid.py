"""FID of generated images against a fixed reference set (the diffusion text-to-image setting).

:class:`FidScorer` turns images into features once per set and keeps the reference (real) set's
Gaussian, so a long-lived worker scores many trials' generated sets against the same validation
images without extracting them again, and one ``score`` call never sees another's images.

Features:

* with ``search.fid_weights``: the standard FID network, torch-fidelity's
  ``FeatureExtractorInceptionV3`` (Inception-v3 with the TF 2015-12-05 weights that pytorch-fid,
  torch-fidelity and torchmetrics use, ``pt_inception-2015-12-05-6726825d.pth``; its 2048-d pool
  features, its TF1-compatible resize to 299 px), built from that local file through its
  ``feature_extractor_weights_path`` argument, so nothing is ever downloaded. torch-fidelity reads
  the file with ``torch.load(weights_only=False)``; :func:`check_fid_weights` reads it first with
  ``weights_only=True`` and checks every tensor against the architecture, so a file that would need
  unsafe unpickling (or is another model's) is refused with one line before torch-fidelity opens it.
* without: a clearly labelled stand-in, a small random conv net (weights from a generator seeded 0,
  the same in every process) at 64 px. Its scores rank sets only against each other within one
  search; they are not comparable with any published FID.

The distance is the usual ``|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr sqrt(S_r S_f)``, computed
exactly from low-rank factors of the covariances: with ``S = A^T A``, ``tr sqrt(S_r S_f)`` is the
nuclear norm of ``A_r A_f^T``, a small matrix when a set has fewer images than feature dimensions.
That is exact and fast: for two sets of 16 random 2048-d features it gives scipy ``sqrtm``'s value
(pytorch-fid's formula) in a millisecond and 1e-12 for a set against itself, where torchmetrics'
``compute`` (``eigvals`` of the 2048x2048 product) takes ~8 s of CPU, is 0.25 % off and gives -3e-3.
With more images than dimensions the covariance's symmetric square root is the factor (one ``eigh``).

Small sets: FID estimated from N images is biased upward, the more the smaller N (with 8-16 images
and 2048-d features the covariances have rank 7-15), so a score is comparable only with scores of
sets of the same sizes; it stays finite and non-negative.
"""

from __future__ import annotations

import io
import logging
import math
import re
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medpeft_ray.errors import CheckpointError

log = logging.getLogger(__name__)

#: Inception-v3's pool features, the standard FID layer.
INCEPTION_DIM = 2048
#: torch-fidelity's name for its FID-compatible Inception-v3.
INCEPTION_NAME = "inception-v3-compat"
#: Side of the images the stand-in extractor sees (resized with antialiasing).
STAND_IN_SIZE = 64
STAND_IN_WARNING = (
    "FID: no search.fid_weights file; scores use a stand-in feature extractor (random conv features) "
    "and are not comparable with published FID"
)
_EXAMPLES = 3
_LAYOUTS = "FID images must be (N, H, W) grey, (N, 3, H, W) or (N, H, W, 3)"
_stand_in_warned = False


# ------------------------------------------------------------------------------------------------
# The weights file
# ------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    # torch's weights-only errors start with a paragraph of advice; the cause follows this marker
    marker = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = marker.group(1) if marker else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__


def _not_fid_weights(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"search.fid_weights: {path} is not an Inception-v3 FID weights file ({reason})")


def inception_skeleton(device: torch.device | str = "meta") -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (2048-d features) with its initial weights, no file read.

    On the meta device (the default) it only describes the architecture: the tensors a weights file
    must provide. On a real device its weights are PyTorch's random initialisation (tests).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # the constructor's load: keep the init
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device(device):
        # any weights argument keeps torch-fidelity from downloading; it torch.load()s this empty dict
        model = _Unloaded(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=empty)
    model.__class__ = FeatureExtractorInceptionV3  # from here on a plain torch-fidelity module
    return model


@lru_cache(maxsize=1)
def _inception_shapes() -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in inception_skeleton("meta").state_dict().items()}


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape) or "scalar"


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_EXAMPLES])
    return f"{shown}, ..." if len(names) > _EXAMPLES else shown


def _read_fid_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's state dict, read with ``weights_only=True`` (memory-mapped) and checked tensor by tensor."""
    if not path.exists():
        raise CheckpointError(f"search.fid_weights: {path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"search.fid_weights: {path}: not a file")
    if path.stat().st_size == 0:
        raise _not_fid_weights(path, "empty file")
    try:
        with warnings.catch_warnings():
            # bytes that are no pickle can look like an unusual pickle protocol; the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001  torch.load fails in many ways on foreign files
        unsafe = re.findall(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            reason = (f"refused: it pickles {', '.join(sorted(set(unsafe)))}, which only an unsafe load "
                      "(weights_only=False, arbitrary code) could read")
        else:
            reason = f"torch.load cannot read it: {_first_line(exc)}"
        raise _not_fid_weights(path, reason) from None

    if not isinstance(state, dict):
        raise _not_fid_weights(path, f"it holds a {type(state).__name__}, not a state dict")
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = [str(k) for k, v in state.items()
                  if isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())]
        if nested:
            raise _not_fid_weights(path, f"its tensors are under {nested[0]!r}; save that entry itself")
        raise _not_fid_weights(path, "no tensors at its top level")

    expected = _inception_shapes()
    # BatchNorm fills in a missing num_batches_tracked when loading, so a file may leave it out
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [str(k) for k in state if k not in expected]
    mismatched = [
        f"{k} is {_shape(state[k].shape)} in the file, {_shape(shape)} in the FID network"
        if isinstance(state[k], torch.Tensor) else f"{k} is a {type(state[k]).__name__}, not a tensor"
        for k, shape in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != shape)
    ]
    problems = []
    if missing:
        needed = sum(not k.endswith(".num_batches_tracked") for k in expected)
        problems.append(f"lacks {len(missing)} of its {needed} tensors, e.g. {_examples(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors it does not have, e.g. {_examples(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape, e.g. {_examples(mismatched)}")
    if problems:
        if any(k.startswith("AuxLogits.") for k in unexpected) or (
            isinstance(state.get("fc.weight"), torch.Tensor) and state["fc.weight"].shape[0] == 1000
        ):
            problems.append("torchvision's ImageNet Inception-v3 is not the FID network: use "
                            "pt_inception-2015-12-05-6726825d.pth")
        raise _not_fid_weights(path, "; ".join(problems))
    not_finite = [k for k in expected if k in state and state[k].is_floating_point()
                  and not bool(torch.isfinite(state[k]).all())]
    if not_finite:
        raise _not_fid_weights(path, f"NaN or infinite values in {_examples(not_finite)}")
    return state


def check_fid_weights(path: Path) -> None:
    """Refuse, with one line naming the file, FID weights that cannot be used: called before any training.

    The file must be readable by ``torch.load(weights_only=True)`` and be a state dict with exactly
    the tensors (names and shapes) of torch-fidelity's FID Inception-v3, all finite.

    Raises:
        CheckpointError: the file is missing, not a torch-loadable file, or not Inception-v3 FID weights.
    """
    _read_fid_state(Path(path))


# ------------------------------------------------------------------------------------------------
# Feature extractors
# ------------------------------------------------------------------------------------------------


class StandInFeatures(nn.Module):
    """Random conv features at 64 px: weights from a generator seeded 0, identical in every process.

    Not a perceptual network: it only tells image distributions apart (brightness, texture, noise).
    Input: uint8 ``(N, 3, H, W)``; output: ``(N, dim)`` float32.
    """

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"stand_in_dim must be at least 1, got {dim}")
        self.num_features = dim
        generator = torch.Generator().manual_seed(0)
        widths = [3, 32, 64, dim]
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, kernel_size=4, stride=2, padding=1) for i, o in zip(widths, widths[1:])
        )
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = F.interpolate(x.float(), size=(STAND_IN_SIZE, STAND_IN_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        x = (x - 128.0) / 128.0
        for index, conv in enumerate(self.convs):
            x = conv(x)
            if index < len(self.convs) - 1:
                x = F.relu(x)
        return x.mean(dim=(2, 3))


def _as_images(images: Any) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` from uint8 numpy/torch ``(N, H, W)`` grey, ``(N, 1|3, H, W)`` or ``(N, H, W, 1|3)``."""
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(np.asarray(im)) if not isinstance(im, torch.Tensor) else im
                              for im in images])
    elif isinstance(images, np.ndarray):
        images = torch.from_numpy(np.array(images))  # a copy: the array may be read-only or strided
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"FID images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"FID images must be uint8 (0-255), got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.dim() == 4:
        if images.shape[1] not in (1, 3):
            if images.shape[-1] not in (1, 3):
                raise ValueError(f"{_LAYOUTS}, got {tuple(images.shape)}")
            images = images.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"{_LAYOUTS}, got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


# ------------------------------------------------------------------------------------------------
# The distance
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Gaussian:
    """A feature set's mean and a factor of its covariance (``factor.T @ factor``), float64 on the CPU."""

    mean: torch.Tensor  # (d,)
    factor: torch.Tensor  # (k, d), k = min(n - 1, d) rows at most
    count: int

    @classmethod
    def of(cls, features: torch.Tensor) -> "_Gaussian":
        n, d = features.shape
        if n < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {n}")
        mean = features.mean(dim=0)
        centered = features - mean
        if n - 1 <= d:
            factor = centered / math.sqrt(n - 1)  # rank n - 1 at most: the centred features are the factor
        else:
            values, vectors = torch.linalg.eigh(centered.T @ centered / (n - 1))
            factor = (vectors * values.clamp(min=0).sqrt()).T
        return cls(mean, factor, n)


def _frechet(real: _Gaussian, fake: _Gaussian) -> float:
    cross = torch.linalg.svdvals(real.factor @ fake.factor.T).sum()  # tr sqrt(S_r S_f)
    value = (real.mean - fake.mean).square().sum() + real.factor.square().sum() + fake.factor.square().sum() - 2 * cross
    return max(float(value), 0.0)  # rounding can leave -1e-12 for identical sets


class FidScorer:
    """FID of generated image sets against one kept reference set.

    Args:
        weights: a local pt_inception-2015-12-05 FID weights file (``search.fid_weights``), or None for
            the stand-in extractor (a warning, once per process, says the scores are not comparable).
        device: where the extractor runs; the distance is computed in float64 on the CPU.
        stand_in_dim: the stand-in's feature dimension.
        batch_size: images per extractor call.

    Raises:
        CheckpointError: ``weights`` is not a usable FID weights file (:func:`check_fid_weights`).
    """

    def __init__(self, weights: Path | None, device: torch.device | str = "cpu", stand_in_dim: int = 64,
                 *, batch_size: int = 32) -> None:
        global _stand_in_warned
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.extractor: nn.Module
        if weights is not None:
            path = Path(weights)
            _read_fid_state(path)  # the one-line refusal, and safe: torch-fidelity loads with weights_only=False
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            self.extractor = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"],
                                                         feature_extractor_weights_path=str(path))
            self.dim = INCEPTION_DIM
            self.stand_in = False
            self.features = f"inception-v3 {INCEPTION_DIM} ({path.name})"
        else:
            if not _stand_in_warned:
                log.warning(STAND_IN_WARNING)
                _stand_in_warned = True
            self.extractor = StandInFeatures(stand_in_dim)
            self.dim = stand_in_dim
            self.stand_in = True
            self.features = f"stand-in random-conv {stand_in_dim} (not comparable with published FID)"
        self.extractor.to(self.device).requires_grad_(False).eval()
        self._real: _Gaussian | None = None

    def extract(self, images: Any) -> torch.Tensor:
        """The features of ``images`` (uint8, see :func:`_as_images`): ``(N, dim)`` float64 on the CPU."""
        batch = _as_images(images)
        parts = []
        with torch.inference_mode():
            for chunk in batch.split(self.batch_size):
                out = self.extractor(chunk.to(self.device))
                out = out[0] if isinstance(out, (tuple, list)) else out
                parts.append(out.reshape(len(chunk), -1).double().cpu())
        features = torch.cat(parts) if parts else torch.empty(0, self.dim, dtype=torch.float64)
        if not bool(torch.isfinite(features).all()):
            raise RuntimeError(f"FID: the {self.features} extractor gave NaN or infinite features")
        return features

    def set_real(self, images: Any) -> None:
        """Extract and keep the reference images' statistics (replacing any earlier reference set)."""
        self._real = _Gaussian.of(self.extract(images))

    @property
    def real_count(self) -> int:
        """Images in the kept reference set (0 before :meth:`set_real`)."""
        return self._real.count if self._real is not None else 0

    def score(self, fake_images: Any) -> float:
        """FID of ``fake_images`` against the kept reference set; each call stands alone."""
        if self._real is None:
            raise RuntimeError("FidScorer.score called before set_real")
        return _frechet(self._real, _Gaussian.of(self.extract(fake_images)))

"""The per-channel mean and std a backbone's inputs are normalised with.

The model should see what its pre-training saw: ``model.mean``/``model.std`` when the config
gives them (a scalar for all three channels, or one value per channel; the radiograph MAE and
MRM encoders' grey-level statistics are set this way in the studies' presets), else the
statistics of the named weights' pre-trained configuration in timm (ImageNet's, CLIP's, 0.5/0.5
for the ImageNet-21k ViTs) when a checkpoint is loaded, else 0.5/0.25 (random weights: nothing
was seen). A grey image enters as the same picture in all three channels, each normalised with
its channel's statistics, as an RGB pipeline would feed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class ModelSection(Protocol):
    """What the statistics are chosen from: a config's ``model`` section (``ModelConfig``, which
    sits on a floor above the models and so is not imported here)."""

    backbone: str
    checkpoint: Path | None
    mean: float | list[float] | None
    std: float | list[float] | None

#: the statistics of a backbone with random weights (no checkpoint)
RANDOM_WEIGHTS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@dataclass(frozen=True)
class InputStatistics:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where they come from, for the search's opening lines

    def describe(self) -> str:
        same = len(set(self.mean)) == 1 and len(set(self.std)) == 1
        values = (f"mean {self.mean[0]:g}, std {self.std[0]:g}" if same else
                  f"mean ({', '.join(f'{v:g}' for v in self.mean)}), std ({', '.join(f'{v:g}' for v in self.std)})")
        return f"{values} ({self.source})"


def _three(value: float | list[float]) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    return (values * 3)[:3] if len(values) == 1 else (values[0], values[1], values[2])


def input_statistics(model: ModelSection) -> InputStatistics:
    """The mean and std (three channels each) for ``model``'s inputs, and where they come from."""
    if model.mean is not None and model.std is not None:
        return InputStatistics(_three(model.mean), _three(model.std), "model.mean/std")
    if model.checkpoint is not None:
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(model.backbone)
        except (RuntimeError, ValueError):  # not a timm model (a diffusion U-Net)
            cfg = None
        if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
            mean, std = _three(list(cfg.mean)), _three(list(cfg.std))
            return InputStatistics(
                _three(model.mean) if model.mean is not None else mean,
                _three(model.std) if model.std is not None else std,
                f"timm's pre-trained configuration of {model.backbone}",
            )
    mean, std = RANDOM_WEIGHTS
    return InputStatistics(_three(model.mean) if model.mean is not None else mean,
                           _three(model.std) if model.std is not None else std,
                           "the default for a backbone without pre-trained weights")

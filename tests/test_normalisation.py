"""Input statistics come from the config, else from the loaded weights' pre-training, else a default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_search
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN

from medpeft_ray.config import validate_search_dict
from medpeft_ray.config.sections import ModelConfig
from medpeft_ray.errors import ConfigError
from medpeft_ray.models.normalisation import RANDOM_WEIGHTS, input_statistics
from medpeft_ray.train.engine import Batches


def test_statistics_come_from_the_config_then_the_weights_then_the_default(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")  # only its presence matters here
    mrm = input_statistics(ModelConfig(backbone="vit_base_patch16_224", checkpoint=weights, mean=0.4978, std=0.2449))
    assert mrm.mean == (0.4978,) * 3 and mrm.std == (0.2449,) * 3 and mrm.source == "model.mean/std"
    per_channel = input_statistics(ModelConfig(backbone="resnet50", mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1]))
    assert per_channel.mean == (0.1, 0.2, 0.3) and "(0.1, 0.2, 0.3)" in per_channel.describe()
    imagenet = input_statistics(ModelConfig(backbone="resnet50", checkpoint=weights))
    assert imagenet.mean == pytest.approx(IMAGENET_DEFAULT_MEAN) and imagenet.std == pytest.approx(IMAGENET_DEFAULT_STD)
    assert "timm's pre-trained configuration of resnet50" in imagenet.describe()
    clip = input_statistics(ModelConfig(backbone="vit_base_patch16_clip_224", checkpoint=weights))
    assert clip.mean == pytest.approx(OPENAI_CLIP_MEAN)
    random_weights = input_statistics(ModelConfig(backbone="resnet50"))
    assert (random_weights.mean, random_weights.std) == RANDOM_WEIGHTS
    # a U-Net has no timm configuration: the default
    assert input_statistics(ModelConfig(backbone="unet_tiny", checkpoint=weights)).mean == RANDOM_WEIGHTS[0]


def test_statistics_are_one_value_or_three_in_range() -> None:
    with pytest.raises(ConfigError, match=r"t.yaml: model.mean: .*give one value or three \(R, G, B\), not 2"):
        validate_search_dict(tiny_search(model={"mean": [0.5, 0.5]}), "t.yaml")
    with pytest.raises(ConfigError, match=r"model.std: .*values must be in \(0, 1\]"):
        validate_search_dict(tiny_search(model={"std": [0.2, 0.0, 0.2]}), "t.yaml")


def test_grey_enters_as_the_same_picture_in_three_channels_each_with_its_channel_statistics() -> None:
    grey = torch.full((2, 4, 4), 128, dtype=torch.uint8).numpy()
    rgb = torch.zeros((2, 4, 4, 3), dtype=torch.uint8)
    rgb[..., 0] = 255
    labels = torch.zeros((2, 1)).numpy()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)
    x, _ = Batches(grey, labels, torch.device("cpu"), mean, std).get(torch.arange(2), torch.float32, None)
    expected = [(128 / 255 - m) / s for m, s in zip(mean, std)]
    assert x.shape == (2, 3, 4, 4) and x[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)
    x, _ = Batches(rgb.numpy(), labels, torch.device("cpu"), mean, std).get(torch.arange(2), torch.float32, None)
    assert x[0, :, 0, 0].tolist() == pytest.approx([(1 - 0.4) / 0.2, -0.5 / 0.25, -0.6 / 0.5], abs=1e-5)

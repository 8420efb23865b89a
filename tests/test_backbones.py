"""Pre-trained checkpoint loading: MAE/MRM ``.pth`` layout, head replacement, pos_embed resize."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medpeft_ray.errors import MedpeftError
from medpeft_ray.models import backbone_family, build_backbone, load_checkpoint
from medpeft_ray.models.checkpoints import read_checkpoint


def test_family_from_name() -> None:
    assert backbone_family("vit_base_patch16_224") == "vit"
    assert backbone_family("resnet50") == "resnet"
    assert backbone_family("efficientnet_b0") is None


@pytest.mark.slow
def test_mae_style_checkpoint_loads_with_new_head_and_resized_pos_embed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # "pre-trained" at 64 px (4x4 grid) with a 1000-class head, saved the MAE way: {"model": ..., "args": ...}
    source = build_backbone("vit_tiny_patch16_224", num_classes=1000, image_size=64)
    path = tmp_path / "CXR_MAE.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 799}, path)

    target = build_backbone("vit_tiny_patch16_224", num_classes=14, image_size=32, checkpoint=path)
    torch.testing.assert_close(target.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    assert target.pos_embed.shape == (1, 1 + 4, 192)  # 2x2 grid + class token
    assert target.head.weight.shape == (14, 192)
    assert target.head.weight.abs().max() < 1e-3  # re-initialised with std 2e-5
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])  # class token kept


def test_safetensors_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = build_backbone("vit_tiny_patch16_224", num_classes=3, image_size=32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = build_backbone("vit_tiny_patch16_224", num_classes=3, image_size=32)
    missing, unexpected = load_checkpoint(target, path)
    assert not missing and not unexpected
    torch.testing.assert_close(target.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)


def test_corrupt_and_missing_checkpoint_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(MedpeftError, match="broken.pth"):
        read_checkpoint(bad)
    with pytest.raises(MedpeftError, match="not found"):
        read_checkpoint(tmp_path / "absent.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(5, 5)}}, wrong)
    with pytest.raises(MedpeftError, match="wrong.pth: only 0 of 148 backbone tensors .*shape differs e.g. "
                                           "blocks.0.attn.qkv.weight \\(file 5x5, model 576x192\\)"):
        build_backbone("vit_tiny_patch16_224", num_classes=3, image_size=32, checkpoint=wrong)

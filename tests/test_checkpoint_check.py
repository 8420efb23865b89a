"""Pre-trained checkpoints are checked before Ray: safe reading, the usual layouts, keys and shapes
against the backbone, one-line refusals, and the file's identity (path and SHA-256)."""

from __future__ import annotations

import argparse
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_search

from medpeft_ray.errors import CheckpointError
from medpeft_ray.models import build_backbone, load_checkpoint
from medpeft_ray.models.checkpoints import checkpoint_identity, file_sha256, match_checkpoint

VIT = "vit_tiny_patch16_224"
VIT_BACKBONE_TENSORS = 148  # 152 tensors less head.weight/bias and fc_norm.weight/bias


@pytest.fixture(scope="module")
def vit_state() -> dict[str, torch.Tensor]:
    """A "pre-trained" vit_tiny at 64 px (4x4 grid) with a 1000-class head, as MAE/timm would save it."""
    torch.manual_seed(0)
    return build_backbone(VIT, num_classes=1000, image_size=64).state_dict()


@pytest.fixture(scope="module")
def meta_vit() -> torch.nn.Module:
    with torch.device("meta"):
        return build_backbone(VIT, num_classes=3, image_size=32)


def loads(path: Path, source: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The backbone the worker builds from ``path``; its weights are those of ``source``."""
    model = build_backbone(VIT, num_classes=3, image_size=32, checkpoint=path)
    torch.testing.assert_close(model.blocks[5].attn.qkv.weight, source["blocks.5.attn.qkv.weight"])
    torch.testing.assert_close(model.patch_embed.proj.weight, source["patch_embed.proj.weight"])
    torch.testing.assert_close(model.cls_token, source["cls_token"])
    assert model.pos_embed.shape == (1, 1 + 4, 192)  # resized from the 4x4 grid to 2x2
    assert model.head.weight.shape == (3, 192) and model.head.weight.abs().max() < 1e-3  # a fresh head
    return model


def refused(model: torch.nn.Module, path: Path) -> str:
    """The one-line message a file gets, the same from the pre-flight check and from the worker's load."""
    with pytest.raises(CheckpointError) as preflight:
        match_checkpoint(model, path)
    with pytest.raises(CheckpointError) as worker:
        build_backbone(VIT, num_classes=3, image_size=32, checkpoint=path)
    message = str(preflight.value)
    assert message == str(worker.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert preflight.value.exit_code == 2
    return message


# ----------------------------------------------------------------------------------------------
# Layouts that load
# ----------------------------------------------------------------------------------------------


def test_mae_checkpoint_with_argparse_namespace(tmp_path: Path, vit_state: dict, meta_vit: torch.nn.Module) -> None:
    path = tmp_path / "CXR_MAE.pth"
    args = argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75, lr=None, input_size=64, output_dir="./out")
    torch.save({"model": vit_state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
                "epoch": 799, "scaler": {"scale": 65536.0}, "args": args}, path)
    loads(path, vit_state)
    match = match_checkpoint(meta_vit, path)
    assert (match.loaded, match.backbone_tensors) == (VIT_BACKBONE_TENSORS, VIT_BACKBONE_TENSORS)
    assert match.layout == "entry 'model'" and not match.unexpected


def test_mae_checkpoint_with_its_decoder_and_without_fc_norm(tmp_path: Path, vit_state: dict) -> None:
    """A full MAE pre-training checkpoint: encoder, norm, mask token and decoder, no fc_norm, no head."""
    encoder = {k: v for k, v in vit_state.items() if not k.startswith(("head.", "fc_norm."))}
    decoder = {"mask_token": torch.zeros(1, 1, 128), "decoder_embed.weight": torch.zeros(128, 192),
               "decoder_blocks.0.norm1.weight": torch.ones(128), "norm.weight": torch.ones(192)}
    path = tmp_path / "mae_full.pth"
    torch.save({"model": {**encoder, **decoder}, "args": argparse.Namespace(norm_pix_loss=True)}, path)
    model = loads(path, vit_state)
    _, unexpected = load_checkpoint(model, path)
    assert {"decoder_embed.weight", "decoder_blocks.0.norm1.weight", "norm.weight"} <= set(unexpected)


def test_state_dict_entry(tmp_path: Path, vit_state: dict) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": vit_state, "epoch": 3}, path)
    loads(path, vit_state)


@pytest.mark.parametrize("prefix", ["module.", "encoder.", "backbone.", "module.encoder.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, vit_state: dict, meta_vit: torch.nn.Module, prefix: str) -> None:
    path = tmp_path / "prefixed.pth"
    torch.save({"model": {prefix + k: v for k, v in vit_state.items()}}, path)
    loads(path, vit_state)
    assert match_checkpoint(meta_vit, path).layout == f"entry 'model', prefix {prefix!r} stripped"


def test_a_prefix_is_stripped_only_when_that_makes_keys_match(
    tmp_path: Path, vit_state: dict, meta_vit: torch.nn.Module
) -> None:
    # the backbone's own keys beside a second network under `encoder.` (a text tower, a teacher)
    other = {"encoder.blocks.0.attn.qkv.weight": torch.zeros(7, 7), "encoder.cls_token": torch.zeros(1, 1, 7)}
    path = tmp_path / "two_nets.pth"
    torch.save({**vit_state, **other}, path)
    match = match_checkpoint(meta_vit, path)
    assert match.layout == "as saved" and match.loaded == VIT_BACKBONE_TENSORS
    assert set(match.unexpected) == set(other)
    loads(path, vit_state)


def test_safetensors_files_even_without_the_suffix(tmp_path: Path, vit_state: dict) -> None:
    from safetensors.torch import save_file

    for name in ("model.safetensors", "pytorch_model.bin"):
        path = tmp_path / name
        save_file({f"module.{k}": v.contiguous() for k, v in vit_state.items()}, str(path))
        loads(path, vit_state)


def test_timm_training_checkpoint(tmp_path: Path, vit_state: dict, meta_vit: torch.nn.Module) -> None:
    """What timm's train.py saves: weights, EMA weights, optimizer state and its argparse Namespace."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    param.sum().backward()
    optimizer.step()
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 299, "arch": VIT, "state_dict": vit_state, "state_dict_ema": vit_state,
                "optimizer": optimizer.state_dict(), "version": 2, "metric": 0.81,
                "args": argparse.Namespace(model=VIT, lr=5e-4, sched="cosine", epochs=300)}, path)
    loads(path, vit_state)
    assert match_checkpoint(meta_vit, path).layout == "entry 'state_dict'"


def _openai_clip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT's weights the way OpenAI CLIP / OpenCLIP name a visual tower, with a text tower beside it."""
    renames = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
               ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
               ("mlp.fc2", "mlp.c_proj"), ("norm1", "ln_1"), ("norm2", "ln_2")]
    dim = state["cls_token"].shape[-1]
    out = {"visual.class_embedding": state["cls_token"][0, 0], "visual.positional_embedding": state["pos_embed"][0],
           "visual.proj": torch.randn(dim, 32), "visual.ln_post.weight": torch.ones(dim),
           "visual.ln_post.bias": torch.zeros(dim), "token_embedding.weight": torch.randn(100, 32),
           "logit_scale": torch.tensor(4.6)}
    for key, value in state.items():
        if key in ("cls_token", "pos_embed") or key.startswith(("head.", "fc_norm.")):
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out[f"visual.{key}"] = value
    return out


def test_openai_clip_visual_tower_through_timms_filter(tmp_path: Path) -> None:
    """OpenCLIP/OpenAI CLIP key names on timm's CLIP ViT architecture (vit_base_patch16_clip_224,
    shrunk to 2 blocks of width 64 to stay fast): timm's checkpoint_filter_fn maps every tensor."""
    import timm

    shape = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, global_pool="avg")
    source = timm.create_model("vit_base_patch16_clip_224", num_classes=1000, **shape).state_dict()
    path = tmp_path / "open_clip_model.bin"
    torch.save(_openai_clip_layout(source), path)
    with torch.device("meta"):
        meta = timm.create_model("vit_base_patch16_clip_224", num_classes=3, **shape)
    match = match_checkpoint(meta, path)
    assert match.loaded == match.backbone_tensors == len(source) - 4  # less head and fc_norm
    assert match.layout == "timm.models.vision_transformer.checkpoint_filter_fn"
    model = timm.create_model("vit_base_patch16_clip_224", num_classes=3, **shape)
    load_checkpoint(model, path)
    for key in ("blocks.1.attn.qkv.weight", "norm_pre.weight", "cls_token", "pos_embed", "patch_embed.proj.weight"):
        torch.testing.assert_close(model.state_dict()[key], source[key])


def test_openclip_timm_trunk(tmp_path: Path, vit_state: dict) -> None:
    """OpenCLIP models whose visual tower is a timm model keep it under `visual.trunk.`."""
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({**{f"visual.trunk.{k}": v for k, v in vit_state.items()},
                "visual.head.proj.weight": torch.randn(32, 192), "text.token_embedding.weight": torch.randn(10, 32)},
               path)
    loads(path, vit_state)


def test_checkpoint_without_head_and_nearly_complete(
    tmp_path: Path, vit_state: dict, meta_vit: torch.nn.Module
) -> None:
    # the head and fc_norm may be absent; one backbone tensor of 148 too (>= 99% load), two not
    body = {k: v for k, v in vit_state.items() if not k.startswith(("head.", "fc_norm."))}
    path = tmp_path / "one_short.pth"
    torch.save({k: v for k, v in body.items() if k != "patch_embed.proj.bias"}, path)
    assert match_checkpoint(meta_vit, path).loaded == VIT_BACKBONE_TENSORS - 1
    two_short = tmp_path / "two_short.pth"
    torch.save({k: v for k, v in body.items() if k not in ("patch_embed.proj.bias", "blocks.0.norm1.bias")}, two_short)
    assert refused(meta_vit, two_short) == (
        f"{two_short}: only 146 of 148 backbone tensors of {VIT} match "
        "(missing e.g. patch_embed.proj.bias, blocks.0.norm1.bias)"
    )


# ----------------------------------------------------------------------------------------------
# Files that do not fit or are no checkpoint: one line each
# ----------------------------------------------------------------------------------------------


def test_a_resnet_state_dict_on_a_vit(tmp_path: Path, meta_vit: torch.nn.Module) -> None:
    import timm

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    assert refused(meta_vit, path) == (
        f"{path}: only 0 of 148 backbone tensors of {VIT} match (missing e.g. cls_token, pos_embed, "
        "patch_embed.proj.weight, ...; unexpected e.g. conv1.weight, bn1.weight, bn1.bias, ...)"
    )


def test_a_vit_on_a_resnet(tmp_path: Path, vit_state: dict) -> None:
    path = tmp_path / "vit.pth"
    torch.save({"model": vit_state}, path)
    with torch.device("meta"):
        resnet = build_backbone("resnet18", num_classes=3, image_size=32)
    with pytest.raises(CheckpointError) as info:
        match_checkpoint(resnet, path)
    assert str(info.value).startswith(f"{path}: only 0 of 100 backbone tensors of resnet18 match (missing e.g. "
                                      "conv1.weight, bn1.weight, bn1.bias, ...; unexpected e.g. cls_token,")


def test_a_wider_vit_on_a_smaller_one(tmp_path: Path, meta_vit: torch.nn.Module) -> None:
    path = tmp_path / "vit_small.pth"
    torch.save(build_backbone("vit_small_patch16_224", num_classes=3, image_size=32).state_dict(), path)
    assert refused(meta_vit, path) == (
        f"{path}: only 0 of 148 backbone tensors of {VIT} match (shape differs e.g. cls_token (file 1x1x384, "
        "model 1x1x192), pos_embed (file 1x5x384, model 1x5x192), patch_embed.proj.weight (file 384x3x16x16, "
        "model 192x3x16x16), ...)"
    )


def test_a_partly_matching_file(tmp_path: Path, vit_state: dict, meta_vit: torch.nn.Module) -> None:
    """Six of twelve blocks (a checkpoint of a shallower model, or a truncated save)."""
    path = tmp_path / "half.pth"
    torch.save({k: v for k, v in vit_state.items() if not k.startswith(tuple(f"blocks.{i}." for i in range(6, 12)))},
               path)
    assert refused(meta_vit, path) == (
        f"{path}: only 76 of 148 backbone tensors of {VIT} match "
        "(missing e.g. blocks.6.norm1.weight, blocks.6.norm1.bias, blocks.6.attn.qkv.weight, ...)"
    )


def _zip_of_text(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a tensor")


class Opaque:  # pickled by reference: unpickling it would run this module's code
    pass


NOT_CHECKPOINTS: list[tuple[str, Any, str]] = [
    # random bytes fail inside the unpickler in several ways (UnpicklingError, IndexError, KeyError, ...)
    ("random.pth", lambda p: p.write_bytes(os.urandom(4096)), "not a PyTorch or safetensors checkpoint ("),
    ("random.safetensors", lambda p: p.write_bytes(os.urandom(4096)), "not a readable safetensors file ("),
    ("notes.pth", lambda p: p.write_text("model: vit_base\nepochs: 800\n"), "a text file, not a checkpoint"),
    ("empty.pth", lambda p: p.write_bytes(b""), "empty file (0 bytes), not a checkpoint"),
    ("archive.pth", _zip_of_text, "not a PyTorch or safetensors checkpoint (RuntimeError: "),
    ("no_tensors.pth", lambda p: torch.save({"model": {}, "epoch": 3}, p),
     "no tensors in the file, not a checkpoint of model weights"),
    ("pickled_object.pth", lambda p: torch.save({"model": {"cls_token": torch.zeros(1)}, "extra": Opaque()}, p),
     (f"refused: it pickles {Opaque.__module__}.Opaque, which only an unsafe load (weights_only=False, arbitrary "
      "code) could read; re-save just its state dict where you trust the file")),
]


@pytest.mark.parametrize(("name", "write", "expected"), NOT_CHECKPOINTS, ids=[c[0] for c in NOT_CHECKPOINTS])
def test_files_that_are_no_checkpoint(tmp_path: Path, meta_vit: torch.nn.Module, name: str, write: Any,
                                      expected: str) -> None:
    path = tmp_path / name
    write(path)
    message = refused(meta_vit, path)
    assert message.startswith(f"{path}: {expected}"), message


def test_missing_file(tmp_path: Path, meta_vit: torch.nn.Module) -> None:
    assert refused(meta_vit, tmp_path / "absent.pth") == f"{tmp_path / 'absent.pth'}: checkpoint file not found"


# ----------------------------------------------------------------------------------------------
# Pre-flight: the check runs before any data or Ray work; the file's identity is recorded
# ----------------------------------------------------------------------------------------------


def _config(checkpoint: Path) -> Any:
    from medpeft_ray.config import validate_search_dict

    return validate_search_dict(tiny_search(model={"backbone": VIT, "checkpoint": str(checkpoint)}), "tiny.yaml")


def test_preflight_refuses_a_wrong_checkpoint_before_reading_the_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import timm

    import medpeft_ray.data as data
    from medpeft_ray.search.preflight import preflight

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the dataset was read before the checkpoint was checked")

    monkeypatch.setattr(data, "load_splits", no_data)
    with pytest.raises(CheckpointError, match=r"resnet.pth: only 0 of 148 backbone tensors"):
        preflight(_config(path))


def test_preflight_records_the_checkpoint_identity(tmp_path: Path, vit_state: dict) -> None:
    from medpeft_ray.search.preflight import preflight

    path = tmp_path / "mae.pth"
    torch.save({"model": vit_state, "args": argparse.Namespace(epochs=800)}, path)
    facts = preflight(_config(path))
    assert facts["checkpoint"] == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert preflight(_config(path).model_copy(update={"model": _config(path).model.model_copy(
        update={"checkpoint": None})}))["checkpoint"] is None


def test_search_cli_stops_with_exit_2_before_ray(tmp_path: Path, ray_starts: list[str | None]) -> None:
    import yaml
    from typer.testing import CliRunner

    import medpeft_ray.cli as cli

    path = tmp_path / "random.pth"
    path.write_bytes(os.urandom(2048))
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_search(model={"backbone": VIT, "checkpoint": str(path)})))
    result = CliRunner().invoke(cli.app, ["search", "--space", str(space), "--results", str(tmp_path / "results")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: not a PyTorch or safetensors checkpoint (")
    assert not ray_starts


def test_file_hash_is_computed_once_per_version_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medpeft_ray.models.checkpoints as checkpoints

    calls = []
    real = hashlib.sha256

    def counting() -> Any:
        calls.append(1)
        return real()

    monkeypatch.setattr(checkpoints.hashlib, "sha256", counting)
    monkeypatch.setattr(checkpoints, "_HASHES", {})
    path = tmp_path / "w.pth"
    path.write_bytes(b"first version")
    first = file_sha256(path)
    assert file_sha256(path) == first and len(calls) == 1
    assert checkpoint_identity(path) == {"path": str(path), "sha256": first} and len(calls) == 1
    path.write_bytes(b"second version, longer")
    assert file_sha256(path) == real(b"second version, longer").hexdigest() and len(calls) == 2
    assert checkpoint_identity(None) is None

"""The benchmark study's backbones (Dutt et al.: ViT-B/L/H, MAE and CLIP ViT-B): their timm names
build with the right shapes, and their released checkpoint layouts load from local files.

Nothing is downloaded: each layout is written here from a small model with the released key names
(timm hub repos, OpenCLIP, OpenAI CLIP's TorchScript archive, MAE's ``main_pretrain.py``).
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from medpeft_ray.errors import CheckpointError, ConfigError
from medpeft_ray.models import backbone_family, build_backbone, load_checkpoint
from medpeft_ray.models.backbones import check_backbone_name
from medpeft_ray.models.checkpoints import match_checkpoint, read_checkpoint
from medpeft_ray.models.vit import create_options

#: CLIP towers shrunk to stay fast: same architecture (pre-norm, no patch bias), 2 blocks of width 64
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
IMAGE = 32


def tiny(name: str, num_classes: int = 3, **options: object) -> nn.Module:
    """``name`` as build_backbone builds it (global average pooling, fc_norm, head), only smaller."""
    return timm.create_model(name, pretrained=False, num_classes=num_classes,
                             **{**create_options(IMAGE), **TINY, **options})


def images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def trunk_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tokens after the last block, before any final norm: what global pooling and fc_norm read."""
    return model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x))))


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224",
                                  "vit_huge_patch14_224.orig_in21k", "vit_huge_patch14_224.mae",
                                  "vit_base_patch16_224.mae", "vit_base_patch16_clip_224",
                                  "vit_base_patch16_clip_224.openai", "vit_base_patch16_clip_quickgelu_224",
                                  "vit_base_patch16_clip_quickgelu_224.openai"])
def test_the_study_backbones_are_vit_names(name: str) -> None:
    check_backbone_name(name)
    assert backbone_family(name) == "vit"


def test_vit_huge_builds_as_vit_h14(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = build_backbone("vit_huge_patch14_224.orig_in21k", num_classes=1000, image_size=224)
    assert model.pretrained_cfg["architecture"] == "vit_huge_patch14_224"
    assert (model.embed_dim, len(model.blocks), model.patch_embed.patch_size) == (1280, 32, (14, 14))
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 1280)
    assert isinstance(model.fc_norm, nn.LayerNorm) and isinstance(model.norm, nn.Identity)  # global pooling
    # ViT-H/14: 632M parameters with a 1000-class head (timm's and the ViT paper's figure)
    assert sum(p.numel() for p in model.parameters()) == 632_045_800


def test_clip_vit_b16_builds_as_clips_image_tower() -> None:
    with torch.device("meta"):
        clip = build_backbone("vit_base_patch16_clip_224", num_classes=1000, image_size=224)
        openai = build_backbone("vit_base_patch16_clip_quickgelu_224.openai", num_classes=1000, image_size=224)
    for model in (clip, openai):
        assert isinstance(model.norm_pre, nn.LayerNorm)  # ln_pre
        assert model.patch_embed.proj.bias is None  # conv1 has no bias
        assert model.blocks[0].norm1.eps == 1e-5  # CLIP's LayerNorm, not timm's ViT default 1e-6
        assert sum(p.numel() for p in model.parameters()) == 86_568_424
    assert isinstance(clip.blocks[0].mlp.act, nn.GELU)
    assert type(openai.blocks[0].mlp.act).__name__ == "QuickGELU"


def test_unknown_pretrained_tag_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"no weights tagged 'in22k' for vit_huge_patch14_224 \(known tags: "
                                          r"mae, orig_in21k\)"):
        check_backbone_name("vit_huge_patch14_224.in22k")


# ----------------------------------------------------------------------------------------------
# CLIP ViT-B/16: timm hub files, OpenCLIP checkpoints, OpenAI's TorchScript archive
# ----------------------------------------------------------------------------------------------

#: timm key -> OpenCLIP / OpenAI CLIP key of the visual tower (open_clip/transformer.py's
#: VisionTransformer and ResidualAttentionBlock: conv1, ln_pre, transformer.resblocks.N.{ln_1,
#: attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post; class_embedding,
#: positional_embedding and proj are handled apart)
_TO_OPENCLIP = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
                ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"), ("norm1", "ln_1"), ("norm2", "ln_2")]


def openclip_state(timm_state: dict[str, torch.Tensor], embed_dim: int = 32) -> dict[str, torch.Tensor]:
    """A whole CLIP model's state dict (visual and text towers) whose visual tower is ``timm_state``
    (of a token-pooled timm CLIP ViT, so with its final ``norm``), named the OpenCLIP way."""
    width = timm_state["cls_token"].shape[-1]
    visual = {"class_embedding": timm_state["cls_token"][0, 0], "positional_embedding": timm_state["pos_embed"][0],
              "ln_post.weight": timm_state["norm.weight"], "ln_post.bias": timm_state["norm.bias"],
              "proj": torch.randn(width, embed_dim)}
    for key, value in timm_state.items():
        if key in ("cls_token", "pos_embed") or key.startswith(("norm.", "head.", "fc_norm.")):
            continue
        for old, new in _TO_OPENCLIP:
            key = key.replace(old, new)
        visual[key] = value
    text = {"positional_embedding": torch.randn(77, 32), "token_embedding.weight": torch.randn(100, 32),
            "transformer.resblocks.0.ln_1.weight": torch.ones(32), "transformer.resblocks.0.attn.in_proj_weight":
            torch.randn(96, 32), "ln_final.weight": torch.ones(32), "text_projection": torch.randn(32, embed_dim),
            "logit_scale": torch.tensor(4.6052)}
    return {**{f"visual.{k}": v for k, v in visual.items()}, **text}


@pytest.fixture(scope="module", params=["vit_base_patch16_clip_224", "vit_base_patch16_clip_quickgelu_224"])
def clip_source(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """A "pre-trained" CLIP image tower as timm keeps it: token pooling, final norm, a 512-wide head."""
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False, num_classes=512, img_size=IMAGE, **TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # not their init values, so a copy shows
                p.add_(torch.randn_like(p) * 0.1)
    return request.param, model


def loads_the_tower(name: str, source: nn.Module, path: Path) -> nn.Module:
    """The backbone built from ``path`` computes the source's tokens exactly, with a fresh head."""
    with torch.device("meta"):
        meta = tiny(name)
    match = match_checkpoint(meta, path)
    assert match.loaded == match.backbone_tensors  # every tensor outside head and fc_norm
    model = tiny(name).eval()
    missing, _ = load_checkpoint(model, path)
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(trunk_tokens(model, x), trunk_tokens(source, x), rtol=0, atol=0)
    assert model.head.weight.shape == (3, 64) and model.head.weight.abs().max() < 1e-3
    return model


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_clip_timm_hub_files(tmp_path: Path, clip_source: tuple[str, nn.Module], filename: str) -> None:
    """A timm hub repo saved locally (``vit_base_patch16_clip_224.openai``: model.safetensors or
    pytorch_model.bin, a flat timm state dict with a 512-wide projection head)."""
    from safetensors.torch import save_file

    name, source = clip_source
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    loads_the_tower(name, source, path)


def test_clip_openclip_checkpoint_drops_the_text_tower(tmp_path: Path, clip_source: tuple[str, nn.Module]) -> None:
    """OpenCLIP's ``open_clip_pytorch_model.bin``: the whole CLIP model, visual tower under ``visual.``."""
    name, source = clip_source
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(openclip_state(source.state_dict()), path)
    with torch.device("meta"):
        match = match_checkpoint(tiny(name), path)
    assert match.layout == "timm.models.vision_transformer.checkpoint_filter_fn"
    assert not any(k.startswith(("token_embedding", "text_projection", "ln_final", "logit_scale"))
                   for k in match.state)
    loads_the_tower(name, source, path)


def test_clip_openclip_recovers_every_tensor_of_a_token_pooled_tower(
    tmp_path: Path, clip_source: tuple[str, nn.Module]
) -> None:
    """The conversion is exact: into timm's own (token-pooled) CLIP tower every visual tensor
    comes back, ln_post as the final norm and proj as the projection head."""
    name, source = clip_source
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(openclip_state(source.state_dict(), embed_dim=512), path)
    target = timm.create_model(name, pretrained=False, num_classes=512, img_size=IMAGE, **TINY)
    match = match_checkpoint(target, path)
    assert match.loaded == match.backbone_tensors
    target.load_state_dict(match.state, strict=False)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert "norm.weight" in match.state


def test_clip_openclip_training_checkpoint(tmp_path: Path, clip_source: tuple[str, nn.Module]) -> None:
    """What OpenCLIP's training saves (``epoch_32.pt``): ``{"epoch", "name", "state_dict": {module.visual...}}``."""
    name, source = clip_source
    path = tmp_path / "epoch_32.pt"
    state = {f"module.{k}": v for k, v in openclip_state(source.state_dict()).items()}
    torch.save({"epoch": 32, "name": "ViT-B-16", "state_dict": state, "optimizer": {"state": {}}}, path)
    loads_the_tower(name, source, path)


class _OpenAIResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)


class _OpenAITransformer(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[_OpenAIResBlock(width) for _ in range(layers)])


class _OpenAIVisual(nn.Module):
    """OpenAI CLIP's ``VisionTransformer`` (clip/model.py): its module and parameter names."""

    def __init__(self, width: int, layers: int, grid: int, patch: int, output_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _OpenAITransformer(width, layers)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)


class _OpenAICLIP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = _OpenAIVisual(64, 2, IMAGE // 16, 16, 32)
        self.token_embedding = nn.Embedding(100, 32)
        self.ln_final = nn.LayerNorm(32)
        self.text_projection = nn.Parameter(torch.randn(32, 32))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def test_openai_clip_torchscript_archive(tmp_path: Path) -> None:
    """OpenAI's ``ViT-B-16.pt`` is a TorchScript archive (fp16 tensors); its tensors are read
    without loading the program and converted like OpenCLIP's."""
    torch.manual_seed(0)
    clip = _OpenAICLIP().half().eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "ViT-B-16.pt"
    try:
        torch.jit.trace(clip, torch.randn(1, 3, IMAGE, IMAGE).half()).save(str(path))
    except (AttributeError, RuntimeError) as exc:  # a torch without TorchScript cannot write one
        pytest.skip(f"cannot write a TorchScript archive here: {exc}")
    read = read_checkpoint(path)
    assert read.keys() == clip.state_dict().keys()
    assert all(torch.equal(read[k], v) for k, v in clip.state_dict().items())

    name = "vit_base_patch16_clip_quickgelu_224"
    with torch.device("meta"):
        match = match_checkpoint(tiny(name), path)
    assert match.loaded == match.backbone_tensors
    model = tiny(name)
    load_checkpoint(model, path)
    visual = clip.visual
    torch.testing.assert_close(model.patch_embed.proj.weight, visual.conv1.weight.float())
    torch.testing.assert_close(model.cls_token[0, 0], visual.class_embedding.float())
    torch.testing.assert_close(model.pos_embed[0], visual.positional_embedding.float())
    torch.testing.assert_close(model.norm_pre.weight, visual.ln_pre.weight.float())
    block = visual.transformer.resblocks[1]
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, block.attn.in_proj_weight.float())
    torch.testing.assert_close(model.blocks[1].attn.proj.weight, block.attn.out_proj.weight.float())
    torch.testing.assert_close(model.blocks[1].mlp.fc2.bias, block.mlp.c_proj.bias.float())
    torch.testing.assert_close(model.blocks[1].norm2.weight, block.ln_2.weight.float())


def test_a_torchscript_archive_that_pickles_code_is_refused(tmp_path: Path) -> None:
    """Nothing but tensors, containers and module attributes is unpickled from an archive."""
    path = tmp_path / "ViT-B-16.pt"
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ViT-B-16/data.pkl", pickle.dumps({"visual.conv1.weight": Payload()}, protocol=2))
        archive.writestr("ViT-B-16/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("ViT-B-16/version", "3\n")
    with torch.device("meta"):
        model = tiny("vit_base_patch16_clip_224")
    with pytest.raises(CheckpointError) as info:
        match_checkpoint(model, path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused: the TorchScript archive pickles ")
    assert "\n" not in message and not marker.exists()


# ----------------------------------------------------------------------------------------------
# MAE ViT-B: the released encoder, a whole pre-training checkpoint, timm's hub copy
# ----------------------------------------------------------------------------------------------

VIT = "vit_tiny_patch16_224"  # the same ViT as vit_base_patch16_224 (timm's defaults, LayerNorm eps 1e-6), smaller


@pytest.fixture(scope="module")
def mae_encoder() -> nn.Module:
    """MAE's encoder as models_mae.py has it: a token-pooled timm ViT with its final norm and no head."""
    torch.manual_seed(0)
    model = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def mae_decoder(width: int = 192, decoder_width: int = 128, patch_pixels: int = 16 * 16 * 3) -> dict:
    """MAE's decoder (models_mae.py MaskedAutoencoderViT), which fine-tuning drops."""
    block = timm.create_model(VIT, pretrained=False, num_classes=0, embed_dim=decoder_width, depth=1,
                              num_heads=4).blocks[0].state_dict()
    return {"mask_token": torch.zeros(1, 1, decoder_width), "decoder_embed.weight": torch.randn(decoder_width, width),
            "decoder_embed.bias": torch.zeros(decoder_width), "decoder_pos_embed": torch.zeros(1, 17, decoder_width),
            **{f"decoder_blocks.0.{k}": v for k, v in block.items()},
            "decoder_norm.weight": torch.ones(decoder_width), "decoder_norm.bias": torch.zeros(decoder_width),
            "decoder_pred.weight": torch.randn(patch_pixels, decoder_width), "decoder_pred.bias": torch.zeros(
                patch_pixels)}


def loads_like_mae_finetuning(path: Path, encoder: nn.Module) -> list[str]:
    """What MAE's main_finetune.py does with --global_pool: the encoder loads, ``norm`` is dropped,
    ``fc_norm`` and ``head`` start fresh (it asserts exactly those four keys missing)."""
    model = build_backbone(VIT, num_classes=3, image_size=32, checkpoint=None).eval()
    missing, unexpected = load_checkpoint(model, path)
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert {"norm.weight", "norm.bias"} <= set(unexpected)
    torch.testing.assert_close(model.fc_norm.weight, torch.ones(192))  # a new LayerNorm, not the encoder's norm
    assert model.head.weight.abs().max() < 1e-3
    # built for 32 px: the 4x4 grid's position embeddings resized to 2x2, the rest identical
    torch.testing.assert_close(model.blocks[11].mlp.fc2.weight, encoder.blocks[11].mlp.fc2.weight)
    torch.testing.assert_close(model.patch_embed.proj.bias, encoder.patch_embed.proj.bias)
    torch.testing.assert_close(model.cls_token, encoder.cls_token)
    with torch.device("meta"):
        meta = build_backbone(VIT, num_classes=1, image_size=32)
    match = match_checkpoint(meta, path)
    assert match.loaded == match.backbone_tensors == 148
    return unexpected


def test_mae_released_encoder(tmp_path: Path, mae_encoder: nn.Module) -> None:
    """``mae_pretrain_vit_base.pth`` as released: ``{"model": encoder}``, the encoder's ``norm`` included."""
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": mae_encoder.state_dict()}, path)
    loads_like_mae_finetuning(path, mae_encoder)


def test_mae_pretraining_checkpoint_with_decoder(tmp_path: Path, mae_encoder: nn.Module) -> None:
    """What main_pretrain.py saves each epoch (``checkpoint-799.pth``): encoder, mask token and
    decoder, optimizer and scaler state, the argparse Namespace. The decoder is not the backbone's:
    reported as unexpected, it does not count against the file."""
    path = tmp_path / "checkpoint-799.pth"
    model = {**mae_encoder.state_dict(), **mae_decoder()}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0]}]},
                "epoch": 799, "scaler": {"scale": 65536.0, "growth_factor": 2.0},
                "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True)}, path)
    unexpected = loads_like_mae_finetuning(path, mae_encoder)
    assert {k for k in unexpected if k not in ("norm.weight", "norm.bias")} == set(mae_decoder())


def test_mae_timm_hub_copy(tmp_path: Path, mae_encoder: nn.Module) -> None:
    """timm's ``vit_base_patch16_224.mae`` repo saved locally: the same encoder as a flat safetensors file."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in mae_encoder.state_dict().items()}, str(path))
    loads_like_mae_finetuning(path, mae_encoder)


def test_mae_outputs_match_maes_own_global_pool_features(tmp_path: Path, mae_encoder: nn.Module) -> None:
    """The loaded backbone pools the encoder's patch tokens as MAE's fine-tuning model does
    (models_vit.py: mean of the tokens after the class token, then fc_norm)."""
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": mae_encoder.state_dict()}, path)
    model = build_backbone(VIT, num_classes=3, image_size=64, checkpoint=path).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = mae_encoder.blocks(mae_encoder._pos_embed(mae_encoder.patch_embed(x)))
        expected = model.fc_norm(tokens[:, 1:, :].mean(dim=1))
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), expected)


def test_clip_pre_norm_belongs_to_the_stem() -> None:
    """CLIP's ``norm_pre`` (ln_pre) runs before the first block: depth 0 for layer-wise lr decay,
    as timm's own grouping has it, and an op of the stem for per-op methods (SSF)."""
    from timm.models import group_parameters

    from medpeft_ray.models import get_family

    vit = get_family("vit")
    with torch.device("meta"):
        model = tiny("vit_base_patch16_clip_224")
    assert vit.depth_of("norm_pre.weight") == vit.depth_of("norm_pre.bias") == 0
    groups = group_parameters(model, model.group_matcher(coarse=True))
    assert groups["norm_pre.weight"] == groups["patch_embed.proj.weight"] == groups["cls_token"]
    ops = [layer for layer, _ in vit.ops(model, vit.blocks(model))]
    assert ops[:2] == [model.patch_embed.proj, model.norm_pre]

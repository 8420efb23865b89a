"""The ViT family: timm Vision Transformers (``vit_*``, ``deit_*``, ``deit3_*``).

A ViT is a patch embedding (the stem), a sequence ``blocks`` of transformer blocks (each
``norm1 -> attn (qkv, proj) -> norm2 -> mlp (fc1, fc2)``) and, with the global average pooling
used here, ``fc_norm`` and ``head``.

The backbones of the benchmark studies are all timm names of this family: ViT-B/L/H
(``vit_base_patch16_224``, ``vit_large_patch16_224``, ``vit_huge_patch14_224``, optionally with a
timm tag such as ``.orig_in21k``), MAE ViT-B (``vit_base_patch16_224``) and CLIP ViT-B/16
(``vit_base_patch16_clip_224``; ``vit_base_patch16_clip_quickgelu_224`` for OpenAI's weights, which
were trained with QuickGELU). CLIP towers normalise the tokens before the first block
(``norm_pre``, part of the stem here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from medpeft_ray.models.families import BackboneFamily, register_family

if TYPE_CHECKING:
    from torch import nn

#: a block's ops in forward order, by their paths under the block
BLOCK_OPS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def create_options(image_size: int) -> dict[str, Any]:
    # global average pooling of the patch tokens, then fc_norm and head, as in MED-PEFT; built for
    # image_size (a checkpoint's position embeddings are resized to it)
    return {"img_size": image_size, "global_pool": "avg"}


def ops(model: "nn.Module", blocks: Sequence["nn.Module"]) -> list[tuple["nn.Module", int]]:
    from torch import nn

    found: list[tuple[nn.Module, int]] = [(model.patch_embed.proj, 1)]  # conv: NCHW
    if isinstance(getattr(model, "norm_pre", None), nn.LayerNorm):
        found.append((model.norm_pre, -1))  # CLIP's pre-norm (ln_pre), before the first block
    for block in blocks:
        found += [(block.get_submodule(path), -1) for path in BLOCK_OPS]
    if isinstance(getattr(model, "norm", None), nn.LayerNorm):
        found.append((model.norm, -1))  # the final norm (global-pool models use fc_norm, part of the head)
    return found


VIT = register_family(BackboneFamily(
    name="vit",
    title="ViT",
    name_forms="vit_*, deit_*",
    model_names=r"(vit|deit3?)_",
    example="vit_tiny_patch16_224",
    create_options=create_options,
    head=("head", "fc_norm"),
    stem=("cls_token", "pos_embed", "reg_token", "patch_embed", "dist_token", "norm_pre"),
    # Searched anywhere in a name, so the blocks of a hybrid ViT's convolutional stem
    # (patch_embed.backbone.stages.S.blocks.B, or a ResNet-D's layerS) take the depth of the
    # ViT block (or stage) with the same index.
    depths=((r"(?:^|\.)blocks\.(\d+)\.", 1), (r"(?:^|\.)layer(\d+)\.", 0)),
    block_regex=r"blocks\.{index}",
    # q, k and v are the parts of the fused attn.qkv Linear that peft methods split first
    targets={"q": "attn.qkv.q", "k": "attn.qkv.k", "v": "attn.qkv.v",
             "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    ops=ops,
    attention="attn",
    mlp="mlp",
))

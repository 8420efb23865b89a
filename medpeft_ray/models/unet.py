"""The diffusion U-Net family: the denoiser of a latent text-to-image pipeline (``diffusers``).

A generation search fine-tunes the U-Net of a Stable-Diffusion-style pipeline (U-Net, VAE, noise
scheduler, CLIP text encoder and tokenizer); the VAE and the text encoder stay frozen. The
pipeline comes from a local folder in the diffusers layout (``model.checkpoint:
/models/stable-diffusion-v1-5``: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), or, without one, is built in code with random weights:

- ``unet_tiny``: a small pipeline (0.8 M-parameter U-Net, 0.2 M VAE, a 2-layer text encoder) that
  trains on CPU in seconds: the synthetic default and the tests;
- ``unet_sd15``: Stable Diffusion v1.5's architecture (860 M-parameter U-Net, its VAE and a CLIP
  ViT-L/14-sized text encoder), for measuring memory and speed at the real size.

A pipeline built in code is written once to the cache as a diffusers folder (its weights drawn
from a fixed seed, so every process gets the same one), and from then on it is read exactly like
a downloaded one: one loading path, and an exported LoRA loads into it with diffusers' own
``load_lora_weights``. Its tokenizer is byte-level CLIP BPE with no merges (one token per
character): a real tokenizer class with a vocabulary that needs no download.

In a U-Net the *blocks* methods attach to are the transformer blocks of its cross-attention
stages (``BasicTransformerBlock``: ``attn1`` self-attention, ``attn2`` cross-attention to the
text, ``ff`` the feed-forward), wherever they sit (down, mid, up).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from medpeft_ray.data.cache import cache_root
from medpeft_ray.errors import CheckpointError
from medpeft_ray.models.families import BackboneFamily, register_family

if TYPE_CHECKING:
    from torch import nn

#: the pipeline's parts a diffusers folder must hold, with the file each part's config is in
PIPELINE_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                  "scheduler": "scheduler_config.json", "tokenizer": None}
#: the seed of a pipeline built in code (its weights are part of what every trial starts from)
PIPELINE_SEED = 0
#: format of a pipeline written to the cache (bump when the built-in configurations change)
_BUILT_FORMAT = 2  # 2: report words in the tokenizer

#: the architectures built in code, by backbone name
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "unet_tiny": {
        "unet": {"layers_per_block": 1, "block_out_channels": (32, 64), "cross_attention_dim": 32,
                 "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "attention_head_dim": 8, "norm_num_groups": 8},
        "vae": {"block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    },
    "unet_sd15": {
        "unet": {"layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768,
                 "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                      "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 "attention_head_dim": 8, "norm_num_groups": 32},
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
        "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                         "num_attention_heads": 12},
    },
}
BUILT_IN = tuple(_ARCHITECTURES)


def vae_factor(vae_blocks: int) -> int:
    """How much a VAE with ``vae_blocks`` encoder blocks shrinks each side (each block but the last halves it)."""
    return 2 ** (vae_blocks - 1)


#: words of chest-radiograph reports the built-in tokenizer has one token for (any other word is spelled out)
REPORT_WORDS = (
    "no acute cardiopulmonary process enlarged cardiac silhouette heart size normal mild moderate severe small large "
    "left right bilateral pleural effusion effusions nodule nodules pulmonary pneumothorax consolidation focal mass "
    "lung lungs opacity opacities edema atelectasis lobe lower upper basilar apical clear there is are with of the "
    "and in seen without evidence new stable unchanged interval since prior support devices tube line catheter"
).split()


def _tokenizer() -> Any:
    """Byte-level CLIP BPE built in code: CLIP's tokenizer class, nothing to download.

    Its vocabulary is every byte (alone and word-final), plus the merges that spell each of
    :data:`REPORT_WORDS` as one token; other words are spelled out in pieces, so any text
    tokenizes, and a report's impression fits CLIP's 77 positions.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({f"{char}</w>": len(alphabet) + i for i, char in enumerate(alphabet)})
    for left, right in _report_merges():
        vocab.setdefault(left + right, len(vocab))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=_report_merges(), model_max_length=77)


def _report_merges() -> list[tuple[str, str]]:
    """BPE merges learned on :data:`REPORT_WORDS` until each is one token (ties: the first pair in sort order)."""
    words = [[*word[:-1], word[-1] + "</w>"] for word in dict.fromkeys(REPORT_WORDS)]
    merges: list[tuple[str, str]] = []
    while any(len(word) > 1 for word in words):
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        for i, word in enumerate(words):
            merged, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == pair:
                    merged.append(word[j] + word[j + 1])
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            words[i] = merged
    return merges


def build_pipeline(backbone: str, image_size: int) -> Any:
    """The ``backbone`` pipeline built in code with random weights from :data:`PIPELINE_SEED`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = _ARCHITECTURES[backbone]
    factor = vae_factor(len(arch["vae"]["block_out_channels"]))
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PIPELINE_SEED)
        unet = UNet2DConditionModel(sample_size=image_size // factor, in_channels=4, out_channels=4, **arch["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
                            down_block_types=("DownEncoderBlock2D",) * len(arch["vae"]["block_out_channels"]),
                            up_block_types=("UpDecoderBlock2D",) * len(arch["vae"]["block_out_channels"]), **arch["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch["text_encoder"]))
    # Stable Diffusion's training noise schedule
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def built_pipeline_folder(backbone: str, image_size: int) -> Path:
    """The diffusers folder of a pipeline built in code, written to the cache the first time it is asked for.

    Written to a temporary folder and renamed into place, so concurrent workers never read half a pipeline.
    """
    folder = cache_root() / "pipelines" / f"{backbone}-{image_size}px-v{_BUILT_FORMAT}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    build_pipeline(backbone, image_size).save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another worker's copy won the race: identical weights, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pipeline_folder(backbone: str, checkpoint: Path | None, image_size: int) -> Path:
    """Where the trial's pipeline is read from: ``model.checkpoint``, else the built-in one in the cache."""
    return Path(checkpoint) if checkpoint is not None else built_pipeline_folder(backbone, image_size)


def check_pipeline_folder(folder: Path) -> dict[str, Any]:
    """Checks a diffusers pipeline folder before any training; returns its U-Net's config.

    Raises:
        CheckpointError: one line naming the folder and the part that is missing or unreadable.
    """
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model.checkpoint of a diffusion U-Net must be a pipeline folder in the "
                              "diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    for part, config_name in PIPELINE_PARTS.items():
        where = folder / part
        if not where.is_dir():
            raise CheckpointError(f"{folder}: no {part}/ folder (a diffusers pipeline folder has "
                                  f"{', '.join(p + '/' for p in PIPELINE_PARTS)})")
        if config_name is not None and not (where / config_name).is_file():
            raise CheckpointError(f"{where}: no {config_name}")
        if part in ("unet", "vae", "text_encoder") and not any(
                p.suffix in (".safetensors", ".bin") for p in where.iterdir()):
            raise CheckpointError(f"{where}: no weights (.safetensors or .bin)")
    try:
        config = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'unet' / 'config.json'}: unreadable ({exc})") from None
    if config.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise CheckpointError(f"{folder / 'unet'}: a {config.get('_class_name')}, not a text-conditioned "
                              "UNet2DConditionModel")
    return config


def pipeline_weights(folder: Path) -> Path:
    """The U-Net's weights file in a pipeline folder: what the leaderboard records (path and SHA-256) as the start."""
    found = sorted(p for p in (Path(folder) / "unet").iterdir() if p.suffix in (".safetensors", ".bin"))
    if not found:
        raise CheckpointError(f"{Path(folder) / 'unet'}: no weights (.safetensors or .bin)")
    return found[0]


def build_unet(backbone: str, image_size: int, checkpoint: Path | None = None) -> "nn.Module":
    """The U-Net of the trial's pipeline; on the meta device (a ``torch.device("meta")`` context)
    only its skeleton, from the config, with nothing read or drawn."""
    import torch
    from diffusers import UNet2DConditionModel

    if torch.empty(0).device.type == "meta":
        if checkpoint is None:
            arch = _ARCHITECTURES[backbone]
            factor = vae_factor(len(arch["vae"]["block_out_channels"]))
            return UNet2DConditionModel(sample_size=image_size // factor, in_channels=4, out_channels=4, **arch["unet"])
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(checkpoint) / "unet"))
    folder = pipeline_folder(backbone, checkpoint, image_size)
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)


def _ops(model: "nn.Module", blocks: Sequence["nn.Module"]) -> list[tuple["nn.Module", int]]:
    raise NotImplementedError("per-channel feature methods (SSF) do not apply to diffusion U-Nets")


UNET = register_family(BackboneFamily(
    name="unet",
    title="diffusion U-Net",
    name_forms=", ".join(BUILT_IN),
    model_names=r"unet_(?:" + "|".join(name.removeprefix("unet_") for name in BUILT_IN) + r")$",
    example="unet_tiny",
    create_options=lambda image_size: {},
    head=(),  # nothing trains under every method: a generation task has no new head
    stem=(),  # no layer-wise lr decay: every parameter is at the top depth
    depths=(),
    block_regex=r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.transformer_blocks\.\d+",
    # LoRA's targets: the projections of both attentions (self and cross), as diffusers' own
    # text-to-image LoRA training adapts them
    targets={**{name: (f"attn1.{name}", f"attn2.{name}") for name in ("to_q", "to_k", "to_v")},
             "to_out": ("attn1.to_out.0", "attn2.to_out.0"), "ff": ("ff.net.0.proj", "ff.net.2")},
    ops=_ops,
    attention=("attn1", "attn2"),
    mlp="ff",
    task="generation",
    build=lambda name, num_classes, image_size, checkpoint, drop_path: build_unet(name, image_size, checkpoint),
))

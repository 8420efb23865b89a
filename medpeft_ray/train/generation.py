"""The generation recipe: text-to-image fine-tuning of a diffusion U-Net, scored by a fixed validation loss and FID.

A :class:`GenerationRecipe` is the :class:`~medpeft_ray.train.recipe.TrialRecipe` of a worker whose
trials fine-tune the U-Net of a latent-diffusion pipeline (:mod:`medpeft_ray.models.unet`). It
keeps what a classification recipe keeps (imports, decoded data, the pristine pre-trained U-Net)
and what only generation has, all frozen and shared by every trial on the worker:

- the VAE, the text encoder and the tokenizer (never trained here);
- each split encoded once: the VAE's latent distribution (mean and std) per image and the text
  encoder's states per caption. A training step then draws its latents from that distribution,
  as ``latent_dist.sample()`` would, without running the VAE or the text encoder again;
- the FID reference: the validation images' features (:class:`~medpeft_ray.train.fid.FidScorer`).

Per trial: a copy of the pristine U-Net with the method applied, trained under DeepSpeed with the
noise-prediction (epsilon) loss at uniformly drawn timesteps. Each epoch reports ``val_loss``, the
same loss on the validation split at *fixed* noise and timesteps (drawn from
:data:`VALIDATION_NOISE_SEED`, the same in every trial, so values compare across trials), which the
scheduler stops trials on. At the epochs of ``trial.fid.epochs`` (the scheduler's rungs and the last)
it samples one image per fixed validation prompt (the first ``fid.images`` validation captions,
seeds :data:`SAMPLE_SEED` + i) with diffusers' own pipeline and DDIM, and scores ``val_fid``
against the validation images; other epochs report ``val_fid`` as NaN (never a best epoch).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from medpeft_ray.errors import TrialFailed
from medpeft_ray.methods import count_parameters, prepare_model
from medpeft_ray.models.unet import pipeline_folder
from medpeft_ray.samples import SAMPLE_SEED, SAMPLES_FILE
from medpeft_ray.train.checkpoint import save_trial_checkpoint
from medpeft_ray.train.engine import WorkerContext, mean_over_ranks, set_determinism
from medpeft_ray.train.fid import FidScorer
from medpeft_ray.train.precision import compute_dtype
from medpeft_ray.train.recipe import TrialRecipe, TrialStopped, dataset_identity
from medpeft_ray.train.run import CheckpointOf, EpochScores, Resumed, TestScores

if TYPE_CHECKING:
    from medpeft_ray.config import TrialConfig

#: seed of the validation split's fixed noise and timesteps (one for every trial: comparable losses)
VALIDATION_NOISE_SEED = 20240601
#: encoded splits a worker keeps (train subsets of the label ratios, validation, test)
MAX_ENCODED = 6


@dataclass
class Frozen:
    """The pipeline's frozen parts on this worker's device, in the trials' dtype."""

    folder: Path
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    dtype: torch.dtype

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


@dataclass
class Encoded:
    """One split as the U-Net sees it: latent distribution per image, text-encoder states per caption.

    Kept in host memory (pinned on GPUs): a trial copies each batch's rows to the device, so a
    worker holding a few splits' text states (about 10 GB per 85,000 captions at SD v1.5 size) does
    not hold them on the GPU.
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    text: torch.Tensor
    captions: list[str]
    #: the split's images (the FID reference of its samples); None for a training subset
    images: np.ndarray | None

    def __len__(self) -> int:
        return len(self.latent_mean)


@dataclass
class _GenerationState:
    """Everything one generation trial allocated on this worker."""

    engine: Any
    frozen: Frozen
    train: Encoded
    val: Encoded
    noise_scheduler: Any
    dtype: torch.dtype
    micro_batch: int
    shard_size: int
    trainable_params: int
    total_params: int
    data: Any
    start_epoch: int = 0
    marks: dict[str, float] = field(default_factory=dict)
    samples: np.ndarray | None = None
    #: the FID scorer of the validation split (its real images' features)
    scorer: Any = None

    @property
    def train_images(self) -> int:
        return len(self.train)


class GenerationRecipe(TrialRecipe):
    """A worker's trainer of text-to-image trials; keeps the frozen pipeline parts and encoded splits between trials."""

    def __init__(self, ctx: WorkerContext, control_group: Any = None) -> None:
        super().__init__(ctx, control_group)
        self._frozen: dict[tuple[Any, ...], Frozen] = {}
        self._encoded: dict[tuple[Any, ...], Encoded] = {}
        self._fid: dict[tuple[Any, ...], Any] = {}
        self._fixed_noise: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- set-up that trials share ------------------------------------------------------------
    def trial_dtype(self, trial: TrialConfig) -> torch.dtype:
        return compute_dtype(trial.train, self.use_gpu)

    def frozen(self, trial: TrialConfig) -> Frozen:
        """The VAE, text encoder, tokenizer and noise schedule of the trial's pipeline, read once per worker."""
        # diffusers loads where a generation trial runs: every worker imports this module (recipes.py)
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import CLIPTextModel, CLIPTokenizer

        dtype = self.trial_dtype(trial)
        checkpoint = Path(trial.model.checkpoint) if trial.model.checkpoint else None
        key = (trial.model.backbone, str(checkpoint), trial.dataset.image_size, dtype)
        if key not in self._frozen:
            folder = pipeline_folder(trial.model.backbone, checkpoint, trial.dataset.image_size)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
            for module in (vae, text_encoder):
                module.requires_grad_(False).eval().to(self.ctx.device)
                if dtype != torch.float32:  # the trial's dtype: the pipeline samples in one dtype throughout
                    module.to(dtype)
            scheduler_config = dict(DDPMScheduler.load_config(folder, subfolder="scheduler"))
            self._frozen.clear()  # one pipeline at a time: a change of backbone frees the last one
            self._encoded.clear()
            self._frozen[key] = Frozen(folder, vae, text_encoder, tokenizer, scheduler_config, dtype)
        return self._frozen[key]

    @torch.no_grad()
    def encode(self, trial: TrialConfig, name: str, split: Any, frozen: Frozen, rows: np.ndarray | None = None) -> Encoded:
        """A split's latent distributions and caption states (of its ``rows``, or all), computed once per
        worker (frozen VAE and text encoder) and kept on the host."""
        # the whole dataset's identity (root, options, seed), not its name: a grid's cells may share a name
        key = (name, dataset_identity(trial), trial.label_ratio if name == "train" else -1.0)
        if key in self._encoded:
            return self._encoded[key]
        if split.captions is None:
            raise TrialFailed(f"dataset {trial.dataset.name!r}: the {name} split has no captions to condition on")
        device, batch = self.ctx.device, max(1, trial.train.eval_batch_size)
        means, stds, texts = [], [], []
        rows = np.arange(len(split)) if rows is None else rows
        captions = [str(split.captions[row]) for row in rows]
        for start in range(0, len(rows), batch):
            # a batch gathered from the map (a copy: the cache's images are read-only)
            images = torch.from_numpy(np.take(split.images, rows[start:start + batch], axis=0)).to(device)
            images = images.unsqueeze(1).expand(-1, 3, -1, -1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
            pixels = images.to(frozen.dtype) / 127.5 - 1.0
            dist = frozen.vae.encode(pixels).latent_dist
            means.append((dist.mean * frozen.scaling_factor).cpu())
            stds.append((dist.std * frozen.scaling_factor).cpu())
            texts.append(self.text_states(frozen, captions[start:start + batch]).cpu())
        host = [torch.cat(part) for part in (means, stds, texts)]
        if self.ctx.device.type == "cuda":
            host = [tensor.pin_memory() for tensor in host]  # so each batch's copy to the GPU is asynchronous
        encoded = Encoded(*host, captions, split.images if len(rows) == len(split) else None)
        while len(self._encoded) >= MAX_ENCODED:
            self._encoded.pop(next(iter(self._encoded)))
        self._encoded[key] = encoded
        return encoded

    @staticmethod
    def text_states(frozen: Frozen, captions: list[str]) -> torch.Tensor:
        ids = frozen.tokenizer(captions, padding="max_length", max_length=frozen.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        return frozen.text_encoder(ids.to(frozen.text_encoder.device))[0]

    def fixed_noise(self, encoded: Encoded, name: str, timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's fixed noise and timesteps (from :data:`VALIDATION_NOISE_SEED`): the same in every trial."""
        key = (name, tuple(encoded.latent_mean.shape), timesteps)
        if key not in self._fixed_noise:
            generator = torch.Generator().manual_seed(VALIDATION_NOISE_SEED)
            noise = torch.randn(encoded.latent_mean.shape, generator=generator)
            steps = torch.randint(0, timesteps, (len(encoded),), generator=generator)
            self._fixed_noise[key] = (noise.to(self.ctx.device), steps.to(self.ctx.device))
        return self._fixed_noise[key]

    def fid_scorer(self, trial: TrialConfig, name: str, reference: np.ndarray) -> Any:
        """The FID scorer with ``reference`` (a split's images) as its real set, kept per worker."""
        weights = trial.fid.weights if trial.fid is not None else None
        key = (str(weights), name, dataset_identity(trial))
        if key not in self._fid:
            scorer = FidScorer(weights, self.ctx.device)
            scorer.set_real(reference)
            self._fid[key] = scorer
        return self._fid[key]

    def warm_up(self, trial: TrialConfig, dataset_key: dict[str, Any] | None) -> None:
        """Data, frozen parts, encoded splits, the pristine U-Net and the FID reference, made before the first trial."""
        data = self.dataset(trial, dataset_key)
        frozen = self.frozen(trial)
        self.encode(trial, "train", data.train, frozen, self.train_rows(trial, data))
        self.encode(trial, "val", data.val, frozen)
        self.fid_scorer(trial, "val", data.val.images)
        with torch.random.fork_rng(devices=[]):
            self.build_model(trial, 0)

    # -- per trial ---------------------------------------------------------------------------
    def build_model(self, trial: TrialConfig, num_classes: int) -> torch.nn.Module:
        """A copy of the pristine U-Net with the method applied (its new parameters draw from the trial's seed)."""
        model = copy.deepcopy(self.pristine_backbone(trial, 0))
        return prepare_model(model, trial.method.name, trial.method.options, trial.family)

    def build(self, trial: TrialConfig, dataset_key: dict[str, Any] | None, resume_from: Path | None) -> _GenerationState:
        from diffusers import DDPMScheduler  # see frozen()

        marks: dict[str, float] = {}
        set_determinism(trial.train.seed, trial.train.deterministic)
        data = self.dataset(trial, dataset_key)
        train_rows = self.train_rows(trial, data)
        frozen = self.frozen(trial)
        train, val = self.encode(trial, "train", data.train, frozen, train_rows), self.encode(trial, "val", data.val, frozen)
        marks["data"] = time.time()
        model = self.build_model(trial, 0)
        trainable_params, total_params = count_parameters(model)
        marks["model"] = time.time()
        engine, micro_batch, shard_size = self.engine(trial, model, len(train_rows))
        state = _GenerationState(
            engine=engine, frozen=frozen, train=train, val=val,
            noise_scheduler=DDPMScheduler.from_config(frozen.scheduler_config), dtype=frozen.dtype,
            micro_batch=micro_batch, shard_size=shard_size, trainable_params=trainable_params,
            total_params=total_params, data=data, marks=marks,
        )
        if resume_from is not None:
            state.start_epoch = self.load(state, resume_from)
        marks["deepspeed_init"] = time.time()
        return state

    def noise_loss(self, state: _GenerationState, encoded: Encoded, index: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, latent_noise: torch.Tensor | None) -> torch.Tensor:
        """Mean squared error of the U-Net's noise prediction on ``index`` of ``encoded`` (epsilon objective).

        ``latent_noise`` draws the latents from their distribution (training); None takes its mean (evaluation).
        """
        device = self.ctx.device
        index = index.cpu()  # the encoded split is on the host: gather there, copy the batch only
        latents = encoded.latent_mean[index].to(device, non_blocking=True)
        if latent_noise is not None:
            latents = latents + encoded.latent_std[index].to(device, non_blocking=True) * latent_noise.to(device, latents.dtype)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = state.noise_scheduler.add_noise(latents.float(), noise, timesteps)
        text = encoded.text[index].to(device, non_blocking=True)
        prediction = state.engine(noisy.to(state.dtype), timesteps, encoder_hidden_states=text, return_dict=False)[0]
        return F.mse_loss(prediction.float(), noise.float())

    def train_epoch(self, trial: TrialConfig, state: Any, epoch: int, first_step: list[float]) -> float:
        """One epoch of noise-prediction steps on this rank's stride (see :meth:`TrialRecipe.train_epoch`)."""
        ctx, engine = self.ctx, state.engine
        engine.train()
        order_gen = torch.Generator().manual_seed(trial.train.seed * 1000 + epoch)
        # noise, timesteps and latent draws from a stream seeded by (seed, epoch, rank): a resumed
        # epoch draws what it would have drawn without the interruption
        noise_gen = torch.Generator().manual_seed(trial.train.seed * 1000 + epoch + 10**6 * (ctx.rank + 1))
        shard = torch.randperm(len(state.train), generator=order_gen)[ctx.rank :: ctx.world_size][: state.shard_size]
        timesteps = state.noise_scheduler.config.num_train_timesteps
        shape = tuple(state.train.latent_mean.shape[1:])
        loss_sum = torch.zeros((), device=ctx.device)
        steps = 0
        for start in range(0, len(shard), state.micro_batch):
            if self.stop_requested():
                raise TrialStopped()
            index = shard[start : start + state.micro_batch]
            noise = torch.randn((len(index), *shape), generator=noise_gen)
            latent_noise = torch.randn((len(index), *shape), generator=noise_gen)
            t = torch.randint(0, timesteps, (len(index),), generator=noise_gen)
            if not first_step:
                first_step.append(time.time())
            loss = self.noise_loss(state, state.train, index, noise, t, latent_noise)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
            steps += 1
        return mean_over_ranks(loss_sum, steps, ctx.world_size)

    @torch.no_grad()
    def fixed_loss(self, trial: TrialConfig, state: _GenerationState, encoded: Encoded, name: str) -> float:
        """The split's noise-prediction loss at its fixed noise and timesteps, over every rank."""
        state.engine.eval()
        noise, timesteps = self.fixed_noise(encoded, name, state.noise_scheduler.config.num_train_timesteps)
        index = torch.arange(len(encoded))[self.ctx.rank :: self.ctx.world_size]
        total = torch.zeros((), device=self.ctx.device)
        for start in range(0, len(index), trial.train.eval_batch_size):
            chunk = index[start : start + trial.train.eval_batch_size]
            total += self.noise_loss(state, encoded, chunk, noise[chunk.to(noise.device)],
                                     timesteps[chunk.to(timesteps.device)], None) * len(chunk)
        return mean_over_ranks(total, len(index), self.ctx.world_size)  # summed over ranks, then divided

    @torch.no_grad()
    def sample(self, trial: TrialConfig, state: _GenerationState, prompts: list[str]) -> np.ndarray:
        """One grey uint8 image per prompt, seeds :data:`SAMPLE_SEED` + i, with diffusers' pipeline and DDIM."""
        state.engine.eval()
        pipeline = sampling_pipeline(state.frozen, state.engine.module)
        return generate(pipeline, prompts, trial.fid, trial.dataset.image_size, trial.train.eval_batch_size)

    def save(self, trial: TrialConfig, state: Any, directory: Path, metrics: dict[str, Any],
             per_class: list[float]) -> Path:
        record = {"epoch": metrics["epoch"], "metrics": metrics, "trial": trial.model_dump(mode="json")}
        save_trial_checkpoint(directory, state.engine, record, self.ctx.rank)
        if self.ctx.rank == 0 and state.samples is not None:
            np.save(directory / SAMPLES_FILE, state.samples)
        return directory

    def score(self, trial: TrialConfig, state: _GenerationState, encoded: Encoded, name: str) -> tuple[float, np.ndarray, list[str]]:
        """FID of samples for the split's fixed prompts against the split's images; the samples and prompts."""
        assert trial.fid is not None
        prompts = encoded.captions[: trial.fid.images]
        samples = self.sample(trial, state, prompts)
        value = float(self.fid_scorer(trial, name, encoded.images).score(samples))
        return value, samples, prompts

    # -- the run's hooks (the skeleton is :meth:`Recipe.run`) ------------------------------------
    def check(self, trial: TrialConfig) -> None:
        if trial.fid is None:
            raise TrialFailed("a generation trial needs its sampling settings (trial.fid)")

    def before_epochs(self, trial: TrialConfig, state: _GenerationState) -> None:
        state.scorer = self.fid_scorer(trial, "val", state.val.images)

    def score_epoch(self, trial: TrialConfig, state: _GenerationState, epoch: int, steps_time: float) -> EpochScores:
        """``val_loss`` at fixed noise, and at the epochs of ``trial.fid.epochs`` ``val_fid`` (NaN at the others)."""
        assert trial.fid is not None
        val_loss = self.fixed_loss(trial, state, state.val, "val")
        fid, state.samples, prompts = math.nan, None, []
        sample_time = 0.0
        if epoch + 1 in trial.fid.epochs:
            sample_start = time.time()
            fid, state.samples, prompts = self.score(trial, state, state.val, "val")
            sample_time = time.time() - sample_start
        details = {"fid_features": state.scorer.features, "fid_stand_in": state.scorer.stand_in,
                   "fid_images": trial.fid.images, "fid_steps": trial.fid.steps, "prompts": prompts}
        return EpochScores(
            scores={"val_loss": val_loss, "val_fid": fid}, details=details,
            extra={"sample_time_s": sample_time,
                   "train_images_per_s": state.shard_size * self.ctx.world_size / max(steps_time, 1e-9)},
        )

    def recorded_best(self, trial: TrialConfig, state: _GenerationState, past: Resumed,
                      checkpoint_of: CheckpointOf | None) -> dict[str, Any] | None:
        return past.best(trial, checkpoint_of, ("val_loss", "val_fid"))

    def test_scores(self, trial: TrialConfig, state: _GenerationState, best: dict[str, Any]) -> TestScores:
        """``test_loss`` at fixed noise, and ``test_fid`` of the test prompts' samples against the test images."""
        test = self.encode(trial, "test", state.data.test, state.frozen)
        test_fid, _, test_prompts = self.score(trial, state, test, "test")
        return TestScores(scores={"test_loss": self.fixed_loss(trial, state, test, "test"), "test_fid": test_fid},
                          details={"prompts": test_prompts})


def sampling_pipeline(frozen: Frozen, unet: torch.nn.Module) -> Any:
    """diffusers' Stable Diffusion pipeline around ``unet`` and the frozen parts, sampling with DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # see GenerationRecipe.frozen()

    pipeline = StableDiffusionPipeline(
        vae=frozen.vae, text_encoder=frozen.text_encoder, tokenizer=frozen.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(frozen.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline: Any, prompts: list[str], fid: Any, image_size: int, batch_size: int) -> np.ndarray:
    """One grey uint8 (N, H, W) image per prompt; prompt i is drawn from seed :data:`SAMPLE_SEED` + i.

    The same call reproduces a trial's samples from an exported adapter loaded into a pipeline.
    """
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(SAMPLE_SEED + start + i) for i in range(len(chunk))]
        out = pipeline(chunk, height=image_size, width=image_size, num_inference_steps=fid.steps,
                       guidance_scale=fid.guidance_scale, generator=generators, output_type="np").images
        images.append(np.clip(np.asarray(out, dtype=np.float32).mean(axis=-1) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.concatenate(images) if images else np.zeros((0, image_size, image_size), np.uint8)

#!/usr/bin/env python
"""Fine-tune the UNet of a Stable Diffusion 1.x / 2.x or SDXL pipeline on image-caption pairs (JAX/Flax twin of
train_text_to_image.py). Reads a standard PyTorch diffusers folder or hub id, trains data-parallel over every local
device, and saves a PyTorch diffusers pipeline (safetensors) that current diffusers loads. With --rank N it trains a
LoRA instead (Hu et al. 2021, arXiv:2106.09685; the flags are diffusers' LoRA scripts'): the base model stays frozen
and the run writes the adapter alone, in diffusers' layout (pytorch_lora_weights.safetensors) and the UIs' one.

One host (all its GPUs or TPU cores):
    python train_text_to_image_flax.py \
      --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --dataset_name=lambdalabs/naruto-blip-captions --resolution=512 --center_crop --random_flip \
      --train_batch_size=1 --mixed_precision=bf16 --max_train_steps=15000 --learning_rate=1e-05 \
      --max_grad_norm=1 --snr_gamma=5.0 --checkpointing_steps=500 --output_dir=sd-naruto-model-flax

Multi-host TPU pod: run the same command on every host with --jax_distributed; the global batch is
per-device batch x all devices of all hosts. Two CPU devices (what the tests do):
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python train_text_to_image_flax.py <flags>
Several processes named by hand (GPU nodes, or two CPU processes as a test does), process 0 on HOST0:
    python train_text_to_image_flax.py <flags> --coordinator_address=HOST0:1234 --num_processes=2 --process_id=0
    python train_text_to_image_flax.py <flags> --coordinator_address=HOST0:1234 --num_processes=2 --process_id=1
The output_dir must be on a file system all hosts share: each writes and reads its part of every checkpoint.
After a crash or preemption, relaunch the same command with --resume_from_checkpoint=latest.
This file keeps the recipe you edit; the machinery it shares with the other scripts (run folder, checkpoints,
batching, image checks, single-file export) is the sdtrain/ package beside it: copy both together.
"""

import dataclasses
import functools
import io
import logging
import math
import os
import sys
import time
from typing import Any

from sdtrain.batching import (
    BucketConfig,
    add_bucket_arguments,
    add_crop_arguments,
    bucket_batches,
    crop_box,
    parse_buckets,
    parse_size,
    setup_buckets,
    shuffled_batches,
    size_conditioning,
)
from sdtrain.checks import training_problem, validation_problem
from sdtrain.cli import ArgumentParser, UserError, add_debug_argument, run
from sdtrain.config_file import RUN_CONFIG, add_config_argument, add_prompt_arguments, parse_with_config, write_config
from sdtrain.data_config import (
    CaptionConfig,
    DatasetConfig,
    add_cache_arguments,
    add_caption_arguments,
    add_dataset_arguments,
    caption_choices,
    caption_problem,
)
from sdtrain.distributed import DistributedConfig, add_distributed_arguments, distributed_problem
from sdtrain.families import folder_family
from sdtrain.hub import add_hub_arguments, hub_problem, push_to_hub
from sdtrain.images import inspect_images, load_rgb, verify_image
from sdtrain.logs import format_logs, warmup_applied
from sdtrain.long_prompts import add_long_prompt_arguments, caption_token_ids, log_cut_captions
from sdtrain.lora import LoraConfig, add_lora_arguments, lora_identity, lora_problem
from sdtrain.masks import DatasetMasks, MaskConfig, add_mask_arguments, crop_and_flip, mask_problem
from sdtrain.preemption import StopRequest, preemption_message, stop_exit_code
from sdtrain.recipes import (
    RecipeConfig,
    add_recipe_arguments,
    check_recipe_arguments,
    recipe_fields,
    timestep_bias_weights,
)
from sdtrain.run_folder import (
    add_checkpoint_arguments,
    check_output_dir,
    check_process_group,
    check_resume_identity,
    checkpoint_metadata,
    find_resume_checkpoint,
    read_checkpoint_metadata,
    take_output_dir,
    warn_if_batch_layout_changed,
)
from sdtrain.seeds import add_seed_argument, choose_seed, draw_seed
from sdtrain.single_file import (
    SingleFileConfig,
    add_single_file_arguments,
    component_configs,
    save_single_file,
    single_file_layout,
)
from sdtrain.sizes import check_model_sizes, size_factors
from sdtrain.validation_loss import ValidationLossConfig, add_validation_loss_arguments, validation_loss_problem

# The largest decay of --use_ema, as diffusers' EMAModel.
EMA_MAX_DECAY = 0.9999
INTERPOLATION_MODES = ["lanczos", "bicubic", "bilinear", "nearest", "box", "hamming"]
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine"]
OPTIMIZERS = ["adamw", "adafactor", "lion", "prodigy", "schedule_free_adamw"]


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Fine-tune the UNet of a Stable Diffusion pipeline on image-caption pairs (JAX/Flax)."
    )
    add_config_argument(parser)
    group = parser.add_argument_group("Model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a PyTorch diffusers Stable Diffusion 1.x / 2.x or SDXL pipeline.",
    )
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use and save instead of the pipeline's (e.g. an fp16-safe SDXL VAE); it runs in the "
        "mixed-precision dtype (for SDXL, unless its config asks for fp32: force_upcast).",
    )
    group.add_argument(
        "--revision", type=str, default=None, help="Hub revision (branch, tag or commit) of the pretrained pipeline."
    )
    group.add_argument("--variant", type=str, default=None, help="Weight file variant to load, e.g. 'fp16'.")
    group.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Training target; default: the scheduler config's prediction_type.",
    )
    group = parser.add_argument_group("Data")
    add_dataset_arguments(group)
    add_crop_arguments(group)
    add_mask_arguments(group)
    add_cache_arguments(group)
    group.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=INTERPOLATION_MODES,
        help="Interpolation used to resize images.",
    )
    add_bucket_arguments(group)
    add_caption_arguments(group)
    add_long_prompt_arguments(group)
    group = parser.add_argument_group("Training")
    add_seed_argument(group)
    group.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    group.add_argument(
        "--num_train_epochs", type=int, default=100, help="Epochs to train; ignored when --max_train_steps is given."
    )
    group.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer updates; overrides --num_train_epochs."
    )
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated into one optimizer update."
    )
    group.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Rematerialise each UNet block in the backward pass to save memory.",
    )
    group.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate (after warmup).")
    group.add_argument(
        "--scale_lr", action="store_true", help="Multiply the learning rate by accumulation steps x global batch size."
    )
    group.add_argument(
        "--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule."
    )
    group.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup optimizer updates of the schedule.")
    group.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR weighting gamma (5.0 is recommended); off when not given.",
    )
    add_recipe_arguments(parser.add_argument_group("Recipe: noise, timesteps, loss"))
    group.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the UNet and save it as the final model.",
    )
    group.add_argument(
        "--ema_validation",
        type=str,
        default="ema",
        choices=["ema", "raw", "both"],
        help="With --use_ema, what validation renders: the EMA, the raw weights (-raw grids), or both side by side.",
    )
    group.add_argument(
        "--noise_offset", type=float, default=0.0, help="Scale of offset noise (0.1 is typical); 0 turns it off."
    )
    group.add_argument(
        "--input_perturbation",
        type=float,
        default=0.0,
        help="Scale of input perturbation (0.1 is recommended); 0 turns it off.",
    )
    add_lora_arguments(parser.add_argument_group("LoRA"))
    add_optimizer_arguments(parser.add_argument_group("Optimizer"))
    group.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Clip gradients to this global norm (0 turns clipping off)."
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "bf16"],
        help="bf16 computes in bfloat16 with fp32 master weights.",
    )
    add_distributed_arguments(group)
    group = parser.add_argument_group("Checkpointing")
    group.add_argument(
        "--output_dir", type=str, default="sd-model-finetuned", help="Where the final pipeline and checkpoints go."
    )
    add_single_file_arguments(group)
    add_checkpoint_arguments(group)
    group = parser.add_argument_group("Logging")
    add_debug_argument(group)
    group.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Log loss, lr, grad norm, images/s and peak GPU memory averaged over this many updates.",
    )
    add_prompt_arguments(group)
    group.add_argument(
        "--validation_epochs", type=int, default=5, help="Render the validation prompts every this many epochs."
    )
    group.add_argument(
        "--validation_resolution",
        type=str,
        default=None,
        help="Size of the validation images, 'height,width' (a bucket's, say); default: --resolution square.",
    )
    add_hub_arguments(group, "Upload the final pipeline to the Hugging Face Hub.")
    add_validation_loss_arguments(parser.add_argument_group("Validation loss on held-out images (docs/evaluation.md)"))
    args = parse_with_config(parser, argv)

    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("no training data: pass --dataset_name (hub id or local dataset folder) or --train_data_dir")
    positive = "resolution train_batch_size gradient_accumulation_steps checkpointing_steps validation_epochs"
    for name in (positive + " logging_steps").split():
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ["max_train_steps", "checkpoints_total_limit", "max_train_samples"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    problem = validation_problem("--validation_prompts", args.validation_prompts, args.validation_resolution)
    if problem:
        parser.error(problem)
    try:
        args.aspect_ratio_buckets = parse_buckets(args.aspect_ratio_buckets)
        args.validation_resolution = parse_size(args.validation_resolution, args.resolution)
    except ValueError as err:
        parser.error(str(err))
    args.use_aspect_ratio_buckets = args.use_aspect_ratio_buckets or args.aspect_ratio_buckets is not None
    if args.cache_latents and not (args.center_crop or args.use_aspect_ratio_buckets):
        parser.error(
            "--cache_latents stores one crop per image, so it needs --center_crop or --use_aspect_ratio_buckets "
            "(where each image has one crop), not a new random crop at every use"
        )
    if args.cache_text_embeddings and (args.shuffle_caption or args.caption_tag_dropout_rate > 0):
        parser.error(
            "--shuffle_caption and --caption_tag_dropout_rate change a caption at every use, and "
            "--cache_text_embeddings encodes each caption once: use one or the other"
        )
    if args.ema_validation != "ema" and not args.use_ema:
        parser.error(f"--ema_validation {args.ema_validation} renders EMA and raw weights: it needs --use_ema")
    if args.bucket_no_upscale and not args.use_aspect_ratio_buckets:
        parser.error("--bucket_no_upscale needs --use_aspect_ratio_buckets")
    problem = caption_problem(CaptionConfig.from_args(args)) or mask_problem(MaskConfig.from_args(args))
    if problem:
        parser.error(problem)
    check_recipe_arguments(parser, RecipeConfig.from_args(args))
    check_optimizer_arguments(parser, args)
    for problem in (
        training_problem(
            args.learning_rate,
            args.lr_warmup_steps,
            args.max_grad_norm,
            args.num_train_epochs,
            args.max_train_steps,
            args.snr_gamma,
        ),
        hub_problem(args.push_to_hub, args.hub_model_id, args.hub_token, args.output_dir),
        validation_loss_problem(ValidationLossConfig.from_args(args)),
    ):
        if problem:
            parser.error(problem)
    problem = distributed_problem(DistributedConfig.from_args(args))
    if problem:
        parser.error(problem)
    problem = lora_problem(args) or flax_lora_problem(args)
    if problem:
        parser.error(problem)
    return args


def flax_lora_problem(args):
    """What the Flax twin cannot do with a LoRA, beyond sdtrain.lora.lora_problem."""
    if args.rank is None:
        return None
    if args.lora_dropout > 0:
        # The adapter is merged into the kernels (W + scale * B @ A) inside the loss; dropout on the LoRA branch's
        # input is not a weight and has no such form.
        return "--lora_dropout: the Flax twin merges the LoRA into the weights and cannot drop its inputs; use 0"
    return None


def add_optimizer_arguments(parser):
    """--optimizer and its hyperparameters, the PyTorch twins' flags (8-bit AdamW is CUDA-only and not here)."""
    parser.add_argument(
        "--optimizer",
        type=str,
        default="adamw",
        choices=OPTIMIZERS,
        help="adamw, Adafactor, Lion, Prodigy (use --learning_rate 1) or schedule-free AdamW, all from optax.",
    )
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="Beta1 of AdamW, Lion, Prodigy, schedule-free.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="Beta2 of AdamW, Lion, Prodigy, schedule-free.")
    parser.add_argument(
        "--adam_weight_decay",
        type=float,
        default=1e-2,
        help="Decoupled weight decay (textual inversion: of the new rows only).",
    )
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="Epsilon of AdamW, Prodigy, schedule-free.")


def check_optimizer_arguments(parser, args):
    if args.optimizer == "schedule_free_adamw" and args.lr_scheduler != "constant":
        # Schedule-free replaces the schedule (Defazio et al. 2024); its warmup is --lr_warmup_steps, inside it.
        parser.error(f"--optimizer schedule_free_adamw needs --lr_scheduler constant, got {args.lr_scheduler}")


# ----------------------------------------------------------------------------------------------------------------------
# The frameworks load only here, after the arguments are parsed and checked: --help and a mistyped flag answer
# at once, before the seconds torch, JAX and diffusers take to import.
# ----------------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    ARGS = parse_args()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
from flax import struct
from flax.training.train_state import TrainState
from jax.experimental import multihost_utils
from PIL import Image
from tqdm.auto import tqdm

from sdtrain.captions import edit_caption  # imports datasets
from sdtrain.jax.checkpoints import check_finite, final_save_failed, restore_train_state, save_checkpoint, tree_mib
from sdtrain.jax.data import process_batches
from sdtrain.jax.export import save_pipeline
from sdtrain.jax.family import family_code
from sdtrain.jax.long_prompts import long_prompt_code
from sdtrain.jax.loop import LogWindow, evaluation_params, start_distributed, stop_agreed
from sdtrain.jax.lora import adapter_layers, adapter_state, add_adapters, merge_lora
from sdtrain.jax.models import (
    enable_block_rematerialisation,
    load_flax_model,
    load_noise_scheduler,
    resolve_pipeline_folder,
    resolve_vae_folder,
)
from sdtrain.jax.validation import render_validation_images, save_validation_grid, validation_renderer
from sdtrain.jax.validation_loss import HeldOutLoss, held_out_rows
from sdtrain.lora import save_lora
from sdtrain.model_cards import fine_tuned_card, lora_card, write_model_card

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# The recipe's parts: dataset, models, loss, optimizer, validation and saving (the machinery is in sdtrain/)
# ----------------------------------------------------------------------------------------------------------------------


class ImageCaptionDataset:
    """Rows -> {pixel_values (CHW in [-1, 1]) or latent_mean and latent_std, input_ids or encoder_hidden_states
    (+ pooled_text_embeds)}, and for SDXL {time_ids, caption_kept}, as numpy arrays. Indexed by (epoch, row) keys: crop,
    flip and caption edits are drawn from an RNG seeded by (seed, epoch, row), so a resumed run sees the same samples.
    `tokenizers`: one per text encoder (two for SDXL); input_ids holds a row of ids for each. `family`: the model
    family (sdtrain.families.Family), which says whether examples carry size conditioning and the caption_kept mark."""

    def __init__(self, rows, tokenizers, args, seed, family):
        self.rows, self.tokenizers, self.args, self.seed, self.family = rows, tokenizers, args, seed, family
        self.resample = getattr(Image.Resampling, args.image_interpolation_mode.upper())
        self.masks = DatasetMasks(MaskConfig.from_args(args), self.image_source, rows, self.resample)
        self.caption_config = CaptionConfig.from_args(args)
        values = enumerate(rows.select_columns([args.caption_column])[args.caption_column])
        choices = [self.caption_choices(value, row) for row, value in values]
        log_cut_captions(tokenizers[0], choices, args.max_token_length)  # a cut caption is not cut silently
        # Set in main() from setup_buckets(): each row's bucket and the buckets' (height, width); None crops squares.
        self.bucket_of_row = None
        self.buckets = None
        # Set by build_caches(): row -> (latent means, stds) per view; (caption -> index, {batch key: the captions'
        # text embeddings, and pooled ones where the family has them}).
        self.latent_cache = None
        self.text_cache = None
        # Set in main() from check_images(): every image's (width, height), SDXL's original-size conditioning.
        self.image_sizes = None

    def __len__(self):
        return len(self.rows)

    def image_source(self, row):
        """The row's image as (a path or a file object, a name that points the user to it)."""
        value = self.rows[row][self.args.image_column]
        if isinstance(value, str):
            value = {"path": value, "bytes": None}
        name = f"{value.get('path') or 'in the data'} (column '{self.args.image_column}', row {row})"
        return (value["path"] if value.get("bytes") is None else io.BytesIO(value["bytes"])), name

    def open_image(self, row):
        return load_rgb(*self.image_source(row))

    def verify_image(self, row):
        return self.masks.check(row, verify_image(*self.image_source(row)))  # --masked_loss: the mask is found

    def crop_box(self, row, image_size, rng):
        """Where the row's training crop comes from (see sdtrain.batching.crop_box, shared with the PyTorch twin)."""
        bucket = None if self.buckets is None else self.buckets[self.bucket_of_row[row]]
        return crop_box(image_size, rng, self.args.resolution, self.args.center_crop, bucket, self.seed, row)

    def transform(self, image, row, rng, flip=None):
        """The row's image as the training crop, CHW in [-1, 1], its crop box (see crop_box) and whether it is
        mirrored."""
        box = self.crop_box(row, (image.width, image.height), rng)
        if flip is None:
            flip = bool(self.args.random_flip and rng.random() < 0.5)
        image = crop_and_flip(image, box, flip, self.resample)  # as self.masks moves the mask
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # the VAE's input range
        return pixels, box, flip

    def pick_caption(self, value, row, rng):
        if isinstance(value, str):
            return value
        choices = self.caption_choices(value, row)
        return choices[int(rng.integers(len(choices)))]

    def caption_choices(self, value, row):
        return caption_choices(value, row, self.args.caption_column)

    def __getitem__(self, key):
        epoch, row = key
        rng = np.random.default_rng([self.seed, epoch, row])
        example = {}
        if self.latent_cache is None:
            example["pixel_values"], box, flipped = self.transform(self.open_image(row), row, rng)
        else:
            # The same draws as transform(): with a fixed crop only the flip is random.
            flipped = bool(self.args.random_flip and rng.random() < 0.5)
            means, stds = self.latent_cache[row]
            example["latent_mean"], example["latent_std"] = means[int(flipped)], stds[int(flipped)]
            box = self.crop_box(row, self.image_sizes[row], rng=None) if self.family.added_conditioning else None
        if self.family.added_conditioning:
            example["time_ids"] = np.asarray(size_conditioning(self.image_sizes[row], box, flipped), np.float32)
        if self.masks:  # with cached latents, from the cache beside them
            example["mask"] = self.masks(row, box, flipped)
        caption = self.pick_caption(self.rows[row][self.args.caption_column], row, rng)
        caption = edit_caption(caption, rng, self.caption_config)
        if self.family.force_zeros_for_empty_prompt:
            # SDXL pipelines sample the unconditional branch from zeros, not from the encoded empty prompt, unless
            # their model_index.json says otherwise: an empty caption, dropped or in the data, trains that branch.
            example["caption_kept"] = np.float32(caption != "")
        if self.text_cache is None:
            example["input_ids"] = caption_token_ids(self.tokenizers, [caption], self.args.max_token_length)[0]
        else:
            index_of_caption, cached = self.text_cache
            example.update({name: encoded[index_of_caption[caption]] for name, encoded in cached.items()})
        return example


def check_images(dataset):
    """Every image must decode before anything else happens (a bad file found hours in would stop every resume
    too). Each process checks its share of the rows, and all processes agree on the count of failures. Returns every
    image's (width, height), which the buckets need."""
    indices = list(range(jax.process_index(), len(dataset), jax.process_count()))
    started = time.perf_counter()
    found, problems = inspect_images(dataset.verify_image, indices)
    sizes = np.zeros((len(dataset), 2), np.int64)
    sizes[indices] = [size or (0, 0) for size in found]
    count = len(problems)
    if jax.process_count() > 1:
        count = int(np.sum(multihost_utils.process_allgather(np.array(count))))
        sizes = np.sum(multihost_utils.process_allgather(sizes), axis=0)  # each row is filled by one process
    if count:
        listed = "\n  ".join(sorted(problems)[:10]) or "(listed by the other processes)"
        raise UserError(f"{count} of {len(dataset)} images cannot be read; fix or remove them:\n  {listed}")
    logger.info(f"Checked {len(dataset)} images in {time.perf_counter() - started:.1f} s")
    return [tuple(int(side) for side in size) for size in sizes]


def encode_once(items, prepare, encode, global_batch_size, batch_sharding, description):
    """encode(prepare(share)) over `items`, once, for --cache_latents / --cache_text_embeddings, as host arrays (a
    tuple of them) in the order of `items`. Global batches are data-parallel like training batches (each process
    prepares its share; the last one is padded with its last item) and every process receives the whole result."""
    local = global_batch_size // jax.process_count()
    first = jax.process_index() * local
    outputs = []
    for start in tqdm(range(0, len(items), global_batch_size), desc=description, disable=jax.process_index() != 0):
        chunk = items[start : start + global_batch_size]
        chunk = chunk + [chunk[-1]] * (global_batch_size - len(chunk))
        inputs = jax.make_array_from_process_local_data(batch_sharding, prepare(chunk[first : first + local]))
        encoded = encode(inputs)
        if jax.process_count() > 1:
            encoded = multihost_utils.process_allgather(encoded, tiled=True)
        outputs.append([np.asarray(part)[: len(items) - start] for part in encoded])
    return tuple(np.concatenate(parts) for parts in zip(*outputs, strict=True))


def build_caches(dataset, frozen, args, global_batch_size, batch_sharding):
    """--cache_latents: the VAE's latent distribution (mean, std) of every image (and its mirror image with
    --random_flip), at its bucket's size, so the VAE leaves the jitted step. --cache_text_embeddings: the text
    encoders' output (for SDXL with the pooled embedding) for every caption the data holds, and the empty one."""
    if args.cache_latents:

        @jax.jit
        def encode_images(vae_params, pixel_values):
            encoded = frozen.vae.apply(
                {"params": vae_params}, pixel_values, deterministic=True, method=frozen.vae.encode
            )
            return encoded.latent_dist.mean, encoded.latent_dist.std

        def prepare(share):
            return np.stack(
                [dataset.transform(dataset.open_image(row), row, None, flip=view == 1)[0] for row, view in share]
            )

        views = 2 if args.random_flip else 1
        bucket_of_row = dataset.bucket_of_row if dataset.buckets is not None else [0] * len(dataset)
        dataset.latent_cache, size = {}, 0
        for bucket in sorted(set(bucket_of_row)):
            rows = [row for row in range(len(dataset)) if bucket_of_row[row] == bucket]
            items = [(row, view) for row in rows for view in range(views)]
            description = f"Caching latents ({len(rows)} images)"
            encode = functools.partial(encode_images, frozen.vae_params)
            means, stds = encode_once(items, prepare, encode, global_batch_size, batch_sharding, description)
            for index, row in enumerate(rows):
                dataset.latent_cache[row] = (
                    means[index * views : (index + 1) * views],
                    stds[index * views : (index + 1) * views],
                )
            size += means.nbytes + stds.nbytes
        dataset.masks.fill_cache(lambda row: dataset.crop_box(row, dataset.image_sizes[row], None), views)
        logger.info(f"Cached latents: {len(dataset)} images x {views} views, {size / 2**20:.1f} MiB of host memory")
    if args.cache_text_embeddings:
        captions = {"": 0}  # a dropped caption (--proportion_empty_prompts) is the empty one
        for row, value in enumerate(dataset.rows.select_columns([args.caption_column])[args.caption_column]):
            for caption in dataset.caption_choices(value, row):
                captions.setdefault(caption, len(captions))

        encode_text = functools.partial(frozen.code.encode_text, frozen.text_encoders)

        @jax.jit
        def encode(text_encoder_params, input_ids):
            return jax.tree.leaves(encode_text(text_encoder_params, input_ids))  # (hidden states, pooled or nothing)

        prepare = functools.partial(caption_token_ids, dataset.tokenizers, max_token_length=args.max_token_length)
        encode = functools.partial(encode, frozen.text_encoder_params)
        description = "Caching text embeddings"
        encoded = encode_once(list(captions), prepare, encode, global_batch_size, batch_sharding, description)
        names = ["encoder_hidden_states", "pooled_text_embeds"]  # the pooled ones only where the family has them
        dataset.text_cache = (captions, dict(zip(names, encoded, strict=False)))
        embeddings = encoded[0]
        logger.info(
            f"Cached text embeddings: {embeddings.shape} {embeddings.dtype}, {embeddings.nbytes / 2**20:.1f} MiB"
        )


def learning_rate_schedule(name, peak, warmup_steps, max_train_steps):
    """The optax schedule --lr_scheduler names, in optimizer updates: a linear warmup to `peak` over warmup_steps
    (except for 'constant', which ignores warmup as diffusers' get_scheduler does), then constant, linear or cosine."""
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    if name == "constant":
        return optax.constant_schedule(peak)
    if name == "constant_with_warmup":
        after = optax.constant_schedule(peak)
    elif name == "linear":
        after = optax.linear_schedule(peak, 0.0, max(max_train_steps - warmup_steps, 1))
    else:
        after = optax.cosine_decay_schedule(peak, max(max_train_steps - warmup_steps, 1))
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(args, schedule):
    """The --optimizer following `schedule`, after global-norm clipping (--max_grad_norm), applied once every
    --gradient_accumulation_steps batches to their mean gradient (optax.MultiSteps). Every one is optax's own."""
    betas, decay = (args.adam_beta1, args.adam_beta2), args.adam_weight_decay
    if args.optimizer == "adamw":
        optimizer = optax.adamw(schedule, b1=betas[0], b2=betas[1], eps=args.adam_epsilon, weight_decay=decay)
    elif args.optimizer == "adafactor":
        # Adafactor (Shazeer & Stern 2018, arXiv:1804.04235): factored second moments, a fraction of AdamW's memory.
        optimizer = optax.adafactor(schedule, weight_decay_rate=decay or None)
    elif args.optimizer == "lion":
        # Lion (Chen et al. 2023, arXiv:2302.06675): the sign of a momentum blend; wants a 3-10x smaller lr.
        optimizer = optax.lion(schedule, b1=betas[0], b2=betas[1], weight_decay=decay)
    elif args.optimizer == "prodigy":
        # Prodigy (Mishchenko & Defazio 2023, arXiv:2306.06101) estimates the step size itself: --learning_rate 1.
        optimizer = optax.contrib.prodigy(schedule, betas=betas, eps=args.adam_epsilon, weight_decay=decay)
    else:
        # Schedule-free AdamW (Defazio et al. 2024, arXiv:2405.15682): averaging replaces the learning-rate schedule.
        optimizer = optax.contrib.schedule_free_adamw(
            args.learning_rate,
            warmup_steps=args.lr_warmup_steps or None,  # optax reads 0 warmup steps as a learning rate of 0
            b1=betas[0],
            b2=betas[1],
            eps=args.adam_epsilon,
            weight_decay=decay,
        )
    if args.max_grad_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optimizer)
    return optax.MultiSteps(optimizer, every_k_schedule=args.gradient_accumulation_steps)


@struct.dataclass
class FrozenModels:
    """The models that do not train. Their params are pytree leaves, so the jitted step takes them as arguments (not
    as constants baked into the compiled program); the modules, the noise scheduler and the family's code are
    static."""

    vae_params: Any
    text_encoder_params: tuple  # one per text encoder (two for SDXL)
    scheduler_state: Any
    vae: Any = struct.field(pytree_node=False)
    text_encoders: tuple = struct.field(pytree_node=False)
    noise_scheduler: Any = struct.field(pytree_node=False)
    code: Any = struct.field(pytree_node=False)  # the family's (sdtrain.jax.family): encode_text, added conditioning
    # With --rank: the frozen UNet (in the mixed-precision dtype) the adapter is merged into, and the LoRA's config.
    unet_params: Any = None
    lora: Any = struct.field(pytree_node=False, default=None)


def adapted_weights(trained, frozen):
    """(UNet params, text encoders' params) that the trained params give: the trained UNet and the frozen text
    encoders, or with a LoRA (frozen.lora) the frozen base with the adapter `trained` merged in, the text encoders'
    too where it has theirs (keyed by the family's component names)."""
    if frozen.lora is None:
        return trained, frozen.text_encoder_params
    scale = frozen.lora.scale
    unet_params = merge_lora(frozen.unet_params, trained["unet"], scale)
    text_encoder_params = tuple(
        merge_lora(params, trained[name], scale) if name in trained else params
        for name, params in zip(frozen.code.family.text_encoders, frozen.text_encoder_params, strict=True)
    )
    return unet_params, text_encoder_params


def encode_batch(frozen, batch, rng):
    """The batch's latents and text conditioning (encoder_hidden_states, and for SDXL the UNet's added_cond_kwargs),
    from the frozen VAE and text encoders, or from their caches (build_caches). The VAE sample is drawn from `rng`."""
    if "latent_mean" in batch:
        # --cache_latents: sampling the stored distribution draws exactly what encoding the image would.
        latent_sample = batch["latent_mean"] + batch["latent_std"] * jax.random.normal(rng, batch["latent_mean"].shape)
    else:
        # The frozen VAE maps images to latents; the scaling factor brings them to roughly unit variance.
        vae_variables = {"params": frozen.vae_params}
        encoded = frozen.vae.apply(vae_variables, batch["pixel_values"], deterministic=True, method=frozen.vae.encode)
        latent_sample = encoded.latent_dist.sample(rng)
    latents = jnp.transpose(latent_sample, (0, 3, 1, 2)) * frozen.vae.config.scaling_factor
    if "encoder_hidden_states" in batch:
        # --cache_text_embeddings
        encoder_hidden_states, pooled_text_embeds = batch["encoder_hidden_states"], batch.get("pooled_text_embeds")
    else:
        # The frozen text encoders' hidden states condition the UNet through cross-attention.
        text_encoders, text_encoder_params = frozen.text_encoders, frozen.text_encoder_params
        encoder_hidden_states, pooled_text_embeds = frozen.code.encode_text(
            text_encoders, text_encoder_params, batch["input_ids"]
        )
    if frozen.code.family.force_zeros_for_empty_prompt:
        # An empty caption conditions on zeros (see ImageCaptionDataset).
        kept = batch["caption_kept"].astype(encoder_hidden_states.dtype)
        encoder_hidden_states = encoder_hidden_states * kept[:, None, None]
        pooled_text_embeds = pooled_text_embeds * kept[:, None].astype(pooled_text_embeds.dtype)
    # SDXL: the pooled text embedding and the size conditioning enter through the UNet's added embedding.
    added_cond_kwargs = frozen.code.added_conditioning(pooled_text_embeds, batch.get("time_ids"))
    if frozen.lora is not None and frozen.lora.train_text_encoder:
        # The text encoders' LoRA trains through the conditioning.
        return jax.lax.stop_gradient(latents), encoder_hidden_states, added_cond_kwargs
    return jax.lax.stop_gradient((latents, encoder_hidden_states, added_cond_kwargs))


# ----------------------------------------------------- BEGIN MATH -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the denoising loss depends on, built once from the flags in main(): the math reads nothing else."""

    prediction_type: str  # what the UNet predicts: "epsilon" (the noise) or "v_prediction" (the velocity)
    snr_gamma: float | None = None  # Min-SNR-gamma weighting; None weighs every timestep the same
    noise_offset: float = 0.0  # scale of offset noise; 0 turns it off
    input_perturbation: float = 0.0  # scale of input perturbation; 0 turns it off
    loss_type: str = "l2"  # "l2", "l1", "huber" (pseudo-Huber) or "smooth_l1"
    huber_schedule: str = "snr"  # how the Huber threshold c varies with the timestep: constant, exponential or snr
    huber_c: float = 0.1  # the Huber threshold c (at the noisiest timestep, when scheduled)
    debiased_estimation: bool = False  # weight each timestep by 1/sqrt(SNR) in epsilon terms
    timestep_sampling: str = "uniform"  # "uniform" or "logit_normal"
    logit_mean: float = 0.0  # logit-normal sampling: mean of the normal draw
    logit_std: float = 1.0  # logit-normal sampling: standard deviation of the normal draw
    timestep_bias_strategy: str = "none"  # favour "earlier", "later" or a "range" of timesteps; "none": uniform
    timestep_bias_multiplier: float = 1.0  # how much more (or less, below 1) often the favoured timesteps are drawn
    timestep_bias_begin: int = 0  # "range": first favoured timestep
    timestep_bias_end: int = 1000  # "range": one past the last favoured timestep
    timestep_bias_portion: float = 0.25  # "earlier" / "later": the favoured share of the timesteps


def diffusion_loss(
    unet,
    noise_scheduler,
    scheduler_state,
    latents,
    encoder_hidden_states,
    rng,
    config,
    sample_weights=None,
    added_cond_kwargs=None,
    mask=None,
):
    """The denoising loss of a batch of clean latents, averaged over the batch (weighted by `sample_weights` when
    given: a padded batch holds examples of weight 0). Every random draw comes from `rng`, in
    the PyTorch twin's order: noise, offset noise, input perturbation, timesteps. added_cond_kwargs: SDXL's pooled text
    embedding and size conditioning (None for SD 1.x / 2.x). mask: --masked_loss's latent-grid weights, (batch, 1, h,
    w), as the latents are (NCHW)."""
    noise_rng, offset_rng, perturbation_rng, timestep_rng = jax.random.split(rng, 4)
    bsz = latents.shape[0]
    noise = jax.random.normal(noise_rng, latents.shape, latents.dtype)
    if config.noise_offset:
        # Offset noise (Guttenberg 2023, crosslabs.org/blog/diffusion-with-offset-noise): a per-channel constant
        # lets the model change the overall brightness of an image.
        offset_shape = (bsz, latents.shape[1], 1, 1)
        offset = jax.random.normal(offset_rng, offset_shape, latents.dtype)
        noise = noise + config.noise_offset * offset
    noised_with = noise
    if config.input_perturbation:
        # Input perturbation (Ning et al. 2023, arXiv:2301.11706): noise the input with slightly perturbed noise but
        # keep the clean noise as target, which reduces exposure bias.
        perturbation = jax.random.normal(perturbation_rng, latents.shape, latents.dtype)
        noised_with = noise + config.input_perturbation * perturbation
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if config.timestep_sampling == "logit_normal":
        # Logit-normal timesteps (Esser et al. 2024, arXiv:2403.03206, as SD3 trains): t/T = sigmoid(n) with
        # n ~ N(mean, std) draws the middle timesteps, where denoising is hardest, most often.
        normal = jax.random.normal(timestep_rng, (bsz,), jnp.float32)
        fraction = jax.nn.sigmoid(config.logit_mean + config.logit_std * normal)
        timesteps = jnp.minimum((fraction * num_train_timesteps).astype(jnp.int32), num_train_timesteps - 1)
    elif config.timestep_bias_strategy != "none":
        # Biased timesteps (diffusers' SDXL script): invert the cumulative weights at a uniform draw.
        cdf = np.cumsum(timestep_bias_weights(num_train_timesteps, config))
        cdf = jnp.asarray((cdf / cdf[-1]).astype(np.float32))
        uniform = jax.random.uniform(timestep_rng, (bsz,), jnp.float32)
        timesteps = jnp.minimum(jnp.searchsorted(cdf, uniform, side="right"), num_train_timesteps - 1)
    else:
        timesteps = jax.random.randint(timestep_rng, (bsz,), 0, num_train_timesteps)
    # Forward diffusion: noisy_latents = sqrt(alpha_bar_t) * latents + sqrt(1 - alpha_bar_t) * noise.
    noisy_latents = noise_scheduler.add_noise(scheduler_state, latents, noised_with, timesteps)

    # The target depends on what the model predicts: the noise (epsilon) or the velocity v (Salimans & Ho 2022).
    if config.prediction_type == "epsilon":
        target = noise
    elif config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(scheduler_state, latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {config.prediction_type!r}")

    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    # Signal-to-noise ratio of each sample's timestep, alpha_bar / (1 - alpha_bar): 0 at a zero-terminal-SNR end.
    alphas_cumprod = scheduler_state.common.alphas_cumprod[timesteps].astype(jnp.float32)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    if config.loss_type == "l2":
        loss = (model_pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    elif config.loss_type == "l1":
        loss = jnp.abs(model_pred.astype(jnp.float32) - target.astype(jnp.float32))
    else:
        # Scheduled pseudo-Huber loss (Khrapov et al. 2024, arXiv:2403.16728): quadratic below c and linear above,
        # so outliers in the data pull less; c is large at low noise (nearly L2) and falls to huber_c at high noise.
        if config.huber_schedule == "exponential":
            huber_c = config.huber_c ** (timesteps.astype(jnp.float32) / num_train_timesteps)
        elif config.huber_schedule == "snr":
            sigmas = jnp.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
            huber_c = (1.0 - config.huber_c) / (1.0 + sigmas) ** 2 + config.huber_c
        else:
            huber_c = jnp.full((bsz,), config.huber_c, jnp.float32)
        huber_c = huber_c.reshape(bsz, *[1] * (model_pred.ndim - 1))
        pseudo_huber = (
            jnp.sqrt((model_pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2 + huber_c**2) - huber_c
        )
        # "huber" is scaled to match L2's curvature near 0, "smooth_l1" to match L1's slope in the tails.
        loss = 2.0 * huber_c * pseudo_huber if config.loss_type == "huber" else 2.0 * pseudo_huber
    if mask is not None:
        # Masked loss (kohya issue 2083): weights over their per-sample mean (all ones: the plain loss; all zeros: 0).
        mask_mean = mask.mean(axis=(1, 2, 3), keepdims=True)
        loss = loss * jnp.where(mask_mean > 0, mask / jnp.maximum(mask_mean, 1e-12), 0.0)
    loss = loss.mean(axis=tuple(range(1, model_pred.ndim)))

    # The timestep weights below are defined on the epsilon loss. A v-prediction loss is (SNR + 1) / SNR times the
    # epsilon loss (Salimans & Ho 2022), so in v terms a weight w becomes w * SNR / (SNR + 1).
    if config.snr_gamma is not None:
        # Min-SNR-gamma weighting (Hang et al. 2023, arXiv:2303.09556): min(SNR, gamma) / SNR in epsilon terms,
        # min(SNR, gamma) / (SNR + 1) in v terms; 1 where the epsilon SNR is 0.
        divisor = snr + 1.0 if config.prediction_type == "v_prediction" else snr
        weights = jnp.where(divisor > 0, jnp.minimum(snr, config.snr_gamma) / divisor, jnp.ones_like(snr))
        loss = loss * weights
    if config.debiased_estimation:
        # Debiased estimation (Yu et al. 2024, arXiv:2310.08442): weight 1/sqrt(SNR) in epsilon terms, with the SNR
        # held within [1e-3, 1e3] so the weight stays finite (at most 31.6) at a zero-terminal-SNR end.
        weights = jax.lax.rsqrt(jnp.clip(snr, 1e-3, 1e3))
        if config.prediction_type == "v_prediction":
            weights = weights * snr / (snr + 1.0)
        loss = loss * weights
    if sample_weights is not None:
        loss = loss * sample_weights
    return loss.mean()


# ------------------------------------------------------ END MATH ------------------------------------------------------


def batch_loss(params, state, frozen, batch, rng, config):
    """The loss `params` give on one batch: encode, then the denoising loss. Pure: every draw comes from `rng`."""
    sample_rng, loss_rng = jax.random.split(rng)
    # With a LoRA, `params` is the adapter, merged into the frozen weights here so that only it gets gradients.
    unet_params, text_encoder_params = adapted_weights(params, frozen)
    latents, encoder_hidden_states, added_cond_kwargs = encode_batch(
        frozen.replace(text_encoder_params=text_encoder_params), batch, sample_rng
    )

    def unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        variables = {"params": unet_params}
        return state.apply_fn(
            variables, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, train=True
        ).sample

    scheduler, scheduler_state = frozen.noise_scheduler, frozen.scheduler_state
    return diffusion_loss(
        unet,
        scheduler,
        scheduler_state,
        latents,
        encoder_hidden_states,
        loss_rng,
        config,
        batch["sample_weights"],
        added_cond_kwargs,
        batch.get("mask"),
    )


def train_step(state, frozen, batch, rng, config):
    """One batch: its loss and gradients, then an optimizer step (accumulated by optax.MultiSteps)."""
    loss, grads = jax.value_and_grad(batch_loss)(state.params, state, frozen, batch, rng, config)
    return state.apply_gradients(grads=grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}


class EMATrainState(TrainState):
    """The train state with --use_ema: the exponential moving average of the params is checkpointed with them."""

    ema_params: Any = None


def update_ema(state, global_step):
    """The EMA after optimizer update `global_step` (from 1), by diffusers' EMAModel rule: decay
    min(0.9999, (1 + s) / (10 + s)) for s = global_step - 1, and 0 at the first update, where the average starts."""
    s = global_step - 1
    decay = jnp.where(s <= 0, 0.0, jnp.minimum(EMA_MAX_DECAY, (1.0 + s) / (10.0 + s)))
    ema_params = jax.tree.map(lambda ema, new: ema - (1 - decay) * (ema - new), state.ema_params, state.params)
    return state.replace(ema_params=ema_params)


def validation_weights(args):
    """(grid tag suffix, whether it renders the EMA) for each grid --ema_validation asks for. An unsuffixed grid shows
    the weights that would be saved (the EMA with --use_ema); "-raw" grids show the weights the optimizer trains, so
    the two compare side by side at every validation (SimpleTuner's EMA validation, diffusers issue 7549)."""
    if not args.use_ema:
        return [("", False)]
    return {"ema": [("", True)], "raw": [("-raw", False)], "both": [("", True), ("-raw", False)]}[args.ema_validation]


def validate(render, state, frozen, tokenizers, args, seed, global_step, tag, is_main_process):
    """Render the validation prompts with the weights that would be saved now (the EMA with --use_ema), and with
    --ema_validation raw or both, with the raw trained weights; a LoRA merged into the base model. Every process
    renders; the main process saves, and gets the first grid's path (relative to --output_dir)."""
    grids = []
    for suffix, ema_weights in validation_weights(args):
        trained = state.ema_params if ema_weights else evaluation_params(state, args.optimizer)
        unet_params, text_encoder_params = adapted_weights(trained, frozen)
        params = {"unet": unet_params, "vae": frozen.vae_params, "text_encoders": text_encoder_params}
        images = render_validation_images(
            render, params, tokenizers, args.validation_prompts, seed, args.max_token_length
        )
        if is_main_process:
            grids.append(
                save_validation_grid(images, args.validation_prompts, args.output_dir, tag + suffix, global_step)
            )
    return grids[0] if grids else None


def model_card(family, args, global_step, validation_grid):
    """README.md: the license and tags of the base model's family, how to load the pipeline, the run's settings."""
    warmup = warmup_applied(args.lr_scheduler, args.lr_warmup_steps, args.optimizer)
    settings = {
        "optimizer updates": global_step,
        "learning rate": f"{args.learning_rate} ({args.lr_scheduler}, {warmup} warmup)",
        "batch per device x accumulation": f"{args.train_batch_size} x {args.gradient_accumulation_steps}",
        "resolution": args.resolution,
        "mixed precision": args.mixed_precision,
        "EMA": args.use_ema,
        "Min-SNR gamma": args.snr_gamma,
    }
    data, prompt = args.dataset_name or args.train_data_dir, (args.validation_prompts or ["a photo"])[0]
    repo = args.hub_model_id or args.output_dir
    base_model = args.pretrained_model_name_or_path
    if args.rank is not None:  # a LoRA, loaded onto the base model
        card = (family, os.path.basename(__file__), base_model, data, repo, prompt, LoraConfig.from_args(args))
        return lora_card(*card, args.output_dir, settings, validation_grid)
    return fine_tuned_card(
        family, os.path.basename(__file__), base_model, data, repo, prompt, settings, validation_grid
    )


def main(args):
    # ------------------------------------------------------------------------------------------------------ setup
    start_distributed(
        args.jax_distributed,
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        args.heartbeat_timeout_seconds,
    )
    # force: importing Orbax (or anything that logs at import time) leaves a root handler that would make this a no-op.
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
        force=True,
    )
    is_main_process = jax.process_index() == 0
    if not is_main_process:
        for name in (__name__, "sdtrain"):
            logging.getLogger(name).setLevel(logging.ERROR)
    check_process_group(jax.process_count(), os.environ, "jax")
    # Only the main process writes (but for each process's share of a checkpoint's arrays), and only into a folder
    # that is absent, empty or a run's, never the model's own. It takes the folder (and its lock) just before
    # training, so that a run refused before then writes nothing.
    if is_main_process:
        check_output_dir(
            args.output_dir,
            {
                "--pretrained_model_name_or_path": args.pretrained_model_name_or_path,
                "--pretrained_vae_model_name_or_path": args.pretrained_vae_model_name_or_path,
            },
        )
    output_lock = None
    stop_request = StopRequest()
    resume_path = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    resume_metadata = read_checkpoint_metadata(resume_path)
    if resume_path is not None and bool(resume_metadata.get("use_ema")) != args.use_ema:
        saved = "with" if resume_metadata.get("use_ema") else "without"
        raise UserError(f"{resume_path} was saved {saved} --use_ema: resume it the same way, or start a new output_dir")
    lora = LoraConfig.from_args(args)  # None: the whole UNet trains
    # Process 0's draw on every process when there is no --seed, so that all shuffle and draw alike.
    seed = choose_seed(args.seed, resume_metadata, int(multihost_utils.broadcast_one_to_all(np.uint32(draw_seed()))))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    # ------------------------------------------------------------------------------------------------ load models
    weight_dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    folder = resolve_pipeline_folder(args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir)
    source = f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}"
    # SD 1.x / 2.x or SDXL, from model_index.json before any weights load; any other family is named and refused.
    family = folder_family(folder, source)
    code = family_code(family)
    # A size the model cannot train or render at is refused now, from the configs, not at the first validation.
    check_model_sizes(
        folder,
        args.pretrained_vae_model_name_or_path,
        args.revision,
        args.cache_dir,
        args.resolution,
        args.validation_resolution,
        args.aspect_ratio_buckets,
        whole_model=True,
    )
    if args.save_single_file:  # refused now rather than after training
        single_file_layout(*component_configs(folder))
    tokenizers = code.load_tokenizers(folder)
    code = long_prompt_code(code, tokenizers, args.max_token_length)  # --max_token_length: captions in 77-token chunks
    text_encoders = code.load_text_encoders(folder, args.variant, weight_dtype)
    vae_folder = resolve_vae_folder(folder, args.pretrained_vae_model_name_or_path, args.cache_dir)
    # SDXL's VAE overflows in fp16 and says so (force_upcast): it stays in fp32. An fp16-safe VAE says otherwise.
    vae_dtype = code.vae_dtype(FlaxAutoencoderKL.load_config(vae_folder[0], subfolder=vae_folder[1]), weight_dtype)
    vae, vae_params = load_flax_model(FlaxAutoencoderKL, *vae_folder, args.variant, vae_dtype)
    logger.info(
        f"VAE in {jnp.dtype(vae_dtype)}"
        + (" (its config asks for it: force_upcast)" if vae_dtype != weight_dtype else "")
    )
    if args.gradient_checkpointing:
        enable_block_rematerialisation()
    unet, unet_params = load_flax_model(FlaxUNet2DConditionModel, folder, "unet", args.variant, weight_dtype)
    base_unet_params = None
    if lora is not None:
        # Only the adapter trains (in float32, with its optimizer state); the base stays frozen in the compute dtype.
        base_unet_params = jax.tree.map(lambda p: p.astype(weight_dtype), unet_params)
        text_encoder_params = dict(
            zip(family.text_encoders, [encoder.params for encoder in text_encoders], strict=True)
        )
        unet_params = add_adapters(lora, base_unet_params, text_encoder_params, seed)
    # Lin et al. 2023 (arXiv:2305.08891): rescaled betas reach zero SNR at the last timestep, as sampling starts.
    noise_scheduler, scheduler_state = load_noise_scheduler(folder, args.rescale_betas_zero_snr)
    frozen = FrozenModels(
        vae_params=vae_params,
        text_encoder_params=tuple(text_encoder.params for text_encoder in text_encoders),
        scheduler_state=scheduler_state,
        vae=vae,
        text_encoders=tuple(text_encoders),
        noise_scheduler=noise_scheduler,
        code=code,
        unet_params=base_unet_params,
        lora=lora,
    )
    render = None
    if args.validation_prompts:
        sampling = (args.validation_resolution, args.prediction_type, args.rescale_betas_zero_snr)
        render = validation_renderer(folder, code, unet, vae, text_encoders, tokenizers, *sampling)
    prediction_type = args.prediction_type or noise_scheduler.config.prediction_type
    loss_config = LossConfig(
        prediction_type=prediction_type,
        snr_gamma=args.snr_gamma,
        noise_offset=args.noise_offset,
        input_perturbation=args.input_perturbation,
        **recipe_fields(RecipeConfig.from_args(args), prediction_type, noise_scheduler.config.num_train_timesteps),
    )

    # ------------------------------------------------------------------------------------------------------- data
    rows, held_rows = held_out_rows(ValidationLossConfig.from_args(args), DatasetConfig.from_args(args), seed)
    train_dataset = ImageCaptionDataset(rows, tokenizers, args, seed, family)
    image_sizes = train_dataset.image_sizes = check_images(train_dataset)
    global_batch_size = args.train_batch_size * jax.device_count()
    if args.use_aspect_ratio_buckets:
        # Every bucket side is a multiple of it (check_model_sizes refused any other at the start).
        model_factor = size_factors(vae.config, unet.config)[1]
        train_dataset.bucket_of_row, train_dataset.buckets = setup_buckets(
            image_sizes, BucketConfig.from_args(args), model_factor, global_batch_size
        )
        epoch_global_batches = functools.partial(bucket_batches, train_dataset.bucket_of_row, global_batch_size, seed)
    else:
        epoch_global_batches = functools.partial(shuffled_batches, len(train_dataset), global_batch_size, seed)
    batches_per_epoch = len(epoch_global_batches(0))  # the same every epoch
    if batches_per_epoch < args.gradient_accumulation_steps:
        raise UserError(
            f"{len(train_dataset)} examples make {batches_per_epoch} global batches of {global_batch_size} "
            f"({args.train_batch_size} per device x {jax.device_count()} devices); "
            f"one update needs {args.gradient_accumulation_steps}"
        )
    frozen = jax.device_put(frozen, replicated)
    if args.cache_latents or args.cache_text_embeddings:
        build_caches(train_dataset, frozen, args, global_batch_size, batch_sharding)
    held_out = None
    if held_rows is not None:  # center crops, unflipped, each in the bucket it would train in (docs/evaluation.md)
        held_args = type(args)(**{**vars(args), "center_crop": True, "random_flip": False, "masked_loss": False})
        held_dataset = ImageCaptionDataset(held_rows, tokenizers, held_args, seed, family)
        models = (frozen, unet, vae.config, prediction_type, train_dataset.buckets, adapted_weights, check_images)
        held_out = HeldOutLoss(ValidationLossConfig.from_args(args), held_dataset, models, seed)

    # ---------------------------------------------------------------------------------- optimizer and schedule
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * global_batch_size
    # global_step counts optimizer updates; --max_train_steps is authoritative and epochs are derived from it.
    updates_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
    schedule = learning_rate_schedule(args.lr_scheduler, args.learning_rate, args.lr_warmup_steps, max_train_steps)
    optimizer = make_optimizer(args, schedule)
    if args.use_ema:
        # A float32 copy: bf16 cannot hold the small steps of a 0.9999 average.
        ema_params = jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32), unet_params)
        state = EMATrainState.create(apply_fn=unet.apply, params=unet_params, tx=optimizer, ema_params=ema_params)
    else:
        state = TrainState.create(apply_fn=unet.apply, params=unet_params, tx=optimizer)
    total_batch_size = global_batch_size * args.gradient_accumulation_steps
    # What this run trains, recorded in its checkpoints: a checkpoint resumes only a run of the same kind.
    run_identity = {"script": "train_text_to_image_flax.py", "lora": lora_identity(lora)}
    # The process count is not part of the batch layout here: every draw is made over the global batch from the step's
    # key, so a checkpoint resumes exactly on another process count with the same global batch (tested with 2 and 1).
    run_metadata = checkpoint_metadata(run_identity, seed, total_batch_size, updates_per_epoch, jax.process_count())
    run_metadata["use_ema"] = args.use_ema
    if lora is not None:
        size = tree_mib((state.params, state.opt_state, getattr(state, "ema_params", None)))  # what a checkpoint holds
        layers = sum(len(adapter_layers(adapter)) for adapter in state.params.values())
        logger.info(
            f"LoRA rank {lora.rank}, alpha {lora.alpha:g} on {layers} layers ({', '.join(state.params)}): "
            f"checkpoints hold the adapter and its optimizer state, {size:.2f} MiB, not the base model"
        )
    run_metadata["aspect_ratio_buckets"] = [list(bucket) for bucket in train_dataset.buckets or []] or None

    # ----------------------------------------------------------------------------------------------------- resume
    global_step = 0
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        check_resume_identity(resume_path, resume_metadata, run_identity)
        state = restore_train_state(state, resume_path, replicated)
        global_step = resume_metadata["global_step"]
        warn_if_batch_layout_changed(resume_metadata, run_metadata)
    state, frozen = jax.device_put((state, frozen), replicated)
    first_epoch = global_step // updates_per_epoch
    if is_main_process:
        output_lock = take_output_dir(args.output_dir, os.path.basename(__file__), disposable=[RUN_CONFIG])
        write_config(args.output_dir, args, seed=seed)
    logger.info("***** Running training *****")
    logger.info(
        f"  Examples = {len(train_dataset)}, epochs = {num_train_epochs}, updates per epoch = {updates_per_epoch}"
    )
    logger.info(
        f"  Batch per device = {args.train_batch_size}, devices = {jax.device_count()}, "
        f"accumulation = {args.gradient_accumulation_steps}, total batch = {total_batch_size}"
    )
    logger.info(f"  Optimizer updates = {max_train_steps}, starting at {global_step}, seed = {seed}")
    if global_step >= max_train_steps:
        logger.info(
            f"Checkpoint step {global_step} is at or past --max_train_steps {max_train_steps}: nothing to train."
        )

    # ------------------------------------------------------------------------------------------------- train loop
    step_fn = jax.jit(functools.partial(train_step, config=loss_config), donate_argnums=(0,))
    probe_fn = jax.jit(functools.partial(batch_loss, config=loss_config))  # the new params' loss, before writing them
    ema_fn = jax.jit(update_ema, donate_argnums=(0,))
    base_rng = jax.random.PRNGKey(seed % (2**31))
    progress_bar = tqdm(
        range(max_train_steps), initial=min(global_step, max_train_steps), desc="Steps", disable=not is_main_process
    )
    window = LogWindow(total_batch_size, global_step)
    last_batch = None  # (batch, rng) of the last step, to probe the params before writing them
    compiled_shapes = set()
    stop_request.stop_on_ctrl_c(True)  # from here on, an update is in progress for Ctrl-C to let finish
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        # Resume mid-epoch: skip exactly the batches the interrupted run had consumed.
        skip = (global_step - epoch * updates_per_epoch) * args.gradient_accumulation_steps
        global_batches = epoch_global_batches(epoch)
        batches = process_batches(train_dataset.__getitem__, epoch, global_batches, skip)
        for batch_index, batch in enumerate(batches, start=skip):
            if batch_index >= updates_per_epoch * args.gradient_accumulation_steps:
                break  # the last batches that cannot fill an accumulation group
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
            rng = jax.random.fold_in(jax.random.fold_in(base_rng, epoch), batch_index)
            batch_shape = (
                batch["pixel_values"].shape[2:] if "pixel_values" in batch else batch["latent_mean"].shape[1:3]
            )
            if batch_shape not in compiled_shapes:
                # XLA compiles one program per input shape: one per bucket in use, each once.
                compiled_shapes.add(batch_shape)
                what = "images" if "pixel_values" in batch else "latents"
                height, width = batch_shape
                logger.info(f"Compiling the train step for {height}x{width} {what} ({len(compiled_shapes)} so far)")
            state, metrics = step_fn(state, frozen, batch, rng)
            last_batch = (batch, rng)
            if (batch_index + 1) % args.gradient_accumulation_steps:
                continue

            global_step += 1
            if args.use_ema:
                state = ema_fn(state, global_step)
            window.add_update(metrics)
            progress_bar.update(1)
            if held_out is not None:  # the held-out loss, every --validation_loss_steps and at the end
                held_out.evaluate(global_step, max_train_steps, args.output_dir, state, args.optimizer)
            stopping = stop_agreed(stop_request)  # a SIGTERM / SIGUSR1 / Ctrl-C on any process
            is_checkpoint_step = global_step % args.checkpointing_steps == 0 or stopping
            # Reading the loss back waits for the device: only at logging steps, and before a checkpoint is written
            # (the read raises on a non-finite loss, so no checkpoint ever holds a diverged model).
            if global_step % args.logging_steps == 0 or is_checkpoint_step or global_step >= max_train_steps:
                logs = window.read(global_step, epoch, float(schedule(global_step - 1)))
                logger.info(format_logs(global_step, logs))
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            if is_checkpoint_step:
                probe = float(probe_fn(state.params, state, frozen, *last_batch))
                trained = {"params": state.params, "opt_state": state.opt_state}
                if args.use_ema:
                    trained["ema_params"] = state.ema_params
                check_finite(trained, probe, "the UNet" if lora is None else "the LoRA", global_step)
                save_checkpoint(state, args.output_dir, global_step, run_metadata, args.checkpoints_total_limit)
            if stopping:
                logger.warning(preemption_message(stop_request, global_step))
                sys.exit(stop_exit_code(stop_request))
            if global_step >= max_train_steps:
                break

        end_of_run = global_step >= max_train_steps
        if args.validation_prompts and (epoch + 1) % args.validation_epochs == 0 and not end_of_run:
            validate(render, state, frozen, tokenizers, args, seed, global_step, "validation", is_main_process)

    # ------------------------------------------------------------------------------------------------------- save
    stop_request.stop_on_ctrl_c(False)  # nothing left to finish: Ctrl-C interrupts the save as usual
    unet_params = state.ema_params if args.use_ema else evaluation_params(state, args.optimizer)
    if last_batch is not None:  # what is about to be saved, checked as every checkpoint is
        probe = float(probe_fn(unet_params, state, frozen, *last_batch))
        check_finite({"params": unet_params}, probe, "the UNet" if lora is None else "the LoRA", global_step)
    if is_main_process:
        try:
            if lora is not None:
                # The adapter alone, in diffusers' layout and in the UIs' (kohya) one, not the pipeline.
                save_lora(args.output_dir, adapter_state(unet_params), lora, family, unet.config.cross_attention_dim)
            else:
                saved_scheduler = (args.prediction_type, args.rescale_betas_zero_snr)
                save_pipeline(unet_params, folder, family, vae_folder, args.output_dir, *saved_scheduler)
                logger.info(f"Saved the pipeline to {os.path.abspath(args.output_dir)}")
            if args.save_single_file:
                save_single_file(SingleFileConfig.from_args(args), prediction_type, global_step)
        except Exception as err:  # a full disk, most often: the steps since the last checkpoint must not be lost
            raise final_save_failed(state, args.output_dir, global_step, run_metadata, err) from err
    grid = None
    if args.validation_prompts:
        grid = validate(render, state, frozen, tokenizers, args, seed, global_step, "final", is_main_process)
    if is_main_process:
        write_model_card(args.output_dir, model_card(family, args, global_step, grid))
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
        output_lock.release()


if __name__ == "__main__":
    run(functools.partial(main, ARGS), debug=ARGS.debug)

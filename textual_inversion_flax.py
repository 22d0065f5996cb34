#!/usr/bin/env python
"""Textual inversion: learn the text embedding of a new placeholder token from 3-5 images of a concept (JAX/Flax
twin of textual_inversion.py). Reads a standard PyTorch diffusers folder or hub id, trains data-parallel over every
local device, and writes learned_embeds.safetensors in exactly the PyTorch twin's format (diffusers'
`pipe.load_textual_inversion` and the common UIs load it).

One host (all its GPUs or TPU cores):
    python textual_inversion_flax.py \
      --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --train_data_dir=./cat_toy --learnable_property=object --placeholder_token="<cat-toy>" --initializer_token=toy \
      --resolution=512 --train_batch_size=1 --max_train_steps=3000 --learning_rate=5.0e-04 --scale_lr \
      --mixed_precision=bf16 --output_dir=textual_inversion_cat_flax

Multi-host TPU pod: run the same command on every host with --jax_distributed. Two CPU devices (what the tests do):
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python textual_inversion_flax.py <flags>
Several processes named by hand (GPU nodes, or two CPU processes as a test does), process 0 on HOST0:
    python textual_inversion_flax.py <flags> --coordinator_address=HOST0:1234 --num_processes=2 --process_id=0
    python textual_inversion_flax.py <flags> --coordinator_address=HOST0:1234 --num_processes=2 --process_id=1
SDXL (found from the pipeline folder): the placeholder gets rows in both text encoders, saved as
learned_embeds.safetensors and learned_embeds_2.safetensors (diffusers) and <name>.safetensors with clip_l / clip_g:
    python textual_inversion_flax.py \
      --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \
      --train_data_dir=./cat_toy --placeholder_token="<cat-toy>" --initializer_token=toy --resolution=1024 \
      --train_batch_size=1 --max_train_steps=1000 --learning_rate=5.0e-04 --mixed_precision=bf16 \
      --output_dir=textual_inversion_cat_sdxl_flax
The output_dir must be on a file system all hosts share: each writes and reads its part of every checkpoint.
After a crash or preemption, relaunch the same command with --resume_from_checkpoint=latest.
This file keeps the recipe you edit; the machinery it shares with the other scripts (run folder, checkpoints,
batching, image checks, single-file export) is the sdtrain/ package beside it: copy both together.
"""

import copy
import dataclasses
import functools
import logging
import math
import os
import sys
from typing import Any

from sdtrain.batching import parse_size, sdxl_time_ids, shuffled_batches
from sdtrain.checks import training_problem, validation_problem
from sdtrain.cli import ArgumentParser, UserError, WriteFailure, add_debug_argument, run
from sdtrain.config_file import RUN_CONFIG, add_config_argument, parse_with_config, write_config
from sdtrain.distributed import DistributedConfig, add_distributed_arguments, distributed_problem
from sdtrain.embeddings import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    add_embedding_format_argument,
    add_placeholder_tokens,
    add_token_arguments,
    check_embedding_scale,
    embedding_files,
    find_example_images,
    initializer_token_id,
    learned_embeds_name,
)
from sdtrain.families import folder_family
from sdtrain.hub import add_hub_arguments, hub_problem, push_to_hub
from sdtrain.images import load_rgb
from sdtrain.logs import format_logs
from sdtrain.masks import ExampleMasks, MaskConfig, add_mask_arguments, mask_problem, square_crop_and_flip
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
    flush_file,
    fsync_folder,
    read_checkpoint_metadata,
    take_output_dir,
    warn_if_batch_layout_changed,
    write_failure,
)
from sdtrain.seeds import add_seed_argument, choose_seed, draw_seed
from sdtrain.sizes import check_model_sizes

LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine"]
OPTIMIZERS = ["adamw", "adafactor", "lion", "prodigy", "schedule_free_adamw"]


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Learn the text embedding of a new token from a few images (textual inversion, JAX/Flax)."
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
        "--revision", type=str, default=None, help="Hub revision (branch, tag or commit) of the pretrained pipeline."
    )
    group.add_argument("--variant", type=str, default=None, help="Weight file variant to load, e.g. 'fp16'.")
    group.add_argument(
        "--tokenizer_name",
        type=str,
        default=None,
        help="Tokenizer to use instead of the pipeline's own (SDXL: its first).",
    )
    group.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Training target; default: the scheduler config's prediction_type.",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models are cached.")
    group = parser.add_argument_group("Token")
    add_token_arguments(group)
    group = parser.add_argument_group("Data")
    group.add_argument("--train_data_dir", type=str, required=True, help="Folder with the 3-5 example images.")
    group.add_argument("--repeats", type=int, default=100, help="Times each image is repeated in one epoch.")
    group.add_argument("--resolution", type=int, default=512, help="Training images are resized to this square size.")
    group.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop the central square before resizing (otherwise the whole image is squeezed).",
    )
    add_mask_arguments(group, dataset_column=False)
    group = parser.add_argument_group("Training")
    add_seed_argument(group)
    group.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    group.add_argument(
        "--num_train_epochs", type=int, default=100, help="Epochs to train; ignored when --max_train_steps is given."
    )
    group.add_argument(
        "--max_train_steps", type=int, default=5000, help="Total optimizer updates; overrides --num_train_epochs."
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
    add_optimizer_arguments(parser.add_argument_group("Optimizer"))
    group.add_argument(
        "--max_grad_norm",
        type=float,
        default=0.0,
        help="Clip gradients to this global norm (0, the default, turns clipping off).",
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "bf16"],
        help="bf16 computes in bfloat16 with fp32 master weights.",
    )
    add_distributed_arguments(group)
    group = parser.add_argument_group("Checkpointing and saving")
    group.add_argument(
        "--output_dir", type=str, default="text-inversion-model", help="Where the embeddings and checkpoints go."
    )
    group.add_argument(
        "--save_steps",
        type=int,
        default=500,
        help="Also save learned_embeds(_2 for SDXL)-steps-N every this many optimizer updates.",
    )
    add_embedding_format_argument(group)
    add_checkpoint_arguments(group)
    group = parser.add_argument_group("Logging")
    add_debug_argument(group)
    group.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Log loss, lr, grad norm, images/s and peak GPU memory averaged over this many updates.",
    )
    group.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        help="Prompt (with the placeholder) rendered every --validation_steps and at the end.",
    )
    group.add_argument(
        "--num_validation_images",
        type=int,
        default=4,
        help="Images rendered for the validation prompt, each from its own fixed seed.",
    )
    group.add_argument(
        "--validation_resolution",
        type=str,
        default=None,
        help="Size of the validation images, 'height,width'; default: --resolution square.",
    )
    group.add_argument(
        "--validation_steps",
        type=int,
        default=100,
        help="Render the validation prompt every this many optimizer updates.",
    )
    add_hub_arguments(group, "Upload the embeddings to the Hugging Face Hub.")
    args = parse_with_config(parser, argv)

    positive = "num_vectors repeats resolution train_batch_size max_train_steps gradient_accumulation_steps save_steps"
    for name in (positive + " checkpointing_steps validation_steps num_validation_images logging_steps").split():
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    if not args.placeholder_token.strip() or any(c.isspace() for c in args.placeholder_token):
        parser.error(f"--placeholder_token {args.placeholder_token!r} must be one word without spaces")
    problem = validation_problem("--validation_prompt", args.validation_prompt, args.validation_resolution)
    problem = problem or mask_problem(MaskConfig.from_args(args))
    if problem:
        parser.error(problem)
    try:
        args.validation_resolution = parse_size(args.validation_resolution, args.resolution)
    except ValueError as err:
        parser.error(str(err))
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
    ):
        if problem:
            parser.error(problem)
    problem = distributed_problem(DistributedConfig.from_args(args))
    if problem:
        parser.error(problem)
    return args


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
import safetensors.numpy
from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
from flax import struct
from flax.training.train_state import TrainState
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from sdtrain.jax.checkpoints import check_finite, final_save_failed, restore_train_state, save_checkpoint
from sdtrain.jax.data import process_batches
from sdtrain.jax.family import family_code
from sdtrain.jax.loop import LogWindow, evaluation_params, start_distributed, stop_agreed
from sdtrain.jax.models import (
    enable_block_rematerialisation,
    load_flax_model,
    load_noise_scheduler,
    resolve_pipeline_folder,
)
from sdtrain.jax.validation import render_validation_images, save_validation_grid, validation_renderer
from sdtrain.model_cards import textual_inversion_card, write_model_card

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# The recipe's parts: dataset, models, loss, optimizer, validation and saving (the machinery is in sdtrain/)
# ----------------------------------------------------------------------------------------------------------------------


def add_learned_embedding(text_encoder, tokenizer, placeholder_token, initializer_token, num_vectors):
    """Add the placeholder's tokens to the tokenizer; the new rows all start at the initializer token's embedding.
    Returns the new tokens, their ids, the rows, and a text encoder module that expects the extended table (Flax
    checks parameter shapes; the frozen params stay apart, see with_learned_rows)."""
    init_id = initializer_token_id(tokenizer, initializer_token)
    placeholder_tokens, placeholder_ids = add_placeholder_tokens(tokenizer, placeholder_token, num_vectors)
    table = text_encoder.params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    if placeholder_ids != list(range(table.shape[0], table.shape[0] + num_vectors)):
        raise ValueError(
            f"the tokenizer ({len(tokenizer) - num_vectors} tokens) does not match "
            f"the text encoder's vocabulary ({table.shape[0]})"
        )
    learned = jnp.tile(table[init_id][None], (num_vectors, 1)).astype(jnp.float32)
    extended_config = copy.deepcopy(text_encoder.config)
    extended_config.vocab_size = len(tokenizer)
    extended_text_encoder = type(text_encoder)(extended_config, dtype=jnp.float32, _do_init=False)
    return placeholder_tokens, placeholder_ids, learned, extended_text_encoder


def with_learned_rows(text_encoder_params, learned):
    """The text encoder's params with the new rows appended to its token embedding table."""
    embeddings = text_encoder_params["text_model"]["embeddings"]
    old_table = embeddings["token_embedding"]["embedding"]
    table = jnp.concatenate([old_table, learned.astype(old_table.dtype)])
    text_model = {
        **text_encoder_params["text_model"],
        "embeddings": {**embeddings, "token_embedding": {"embedding": table}},
    }
    return {**text_encoder_params, "text_model": text_model}


def learned_key(encoder_index):
    """Where the train state keeps the new rows of text encoder `encoder_index`: params["learned"], then (SDXL's second
    encoder) params["learned_2"]."""
    return "learned" + (f"_{encoder_index + 1}" if encoder_index else "")


class TextualInversionDataset:
    """The example images repeated --repeats times, each with a prompt from the templates holding the placeholder, as
    numpy arrays. Indexed by (epoch, index) keys: the template and the flip are drawn from an RNG seeded by
    (seed, epoch, index), so the same sample is identical in a resumed run. `tokenizers`: one per text encoder (two
    for SDXL); input_ids holds a row of ids for each, and for a family with added conditioning (SDXL) each example
    has its size conditioning, time_ids."""

    def __init__(self, image_paths, tokenizers, placeholder_text, args, seed, family):
        self.image_paths, self.tokenizers, self.placeholder_text = image_paths, tokenizers, placeholder_text
        self.args, self.seed, self.family = args, seed, family
        self.templates = STYLE_TEMPLATES if args.learnable_property == "style" else OBJECT_TEMPLATES
        self.masks = ExampleMasks(MaskConfig.from_args(args), image_paths, args.resolution, args.center_crop)

    def __len__(self):
        return len(self.image_paths) * self.args.repeats

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        path = self.image_paths[index % len(self.image_paths)]
        image = load_rgb(path, path)
        original_size = image.size
        flipped = rng.random() < 0.5  # the crop draws nothing: the same draws as ever
        image = square_crop_and_flip(image, self.args.resolution, self.args.center_crop, flipped)  # as self.masks does
        prompt = self.templates[int(rng.integers(len(self.templates)))].format(self.placeholder_text)
        input_ids = [
            tokenizer(prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True).input_ids
            for tokenizer in self.tokenizers
        ]
        pixel_values = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # the VAE's input range
        example = {"pixel_values": pixel_values, "input_ids": np.asarray(input_ids, dtype=np.int32)}
        if self.family.added_conditioning:
            time_ids = sdxl_time_ids(*original_size, self.args.resolution, self.args.center_crop, flipped)
            example["time_ids"] = np.asarray(time_ids, dtype=np.float32)
        if self.masks:
            example["mask"] = self.masks(index % len(self.image_paths), flipped)
        return example


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
    as constants baked into the compiled program); the modules and the noise scheduler are static."""

    unet_params: Any
    vae_params: Any
    text_encoder_params: tuple  # one per text encoder (two for SDXL), without the new rows
    scheduler_state: Any
    unet: Any = struct.field(pytree_node=False)
    vae: Any = struct.field(pytree_node=False)
    text_encoders: tuple = struct.field(pytree_node=False)  # the modules, expecting the extended tables
    noise_scheduler: Any = struct.field(pytree_node=False)
    code: Any = struct.field(pytree_node=False)  # the family's (sdtrain.jax.family): encode_text, added conditioning


def encode_batch(frozen, batch, params, rng):
    """The batch's latents in the frozen UNet's dtype, from the frozen VAE (the sample is drawn from `rng`), and its
    text conditioning (encoder_hidden_states, and for SDXL added_cond_kwargs: the second encoder's pooled embedding
    and the size conditioning), computed with the new embedding rows in `params`."""
    # The frozen VAE maps images to latents; the scaling factor brings them to roughly unit variance.
    vae_variables = {"params": frozen.vae_params}
    encoded = frozen.vae.apply(vae_variables, batch["pixel_values"], deterministic=True, method=frozen.vae.encode)
    latents = jnp.transpose(encoded.latent_dist.sample(rng), (0, 3, 1, 2)) * frozen.vae.config.scaling_factor
    latents = latents.astype(frozen.unet.dtype)  # an fp32 VAE (SDXL's: see main) beside a bf16 UNet
    # The text encoders run with gradients: they reach the new token embedding rows and nothing else.
    text_encoder_params = [
        with_learned_rows(encoder_params, params[learned_key(index)])
        for index, encoder_params in enumerate(frozen.text_encoder_params)
    ]
    encoder_hidden_states, pooled_text_embeds = frozen.code.encode_text(
        frozen.text_encoders, text_encoder_params, batch["input_ids"]
    )
    added_cond_kwargs = frozen.code.added_conditioning(pooled_text_embeds, batch.get("time_ids"))
    return jax.lax.stop_gradient(latents), encoder_hidden_states, added_cond_kwargs


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
    """The loss the new rows in `params` give on one batch: encode, then the denoising loss. Pure: every draw comes
    from `rng`."""
    sample_rng, loss_rng = jax.random.split(rng)
    latents, encoder_hidden_states, added_cond_kwargs = encode_batch(frozen, batch, params, sample_rng)
    unet = functools.partial(apply_unet, frozen.unet, frozen.unet_params)
    scheduler, scheduler_state, weights = frozen.noise_scheduler, frozen.scheduler_state, batch["sample_weights"]
    inputs = (latents, encoder_hidden_states, loss_rng, config, weights, added_cond_kwargs, batch.get("mask"))
    return diffusion_loss(unet, scheduler, scheduler_state, *inputs)


def apply_unet(unet, unet_params, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
    """The frozen UNet's prediction, in the call diffusion_loss makes (added_cond_kwargs: SDXL's extra conditioning)."""
    variables = {"params": unet_params}
    return unet.apply(
        variables, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, train=True
    ).sample


def train_step(state, frozen, batch, rng, config):
    """One batch: its loss and gradients, then an optimizer step (accumulated by optax.MultiSteps)."""
    loss, grads = jax.value_and_grad(batch_loss)(state.params, state, frozen, batch, rng, config)
    return state.apply_gradients(grads=grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def validate(render, state, frozen, tokenizers, prompts, args, seed, global_step, tag, is_main_process):
    """Render the validation prompts with the embedding learned so far, through the frozen pipeline. Every process
    renders; the main process saves, and gets the grid's path (relative to --output_dir)."""
    params = evaluation_params(state, args.optimizer)
    text_encoder_params = [
        with_learned_rows(encoder_params, params[learned_key(index)])
        for index, encoder_params in enumerate(frozen.text_encoder_params)
    ]
    params = {"unet": frozen.unet_params, "vae": frozen.vae_params, "text_encoders": text_encoder_params}
    images = render_validation_images(render, params, tokenizers, prompts, seed)
    if is_main_process:
        return save_validation_grid(images, prompts, args.output_dir, tag, global_step)
    return None


def save_embeddings(tensors, path):
    """{key: rows[num_vectors, hidden]}, keys as embedding_files() names them (the placeholder for diffusers, the UIs'
    keys), the same as the PyTorch twin writes. Written to a temporary name, flushed to disk and renamed, so a crash
    never leaves a truncated file."""
    partial = path + ".partial"
    try:
        rows = {key: np.asarray(jax.device_get(learned), dtype=np.float32) for key, learned in tensors.items()}
        safetensors.numpy.save_file(rows, partial, metadata={"format": "pt"})
        flush_file(partial)
    except OSError as err:
        if os.path.exists(partial):
            os.remove(partial)
        raise WriteFailure(write_failure(os.path.basename(path), os.path.dirname(path), err)) from err
    os.replace(partial, path)
    fsync_folder(os.path.dirname(path))


def model_card(family, args, global_step, validation_grid):
    """The README.md lines textual_inversion.py writes for the same run."""
    paths = [f"{args.output_dir}/{learned_embeds_name(index)}.safetensors" for index in range(family.num_text_encoders)]
    prompt = args.validation_prompt or "a photo of a " + args.placeholder_token
    token = (args.placeholder_token, args.num_vectors)
    base_model, data = args.pretrained_model_name_or_path, args.train_data_dir
    return textual_inversion_card(family, base_model, *token, data, global_step, paths, prompt, validation_grid)


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
    image_paths = find_example_images(args.train_data_dir)
    ExampleMasks(MaskConfig.from_args(args), image_paths, args.resolution, args.center_crop).check()  # --masked_loss
    check_process_group(jax.process_count(), os.environ, "jax")
    # Only the main process writes (but for each process's share of a checkpoint's arrays), and only into a folder
    # that is absent, empty or a run's, never the model's own. It takes the folder (and its lock) just before
    # training, so that a run refused before then writes nothing.
    if is_main_process:
        check_output_dir(args.output_dir, {"--pretrained_model_name_or_path": args.pretrained_model_name_or_path})
    output_lock = None
    stop_request = StopRequest()
    resume_path = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    resume_metadata = read_checkpoint_metadata(resume_path)
    # Process 0's draw on every process when there is no --seed, so that all shuffle and draw alike.
    seed = choose_seed(args.seed, resume_metadata, int(multihost_utils.broadcast_one_to_all(np.uint32(draw_seed()))))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    # ------------------------------------------------------------------------------------------------ load models
    weight_dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    folder = resolve_pipeline_folder(args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir)
    source = f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}"
    # SDXL: two text encoders, each with its own tokenizer and its own copy of the placeholder's rows.
    family = folder_family(folder, source)  # any family but SD 1.x / 2.x and SDXL is named and refused
    code = family_code(family)
    # A size the model cannot train or render at is refused now, from the configs, not at the first validation.
    check_model_sizes(folder, None, None, None, args.resolution, args.validation_resolution, whole_model=True)
    tokenizers = code.load_tokenizers(folder, args.tokenizer_name, args.cache_dir)
    # The text encoders compute in fp32: gradients flow through them to the new rows.
    text_encoders = code.load_text_encoders(folder, args.variant, jnp.float32)
    # SDXL's VAE overflows in reduced precision and says so (force_upcast): it stays in fp32.
    vae_dtype = code.vae_dtype(FlaxAutoencoderKL.load_config(folder, subfolder="vae"), weight_dtype)
    vae, vae_params = load_flax_model(FlaxAutoencoderKL, folder, "vae", args.variant, vae_dtype)
    logger.info(
        f"VAE in {jnp.dtype(vae_dtype)}"
        + (" (its config asks for it: force_upcast)" if vae_dtype != weight_dtype else "")
    )
    if args.gradient_checkpointing:
        enable_block_rematerialisation()
    unet, unet_params = load_flax_model(FlaxUNet2DConditionModel, folder, "unet", args.variant, weight_dtype)
    # Lin et al. 2023 (arXiv:2305.08891): rescaled betas reach zero SNR at the last timestep, as sampling starts.
    noise_scheduler, scheduler_state = load_noise_scheduler(folder, args.rescale_betas_zero_snr)
    # Everything is frozen; the only trainable tensors are the new rows (one set per text encoder), each starting at
    # the initializer's embedding in that encoder.
    token = (args.placeholder_token, args.initializer_token, args.num_vectors)
    learned, extended_text_encoders = {}, []
    for index, (text_encoder, tokenizer) in enumerate(zip(text_encoders, tokenizers, strict=True)):
        placeholder_tokens, placeholder_ids, learned[learned_key(index)], extended_text_encoder = add_learned_embedding(
            text_encoder, tokenizer, *token
        )
        extended_text_encoders.append(extended_text_encoder)
    # The scale of each vocabulary, which no learned row that works comes near (check_embedding_scale).
    vocabulary_norms = [
        float(
            jnp.linalg.norm(encoder.params["text_model"]["embeddings"]["token_embedding"]["embedding"], axis=-1).max()
        )
        for encoder in text_encoders
    ]
    frozen = FrozenModels(
        unet_params=unet_params,
        vae_params=vae_params,
        text_encoder_params=tuple(text_encoder.params for text_encoder in text_encoders),
        scheduler_state=scheduler_state,
        unet=unet,
        vae=vae,
        text_encoders=tuple(extended_text_encoders),
        noise_scheduler=noise_scheduler,
        code=code,
    )
    validation_prompts = [args.validation_prompt] * args.num_validation_images if args.validation_prompt else []
    render = None
    if validation_prompts:
        sampling = (args.validation_resolution, args.prediction_type, args.rescale_betas_zero_snr)
        render = validation_renderer(folder, code, unet, vae, extended_text_encoders, tokenizers, *sampling)
    prediction_type = args.prediction_type or noise_scheduler.config.prediction_type
    loss_config = LossConfig(
        prediction_type=prediction_type,
        snr_gamma=args.snr_gamma,
        **recipe_fields(RecipeConfig.from_args(args), prediction_type, noise_scheduler.config.num_train_timesteps),
    )

    # ------------------------------------------------------------------------------------------------------- data
    train_dataset = TextualInversionDataset(image_paths, tokenizers, " ".join(placeholder_tokens), args, seed, family)
    global_batch_size = args.train_batch_size * jax.device_count()
    epoch_global_batches = functools.partial(shuffled_batches, len(train_dataset), global_batch_size, seed)
    batches_per_epoch = len(epoch_global_batches(0))  # the same every epoch
    if batches_per_epoch < args.gradient_accumulation_steps:
        raise UserError(
            f"{len(train_dataset)} examples make {batches_per_epoch} global batches of {global_batch_size} "
            f"({args.train_batch_size} per device x {jax.device_count()} devices); "
            f"one update needs {args.gradient_accumulation_steps}"
        )

    # ---------------------------------------------------------------------------------- optimizer and schedule
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * global_batch_size
    # global_step counts optimizer updates; --max_train_steps is authoritative and epochs are derived from it.
    updates_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    max_train_steps = args.max_train_steps
    num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
    schedule = learning_rate_schedule(args.lr_scheduler, args.learning_rate, args.lr_warmup_steps, max_train_steps)
    state = TrainState.create(apply_fn=None, params=learned, tx=make_optimizer(args, schedule))
    total_batch_size = global_batch_size * args.gradient_accumulation_steps
    # What this run trains, recorded in its checkpoints: a checkpoint resumes only a run of the same kind.
    run_identity = {
        "script": "textual_inversion_flax.py",
        "placeholder_token": args.placeholder_token,
        "num_vectors": args.num_vectors,
    }
    run_metadata = checkpoint_metadata(run_identity, seed, total_batch_size, updates_per_epoch, jax.process_count())

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
        f"  Images = {len(image_paths)} x {args.repeats} repeats, epochs = {num_train_epochs}, "
        f"updates per epoch = {updates_per_epoch}"
    )
    logger.info(
        f"  Batch per device = {args.train_batch_size}, devices = {jax.device_count()}, "
        f"accumulation = {args.gradient_accumulation_steps}, total batch = {total_batch_size}"
    )
    logger.info(f"  Optimizer updates = {max_train_steps}, starting at {global_step}, seed = {seed}")
    logger.info(
        f"  Placeholder {args.placeholder_token} -> {placeholder_tokens} (ids {placeholder_ids}), "
        f"initialised from {args.initializer_token!r}"
    )
    if global_step >= max_train_steps:
        logger.info(
            f"Checkpoint step {global_step} is at or past --max_train_steps {max_train_steps}: nothing to train."
        )

    # ------------------------------------------------------------------------------------------------- train loop
    step_fn = jax.jit(functools.partial(train_step, config=loss_config), donate_argnums=(0,))
    probe_fn = jax.jit(functools.partial(batch_loss, config=loss_config))  # the new rows' loss, before writing them
    base_rng = jax.random.PRNGKey(seed % (2**31))
    progress_bar = tqdm(
        range(max_train_steps), initial=min(global_step, max_train_steps), desc="Steps", disable=not is_main_process
    )
    window = LogWindow(total_batch_size, global_step)
    last_batch = None  # (batch, rng) of the last step, to probe the new rows before writing them
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
            state, metrics = step_fn(state, frozen, batch, rng)
            last_batch = (batch, rng)
            if (batch_index + 1) % args.gradient_accumulation_steps:
                continue

            global_step += 1
            window.add_update(metrics)
            progress_bar.update(1)
            stopping = stop_agreed(stop_request)  # a SIGTERM / SIGUSR1 / Ctrl-C on any process
            is_checkpoint_step = global_step % args.checkpointing_steps == 0 or stopping
            is_save_step = global_step % args.save_steps == 0 or is_checkpoint_step
            # Reading the loss back waits for the device: only at logging steps, and before anything is saved (the
            # read raises on a non-finite loss, so no saved embedding or checkpoint ever holds a diverged one).
            if global_step % args.logging_steps == 0 or is_save_step or global_step >= max_train_steps:
                logs = window.read(global_step, epoch, float(schedule(global_step - 1)))
                logger.info(format_logs(global_step, logs))
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            if is_save_step:
                rows = [jax.device_get(state.params[learned_key(index)]) for index in range(len(text_encoders))]
                check_embedding_scale(rows, vocabulary_norms, global_step)
                probe = float(probe_fn(state.params, state, frozen, *last_batch))
                check_finite(
                    {"params": state.params, "opt_state": state.opt_state}, probe, "the embedding", global_step
                )
            if is_main_process and global_step % args.save_steps == 0:
                params = evaluation_params(state, args.optimizer)
                for index in range(len(text_encoders)):
                    name = f"{learned_embeds_name(index)}-steps-{global_step}.safetensors"
                    save_embeddings(
                        {args.placeholder_token: params[learned_key(index)]}, os.path.join(args.output_dir, name)
                    )
            if is_checkpoint_step:
                save_checkpoint(state, args.output_dir, global_step, run_metadata, args.checkpoints_total_limit)
            if validation_prompts and global_step % args.validation_steps == 0 and global_step < max_train_steps:
                validate(
                    render,
                    state,
                    frozen,
                    tokenizers,
                    validation_prompts,
                    args,
                    seed,
                    global_step,
                    "validation",
                    is_main_process,
                )
            if stopping:
                logger.warning(preemption_message(stop_request, global_step))
                sys.exit(stop_exit_code(stop_request))
            if global_step >= max_train_steps:
                break

    # ------------------------------------------------------------------------------------------------------- save
    stop_request.stop_on_ctrl_c(False)  # nothing left to finish: Ctrl-C interrupts the save as usual
    params = evaluation_params(state, args.optimizer)
    if last_batch is not None:  # what is about to be saved, checked as every checkpoint is
        rows = [jax.device_get(params[learned_key(index)]) for index in range(len(text_encoders))]
        check_embedding_scale(rows, vocabulary_norms, global_step)
        probe = float(probe_fn(params, state, frozen, *last_batch))
        check_finite({"params": params}, probe, "the embedding", global_step)
    if is_main_process:
        try:
            for path, keys in embedding_files(
                args.output_dir, args.placeholder_token, args.embedding_format, "safetensors", len(text_encoders)
            ):
                save_embeddings({key: params[learned_key(index)] for key, index in keys.items()}, path)
                logger.info(f"Saved {os.path.abspath(path)}")
        except Exception as err:  # a full disk, most often: the steps since the last checkpoint must not be lost
            raise final_save_failed(state, args.output_dir, global_step, run_metadata, err) from err
    grid = None
    if validation_prompts:
        grid = validate(
            render, state, frozen, tokenizers, validation_prompts, args, seed, global_step, "final", is_main_process
        )
    if is_main_process:
        write_model_card(args.output_dir, model_card(family, args, global_step, grid))
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
        output_lock.release()


if __name__ == "__main__":
    run(functools.partial(main, ARGS), debug=ARGS.debug)

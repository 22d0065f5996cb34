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
The output_dir must be on a file system all hosts share: each writes and reads its part of every checkpoint.
After a crash or preemption, relaunch the same command with --resume_from_checkpoint=latest.
"""

import argparse
import concurrent.futures
import copy
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from flax.training.train_state import TrainState
from jax.experimental import multihost_utils
from PIL import Image, ImageOps
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# The second key of every validation seed, derive_seed(seed, VALIDATION_SEED_KEY, prompt index): training draws use
# four keys, so a validation image never shares its noise with a training step.
VALIDATION_SEED_KEY = 7919
# Seed, step and batch layout of a checkpoint, written last into it: its presence marks the checkpoint complete.
CHECKPOINT_METADATA = "checkpoint_metadata.json"
LOCK_FILE = ".training.lock"  # held (an OS lock) by the run writing into output_dir; a killed run holds none
TRAIN_STATE = "train_state"  # inside checkpoint-N: the Orbax checkpoint of the step, params and optimizer state
PIPELINE_LINK = ".pipeline"  # -> the current .pipeline-<n> folder; output_dir's components link through it
PIPELINE_VERSION = re.compile(r"^\.pipeline-(\d+)$")
PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after writing a checkpoint; relaunch to continue
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine"]
OPTIMIZERS = ["adamw", "adafactor", "lion", "prodigy", "schedule_free_adamw"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# Prompts the placeholder is trained in; {} is replaced by the placeholder (all of its vectors). # EDIT: to taste.
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a picture of a {}",
    "a close-up photo of a {}",
    "a photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a cropped photo of a {}",
    "a rendering of a {}",
    "a good photo of the {}",
    "a photo of my {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a photo of one {}",
    "an image of the {}",
    "a snapshot of a {}",
    "a detailed photo of the {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a picture in the style of {}",
    "a rendering in the style of {}",
    "an artwork in the style of {}",
    "a drawing in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a dark painting in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "an illustration in the style of {}",
    "a sketch in the style of {}",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Learn the text embedding of a new token from a few images (textual inversion, JAX/Flax)."
    )
    # Model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a PyTorch diffusers Stable Diffusion pipeline.",
    )
    parser.add_argument(
        "--revision", type=str, default=None, help="Hub revision (branch, tag or commit) of the pretrained pipeline."
    )
    parser.add_argument("--variant", type=str, default=None, help="Weight file variant to load, e.g. 'fp16'.")
    parser.add_argument(
        "--tokenizer_name", type=str, default=None, help="Tokenizer to use instead of the pipeline's own."
    )
    parser.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Training target; default: the scheduler config's prediction_type.",
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models are cached.")
    # Token
    parser.add_argument(
        "--placeholder_token",
        type=str,
        required=True,
        help="The new token that stands for the concept in prompts, e.g. '<cat-toy>'.",
    )
    parser.add_argument(
        "--initializer_token",
        type=str,
        required=True,
        help="An existing single-token word whose embedding starts every new vector, e.g. 'toy'.",
    )
    parser.add_argument(
        "--num_vectors",
        type=int,
        default=1,
        help="Embedding vectors the placeholder expands to (more capture more detail).",
    )
    parser.add_argument(
        "--learnable_property",
        type=str,
        default="object",
        choices=["object", "style"],
        help="Train prompts that describe an object or a style.",
    )
    # Data
    parser.add_argument("--train_data_dir", type=str, required=True, help="Folder with the 3-5 example images.")
    parser.add_argument("--repeats", type=int, default=100, help="Times each image is repeated in one epoch.")
    parser.add_argument("--resolution", type=int, default=512, help="Training images are resized to this square size.")
    parser.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop the central square before resizing (otherwise the whole image is squeezed).",
    )
    # Training
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed for data order, augmentation and noise; a resumed run reuses its checkpoint's seed.",
    )
    parser.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    parser.add_argument(
        "--num_train_epochs", type=int, default=100, help="Epochs to train; ignored when --max_train_steps is given."
    )
    parser.add_argument(
        "--max_train_steps", type=int, default=5000, help="Total optimizer updates; overrides --num_train_epochs."
    )
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated into one optimizer update."
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Rematerialise each UNet block in the backward pass to save memory.",
    )
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate (after warmup).")
    parser.add_argument(
        "--scale_lr", action="store_true", help="Multiply the learning rate by accumulation steps x global batch size."
    )
    parser.add_argument(
        "--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule."
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup optimizer updates of the schedule.")
    parser.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR weighting gamma (5.0 is recommended); off when not given.",
    )
    add_recipe_arguments(parser)
    add_optimizer_arguments(parser)
    parser.add_argument(
        "--max_grad_norm",
        type=float,
        default=0.0,
        help="Clip gradients to this global norm (0, the default, turns clipping off).",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "bf16"],
        help="bf16 computes in bfloat16 with fp32 master weights.",
    )
    parser.add_argument(
        "--jax_distributed",
        action="store_true",
        help="Call jax.distributed.initialize() first (multi-host TPU pods and clusters).",
    )
    parser.add_argument(
        "--coordinator_address",
        type=str,
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="host:port where process 0 coordinates a multi-process run (implies --jax_distributed).",
    )
    parser.add_argument(
        "--num_processes",
        type=int,
        default=int(os.environ["JAX_NUM_PROCESSES"]) if os.environ.get("JAX_NUM_PROCESSES") else None,
        help="With --coordinator_address: the run's processes, all hosts together (default $JAX_NUM_PROCESSES).",
    )
    parser.add_argument(
        "--process_id",
        type=int,
        default=int(os.environ["JAX_PROCESS_ID"]) if os.environ.get("JAX_PROCESS_ID") else None,
        help="With --coordinator_address: this process's index, 0 to --num_processes - 1 (default $JAX_PROCESS_ID).",
    )
    parser.add_argument(
        "--heartbeat_timeout_seconds",
        type=int,
        default=100,
        help="With several processes: seconds without a heartbeat before a process counts as dead and the rest stop.",
    )
    # Checkpointing and saving
    parser.add_argument(
        "--output_dir", type=str, default="text-inversion-model", help="Where the embeddings and checkpoints go."
    )
    parser.add_argument(
        "--save_steps",
        type=int,
        default=500,
        help="Also save learned_embeds-steps-N every this many optimizer updates.",
    )
    parser.add_argument(
        "--embedding_format",
        type=str,
        default="both",
        choices=["diffusers", "ui", "both"],
        help="Final embeddings: learned_embeds (diffusers), <placeholder> (A1111/Forge, ComfyUI, InvokeAI), or both.",
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save the full training state every this many optimizer updates.",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints (the oldest are deleted after a new one is complete).",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Checkpoint folder or name to resume from, or 'latest' (starts fresh if none exists).",
    )
    # Logging
    parser.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Log loss, lr, grad norm, images/s and peak GPU memory averaged over this many updates.",
    )
    parser.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        help="Prompt (with the placeholder) rendered every --validation_steps and at the end.",
    )
    parser.add_argument(
        "--num_validation_images",
        type=int,
        default=4,
        help="Images rendered for the validation prompt, each from its own fixed seed.",
    )
    parser.add_argument(
        "--validation_resolution",
        type=str,
        default=None,
        help="Size of the validation images, 'height,width'; default: --resolution square.",
    )
    parser.add_argument(
        "--validation_steps",
        type=int,
        default=100,
        help="Render the validation prompt every this many optimizer updates.",
    )
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the embeddings to the Hugging Face Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `hf auth login`).")
    parser.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository to push to; default: the output folder's name."
    )
    args = parser.parse_args(argv)

    positive = "num_vectors repeats resolution train_batch_size max_train_steps gradient_accumulation_steps save_steps"
    for name in (positive + " checkpointing_steps validation_steps num_validation_images logging_steps").split():
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    if not args.placeholder_token.strip() or any(c.isspace() for c in args.placeholder_token):
        parser.error(f"--placeholder_token {args.placeholder_token!r} must be one word without spaces")
    try:
        args.validation_resolution = parse_size(args.validation_resolution, args.resolution)
    except ValueError as err:
        parser.error(str(err))
    check_recipe_arguments(parser, args)
    check_optimizer_arguments(parser, args)
    if args.coordinator_address is not None:
        if args.num_processes is None or args.process_id is None:
            parser.error(
                "--coordinator_address needs --num_processes and --process_id (or JAX_NUM_PROCESSES/_PROCESS_ID)"
            )
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            parser.error(f"--process_id must be in [0, {args.num_processes}), got {args.process_id}")
    return args


def add_recipe_arguments(parser):
    """The loss and timestep-sampling recipes, the same flags in all four scripts (see the README's recipes table)."""
    parser.add_argument(
        "--rescale_betas_zero_snr",
        action="store_true",
        help="Rescale the noise schedule to zero terminal SNR (Lin et al. 2023); needs v-prediction.",
    )
    parser.add_argument(
        "--loss_type",
        type=str,
        default="l2",
        choices=["l2", "huber", "smooth_l1", "l1"],
        help="Distance between prediction and target: l2 (MSE), pseudo-Huber, smooth L1 or L1.",
    )
    parser.add_argument(
        "--huber_schedule",
        type=str,
        default="snr",
        choices=["constant", "exponential", "snr"],
        help="How the Huber threshold c falls from 1 at low noise to --huber_c at high noise (constant: always c).",
    )
    parser.add_argument("--huber_c", type=float, default=0.1, help="The Huber threshold c (huber and smooth_l1).")
    parser.add_argument(
        "--debiased_estimation_loss",
        action="store_true",
        help="Weight each timestep by 1/sqrt(SNR) in epsilon terms (Yu et al. 2024); composes with --snr_gamma.",
    )
    parser.add_argument(
        "--timestep_sampling",
        type=str,
        default="uniform",
        choices=["uniform", "logit_normal"],
        help="How training timesteps are drawn: uniformly, or logit-normal as SD3 trains.",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal timestep draw.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit-normal draw.")
    parser.add_argument(
        "--timestep_bias_strategy",
        type=str,
        default="none",
        choices=["none", "earlier", "later", "range"],
        help="Draw the earlier (less noisy), later (noisier) or a range of timesteps more often.",
    )
    parser.add_argument(
        "--timestep_bias_multiplier",
        type=float,
        default=1.0,
        help="How many times as often the favoured timesteps are drawn (below 1: less often).",
    )
    parser.add_argument(
        "--timestep_bias_begin", type=int, default=0, help="First favoured timestep of the 'range' strategy."
    )
    parser.add_argument(
        "--timestep_bias_end", type=int, default=1000, help="One past the last favoured timestep of 'range'."
    )
    parser.add_argument(
        "--timestep_bias_portion",
        type=float,
        default=0.25,
        help="Share of the timesteps favoured by 'earlier' and 'later'.",
    )


def check_recipe_arguments(parser, args):
    """The recipe flags' values make sense together; parser.error names the flag otherwise."""
    if args.huber_c <= 0 or (args.huber_schedule != "constant" and args.huber_c > 1):
        parser.error(f"--huber_c must be in (0, 1] (above 0 with --huber_schedule constant), got {args.huber_c}")
    if args.logit_std <= 0:
        parser.error(f"--logit_std must be positive, got {args.logit_std}")
    if args.timestep_bias_multiplier <= 0:
        parser.error(f"--timestep_bias_multiplier must be positive, got {args.timestep_bias_multiplier}")
    if not 0 < args.timestep_bias_portion < 1:
        parser.error(f"--timestep_bias_portion must be in (0, 1), got {args.timestep_bias_portion}")
    if not 0 <= args.timestep_bias_begin < args.timestep_bias_end:
        parser.error(
            f"--timestep_bias_begin {args.timestep_bias_begin} and --timestep_bias_end {args.timestep_bias_end}: "
            "need 0 <= begin < end"
        )
    if args.timestep_sampling != "uniform" and args.timestep_bias_strategy != "none":
        parser.error(
            "--timestep_sampling logit_normal and --timestep_bias_strategy both choose the timesteps: pick one"
        )


def recipe_fields(args, prediction_type, num_train_timesteps):
    """The LossConfig fields of the recipe flags, once the prediction type and the schedule length are known."""
    if args.rescale_betas_zero_snr and prediction_type != "v_prediction":
        # At zero terminal SNR the last timestep's input is pure noise, so predicting that noise teaches nothing.
        raise ValueError(
            f"--rescale_betas_zero_snr needs v-prediction, and this run predicts {prediction_type}: add "
            "--prediction_type v_prediction"
        )
    if args.timestep_bias_strategy == "range" and args.timestep_bias_begin >= num_train_timesteps:
        raise ValueError(
            f"--timestep_bias_begin {args.timestep_bias_begin} is past the schedule's {num_train_timesteps} timesteps"
        )
    return dict(
        loss_type=args.loss_type,
        huber_schedule=args.huber_schedule,
        huber_c=args.huber_c,
        debiased_estimation=args.debiased_estimation_loss,
        timestep_sampling=args.timestep_sampling,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        timestep_bias_strategy=args.timestep_bias_strategy,
        timestep_bias_multiplier=args.timestep_bias_multiplier,
        timestep_bias_begin=args.timestep_bias_begin,
        timestep_bias_end=args.timestep_bias_end,
        timestep_bias_portion=args.timestep_bias_portion,
    )


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
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def rescale_zero_terminal_snr(betas):
    """Betas whose schedule ends at zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1): sqrt(alpha_bar) is
    shifted so its last value is 0 and scaled so its first value is unchanged. diffusers' FlaxDDPMScheduler has no
    such option, so the rescaled betas are handed to it as trained_betas."""
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def load_noise_scheduler(folder, args):
    """The training noise scheduler and its state; with --rescale_betas_zero_snr, on the rescaled schedule."""
    from diffusers import FlaxDDPMScheduler

    noise_scheduler, scheduler_state = FlaxDDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if args.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(np.asarray(scheduler_state.common.betas))
        noise_scheduler = FlaxDDPMScheduler.from_config(noise_scheduler.config, trained_betas=betas.tolist())
        scheduler_state = noise_scheduler.create_state()
    return noise_scheduler, scheduler_state


def derive_seed(*keys):
    """A well-mixed 63-bit seed from integer keys. All randomness is a pure function of such keys, so a resumed
    run draws exactly what an uninterrupted run would have drawn, whatever the number of workers."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def cut_into_batches(order, global_batch_size):
    """Rows in order, cut into global batches of (row, weight). The last batch is topped up with rows from the start of
    the order at weight 0, and its own rows weigh more so that a batch's weights always average 1. Padding rather than
    dropping: shapes stay fixed, every row counts exactly once per epoch, and a batch is the same whatever number of
    processes shares it."""
    batches = []
    for start in range(0, len(order), global_batch_size):
        chosen = order[start : start + global_batch_size]
        padding = [order[i % len(order)] for i in range(global_batch_size - len(chosen))]
        weight = global_batch_size / len(chosen)
        batches.append([(row, weight) for row in chosen] + [(row, 0.0) for row in padding])
    return batches


def list_checkpoints(output_dir):
    """Complete checkpoints in output_dir, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, CHECKPOINT_METADATA)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def find_resume_checkpoint(args):
    """The checkpoint --resume_from_checkpoint names (None to start fresh). 'latest' is the newest intact checkpoint:
    a damaged one is skipped with a warning. A named checkpoint that is missing or damaged is an error."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        for _, path in reversed(list_checkpoints(args.output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            logger.warning(f"skipping {os.path.basename(path)}: {problem}")
        return None
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, args.resume_from_checkpoint)
    if not os.path.isfile(os.path.join(path, CHECKPOINT_METADATA)):
        complete = [os.path.basename(p) for _, p in list_checkpoints(args.output_dir)]
        raise FileNotFoundError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: no complete checkpoint at {path} "
            f"(complete ones in {args.output_dir}: {complete})"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: {problem}")
    return path


def read_checkpoint_metadata(checkpoint_path):
    """The metadata save_checkpoint wrote into a checkpoint ({} when there is no checkpoint to resume)."""
    if checkpoint_path is None:
        return {}
    with open(os.path.join(checkpoint_path, CHECKPOINT_METADATA)) as f:
        return json.load(f)


def choose_seed(args, resume_metadata):
    """One seed drives every draw. Without --seed a resumed run reuses the seed its checkpoint recorded, and a new
    run draws one (and records it in its checkpoints)."""
    if args.seed is not None:
        seed = args.seed
    else:
        seed = resume_metadata.get("seed", int(np.random.SeedSequence().generate_state(1)[0]))
    if resume_metadata and resume_metadata["seed"] != seed:
        logger.warning(
            f"--seed {seed} differs from the checkpoint's seed {resume_metadata['seed']}: "
            "the resumed run will not match an uninterrupted one"
        )
    return seed


def warn_if_batch_layout_changed(resume_metadata, run_metadata):
    """A resume is exact only with the global batch, epoch length and aspect-ratio buckets (where the run records them)
    the checkpoint was written with. The number of processes sharing the global batch may change."""
    layout = ("total_batch_size", "updates_per_epoch", "aspect_ratio_buckets")
    keys = [key for key in layout if key in run_metadata]
    before, now = ({key: metadata.get(key) for key in keys} for metadata in (resume_metadata, run_metadata))
    if before != now:
        logger.warning(
            f"batch layout changed since the checkpoint ({before} -> {now}): "
            "the resumed run will not match an uninterrupted one"
        )


def fsync_folder(folder):
    """Flush a folder's entries (the names created or renamed in it) to disk; a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows: folders cannot be opened, and its renames are durable
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder):
    """Flush every file and folder under `folder` to disk, so that the rename that publishes it can never survive a
    power cut that its bytes did not."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_folder(root)


def write_failure(what, folder, err):
    """The message for a save that failed (a full disk, most often), with the space left where it was written."""
    free = shutil.disk_usage(folder).free / 2**30 if os.path.isdir(folder) else float("nan")
    return (
        f"could not write {what} into {folder} ({type(err).__name__}: {err}); {free:.2f} GiB free there. "
        "Nothing that was there before was replaced"
    )


def lock_output_dir(output_dir):
    """Hold an OS lock on output_dir for the whole run, so that a second run into the same folder is refused instead
    of overwriting this run's checkpoints and model. The kernel drops the lock when the process ends, however it
    ends, so the lock of a killed run is simply taken over. Then clear what a killed run may have left: unfinished
    checkpoints and pipelines, and replaced ones not yet deleted. Main process only."""
    import filelock

    os.makedirs(output_dir, exist_ok=True)
    lock = filelock.FileLock(os.path.join(output_dir, LOCK_FILE), timeout=0)
    owner_path = os.path.join(output_dir, LOCK_FILE + ".owner")
    try:
        lock.acquire()
    except filelock.Timeout:
        owner = open(owner_path).read().strip() if os.path.isfile(owner_path) else "unknown"
        raise RuntimeError(
            f"--output_dir {output_dir} is in use by another training run (pid {owner}): wait for it to end, "
            "stop it, or choose another --output_dir"
        ) from None
    with open(owner_path, "w") as f:
        f.write(f"{os.getpid()} on {socket.gethostname()}\n")
    link = os.path.join(output_dir, PIPELINE_LINK)
    current = os.readlink(link) if os.path.islink(link) else None
    for name in os.listdir(output_dir):
        unfinished = name.endswith((".partial", ".stale", ".link", ".link.old", ".new", ".probe"))
        if unfinished or (PIPELINE_VERSION.match(name) and name != current):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    return lock


def checkpoint_problem(checkpoint_path):
    """Why a checkpoint cannot be resumed from, naming the file, or None. Its metadata lists every file it holds with
    its size, so a truncated or missing file is found without reading the weights."""
    metadata_path = os.path.join(checkpoint_path, CHECKPOINT_METADATA)
    try:
        with open(metadata_path) as f:
            metadata = json.load(f)
        int(metadata["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{metadata_path} is unreadable ({type(err).__name__}: {err})"
    for name, size in metadata.get("files", {}).items():
        path = os.path.join(checkpoint_path, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} is damaged: {os.path.getsize(path)} bytes, {size} were written"
    return None


def write_checkpoint_metadata(folder, metadata):
    """Write the metadata file, last, with every file of the checkpoint and its size; then flush it all to disk."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            files[os.path.relpath(os.path.join(root, name), folder)] = os.path.getsize(os.path.join(root, name))
    with open(os.path.join(folder, CHECKPOINT_METADATA), "w") as f:
        json.dump({**metadata, "files": files}, f, indent=2)
    fsync_tree(folder)


def publish_checkpoint(partial_path, final_path):
    """Make a complete checkpoint visible under its final name with one rename; one of the same step left by an
    earlier run is replaced."""
    stale_path = final_path + ".stale"
    shutil.rmtree(stale_path, ignore_errors=True)
    if os.path.exists(final_path):
        os.rename(final_path, stale_path)
    os.rename(partial_path, final_path)
    fsync_folder(os.path.dirname(final_path))
    shutil.rmtree(stale_path, ignore_errors=True)


def load_rgb(source, name):
    """The image at `source` (a path or a file object) as 8-bit RGB, whatever it is stored as: EXIF rotation applied,
    16-bit samples scaled to 8 bits (not clipped to white), transparency composited onto white, palette, grayscale
    and CMYK converted. Any failure, a truncated file included, raises an error that names the image."""
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image)  # decoded, and turned the way the camera was held
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit samples (I;16, and 16-bit PNGs opened as I) span 0-65535, float ones 0-1: scale, then round.
            scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
            samples = np.clip(np.asarray(image, dtype=np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
            image = Image.fromarray(samples, "L")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            # Transparent pixels hold arbitrary colours: show them as a viewer does, on white.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"cannot read image {name}: {err}") from err


def verify_image(source, name):
    """Check that an image file decodes, at a fraction of a full decode: a PNG's chunk checksums cover all its bytes,
    and a JPEG decodes at 1/8 scale (its entropy-coded data is still read to the end, so truncation is caught); other
    formats decode in full. Returns the size it shows, (width, height) after EXIF rotation; a failure raises an error
    that names the image."""
    try:
        with Image.open(source) as image:
            size = image.size
            if image.format == "PNG":
                image.verify()
                exif = Image.Exif()
                exif.load(image.info.get("exif"))
            else:
                exif = image.getexif()
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
        if exif.get(0x0112, 1) in (5, 6, 7, 8):  # the EXIF orientations that turn the picture by 90 degrees
            size = size[::-1]
        return size
    except Exception as err:
        raise ValueError(f"cannot read image {name}: {err}") from err


def inspect_images(inspect, indices):
    """inspect(i) for every i in indices, on a thread pool (decoding releases the GIL), before any training: what it
    returned for each (None where it failed), and the error messages of the images that cannot be read."""

    def attempt(index):
        try:
            return inspect(index), None
        except ValueError as err:
            return None, str(err)

    workers = min(32, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(attempt, indices))
    return [result for result, _ in results], [problem for _, problem in results if problem is not None]


class StopRequest:
    """SIGTERM (what cloud spot VMs and SLURM send before a kill) and SIGUSR1 (SLURM's --signal) ask the run to stop.
    The handler only records the request: the loop finishes the optimizer update it is in, writes a checkpoint at
    that step and exits with PREEMPTED_EXIT_CODE. A second signal changes nothing, so it cannot break the save."""

    def __init__(self):
        self.signal_name = None
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name):  # Windows has no SIGUSR1
                signal.signal(getattr(signal, name), self.record)

    def record(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name


def preemption_message(stop_request, global_step):
    received = stop_request.signal_name or "a stop signal (on another process)"
    return (
        f"{received} received: stopped after step {global_step} with checkpoint-{global_step} written; relaunch the "
        f"same command with --resume_from_checkpoint latest to continue (exit code {PREEMPTED_EXIT_CODE})"
    )


def parse_size(text, default):
    """--validation_resolution 'height,width' (or one side, for a square) as (height, width); default when not given."""
    if text is None:
        return default, default
    try:
        sides = [int(side) for side in text.replace(" ", "").split(",")]
        height, width = sides if len(sides) == 2 else sides * 2
    except ValueError:
        raise ValueError(f"--validation_resolution {text!r}: expected 'height,width', e.g. '640,384'") from None
    if height % 8 or width % 8 or height < 8 or width < 8:
        raise ValueError(f"--validation_resolution {text!r}: both sides must be multiples of 8")
    return height, width


def find_example_images(train_data_dir):
    """The example images, sorted by name, each decoded now: a bad file fails before anything is written."""
    if not os.path.isdir(train_data_dir):
        raise FileNotFoundError(f"--train_data_dir {train_data_dir}: no such folder")
    names = sorted(name for name in os.listdir(train_data_dir) if name.lower().endswith(IMAGE_EXTENSIONS))
    paths = [os.path.join(train_data_dir, name) for name in names]
    if not paths:
        raise ValueError(f"--train_data_dir {train_data_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    _, problems = inspect_images(lambda index: load_rgb(paths[index], paths[index]).size, range(len(paths)))
    if problems:
        raise ValueError(
            f"{len(problems)} of {len(paths)} images cannot be read; fix or remove them:\n  " + "\n  ".join(problems)
        )
    return paths


def add_placeholder_tokens(tokenizer, placeholder_token, num_vectors):
    """Add the placeholder (and placeholder_1 ... for several vectors) as new tokens; refuse any that the tokenizer
    already knows, as an added token or as a word or sub-word of its vocabulary ('a' would hijack every 'a')."""
    names = [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]
    vocab = tokenizer.get_vocab()
    for name in names:
        for form in (name.lower() + "</w>", name, name.lower()):
            if form in vocab:
                raise ValueError(
                    f"--placeholder_token {placeholder_token}: '{name}' already exists in the tokenizer (as '{form}'), "
                    "so training it would change the meaning of existing prompts; "
                    "choose a new string such as '<my-concept>'"
                )
    tokenizer.add_tokens(names)
    return names, tokenizer.convert_tokens_to_ids(names)


def initializer_token_id(tokenizer, initializer_token):
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"--initializer_token {initializer_token!r} must be exactly one token, but the tokenizer splits it into "
            f"{len(ids)}: {tokenizer.convert_ids_to_tokens(ids)}; pick a single word such as 'toy' or 'painting'"
        )
    return ids[0]


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


class TextualInversionDataset:
    """The example images repeated --repeats times, each with a prompt from the templates holding the placeholder, as
    numpy arrays. Indexed by (epoch, index) keys: the template and the flip are drawn from an RNG seeded by
    (seed, epoch, index), so the same sample is identical in a resumed run."""

    def __init__(self, image_paths, tokenizer, placeholder_text, args, seed):
        self.image_paths, self.tokenizer, self.placeholder_text = image_paths, tokenizer, placeholder_text
        self.args, self.seed = args, seed
        self.templates = STYLE_TEMPLATES if args.learnable_property == "style" else OBJECT_TEMPLATES

    def __len__(self):
        return len(self.image_paths) * self.args.repeats

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        path = self.image_paths[index % len(self.image_paths)]
        image = load_rgb(path, path)
        if self.args.center_crop:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        image = image.resize((self.args.resolution, self.args.resolution), resample=Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        prompt = self.templates[int(rng.integers(len(self.templates)))].format(self.placeholder_text)
        padding = dict(max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True)
        input_ids = self.tokenizer(prompt, **padding).input_ids
        pixel_values = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # the VAE's input range
        return {"pixel_values": pixel_values, "input_ids": np.asarray(input_ids, dtype=np.int32)}


def shuffled_batches(num_rows, global_batch_size, seed, epoch):
    """The epoch's global batches as lists of (row, weight): all rows in an order that depends only on (seed, epoch),
    cut into batches (cut_into_batches). NumPy, so the PyTorch and JAX twins see the same batches."""
    order = np.random.default_rng(derive_seed(seed, epoch)).permutation(num_rows).tolist()
    return cut_into_batches(order, global_batch_size)


def epoch_batches(dataset, epoch, global_batches, skip_batches):
    """This process's share of each of the epoch's global batches (lists of (row, weight)) from skip_batches on, with
    the weights as "sample_weights"."""
    local = len(global_batches[0]) // jax.process_count()
    for global_batch in global_batches[skip_batches:]:
        share = global_batch[jax.process_index() * local : (jax.process_index() + 1) * local]
        examples = [dataset[(epoch, row)] for row, _ in share]
        batch = {name: np.stack([example[name] for example in examples]) for name in examples[0]}
        batch["sample_weights"] = np.array([weight for _, weight in share], np.float32)
        yield batch


def resolve_pipeline_folder(args):
    """A local folder holding the pipeline: the path itself, or the needed files of a hub repository (configs,
    tokenizer and the safetensors weights of the chosen variant; nothing else is downloaded)."""
    if os.path.isdir(args.pretrained_model_name_or_path):
        return args.pretrained_model_name_or_path
    from huggingface_hub import snapshot_download

    suffix = f".{args.variant}" if args.variant else ""
    return snapshot_download(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        cache_dir=args.cache_dir,
        allow_patterns=[
            "model_index.json",
            "scheduler/*",
            "tokenizer/*",
            "*/config.json",
            f"text_encoder/model{suffix}.safetensors",
            f"unet/diffusion_pytorch_model{suffix}.safetensors",
            f"vae/diffusion_pytorch_model{suffix}.safetensors",
        ],
    )


def load_flax_model(cls, folder, subfolder, variant, dtype, **overrides):
    """A diffusers Flax model and its params from the PyTorch safetensors weights of a standard pipeline folder."""
    import safetensors.torch
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    config = cls.load_config(folder, subfolder=subfolder)
    if cls.__name__ == "FlaxUNet2DConditionModel" and config.get("norm_num_groups", 32) != 32:
        # diffusers' Flax UNet always normalises over 32 groups: any other value would silently compute another model.
        raise ValueError(
            f"{os.path.join(folder, subfolder)}: norm_num_groups={config['norm_num_groups']}, "
            "but the Flax UNet supports only 32"
        )
    model = cls.from_config(config, dtype=dtype, **overrides)
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    path = os.path.join(folder, subfolder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the Flax scripts read PyTorch pipelines saved with safetensors weights"
        )
    state = {k: v.float() for k, v in safetensors.torch.load_file(path).items()}

    class ShapesOnly:
        # The converter initialises random params only to learn their names and shapes; eval_shape gives both
        # without running the model (tens of seconds saved on CPU).
        def init_weights(self, rng):
            return jax.eval_shape(model.init_weights, rng)

    params = convert_pytorch_state_dict_to_flax(state, ShapesOnly())
    return model, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def load_flax_text_encoder(folder, variant, dtype):
    """transformers' FlaxCLIPTextModel and its params from the PyTorch safetensors weights of a pipeline folder."""
    import safetensors.torch
    from transformers import CLIPTextConfig, FlaxCLIPTextModel
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    model = FlaxCLIPTextModel(
        CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"), dtype=dtype, _do_init=False
    )
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    path = os.path.join(folder, "text_encoder", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the Flax scripts read PyTorch pipelines saved with safetensors weights"
        )
    state = {k: v.float() for k, v in safetensors.torch.load_file(path).items()}
    if not any(k.startswith("text_model.") for k in state):  # transformers 5 drops the prefix when saving
        state = {"text_model." + k: v for k, v in state.items()}

    class ShapesOnly:  # what the converter reads of the model, without initialising random params
        base_model_prefix = model.base_model_prefix
        params = model.params_shape_tree

    params = convert_pytorch_state_dict_to_flax(state, ShapesOnly())
    model._is_initialized = True
    model.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return model


def enable_block_rematerialisation():
    """Gradient checkpointing for the Flax UNet: wrap each of its block classes in nn.remat, so a block's activations
    are recomputed in the backward pass instead of stored. The model code is unchanged; only the names the UNet
    module looks its blocks up by are rebound, before the UNet is built."""
    import diffusers.models.unets.unet_2d_condition_flax as unet_module
    import flax.linen as nn

    for name in [
        "FlaxCrossAttnDownBlock2D",
        "FlaxDownBlock2D",
        "FlaxCrossAttnUpBlock2D",
        "FlaxUpBlock2D",
        "FlaxUNetMidBlock2DCrossAttn",
    ]:
        block = getattr(unet_module, name)
        if not getattr(block, "_rematerialised", False):
            wrapped = nn.remat(block)
            wrapped._rematerialised = True
            setattr(unet_module, name, wrapped)


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


def evaluation_params(state, args):
    """The weights to check, render and save: the trained params, or with schedule-free AdamW the average it
    evaluates (its params are the point gradients are taken at). Checkpoints keep the training state as it is."""
    if args.optimizer != "schedule_free_adamw":
        return state.params
    inner = state.opt_state.inner_opt_state  # MultiSteps -> (clipping, schedule-free) or schedule-free alone
    schedule_free = inner if hasattr(inner, "z") else inner[-1]
    return optax.contrib.schedule_free_eval_params(schedule_free, state.params)


class LogWindow:
    """Metrics of the updates since the last logging step, left on the device: reading them back waits for it, so
    that happens once per --logging_steps updates (and before anything is saved), not at every update."""

    def __init__(self, images_per_update, global_step):
        self.images_per_update = images_per_update
        self.reset(global_step)

    def reset(self, global_step):
        self.metrics, self.first_step, self.started = [], global_step + 1, time.perf_counter()

    def add_update(self, metrics):
        self.metrics.append(metrics)

    def read(self, global_step, epoch, lr):
        """Averages over the window as a logs dict, then a new window. A non-finite loss stops the run, naming the
        steps."""
        metrics = jax.device_get(self.metrics)
        updates = len(metrics)
        loss = float(np.mean([m["loss"] for m in metrics]))
        if not math.isfinite(loss):
            steps = f"at step {global_step}" if updates == 1 else f"in steps {self.first_step}-{global_step}"
            raise FloatingPointError(
                f"loss is {loss} {steps} (epoch {epoch}): stopping; no checkpoint was written for these steps"
            )
        elapsed = time.perf_counter() - self.started
        logs = {"loss": loss, "lr": lr, "grad_norm": float(np.mean([m["grad_norm"] for m in metrics]))}
        logs["step_time"] = elapsed / updates
        logs["images_per_second"] = updates * self.images_per_update / elapsed
        self.reset(global_step)
        return logs


def format_logs(global_step, logs):
    return f"step {global_step}: " + ", ".join(f"{key}={value:.4g}" for key, value in logs.items())


@struct.dataclass
class FrozenModels:
    """The models that do not train. Their params are pytree leaves, so the jitted step takes them as arguments (not
    as constants baked into the compiled program); the modules and the noise scheduler are static."""

    unet_params: Any
    vae_params: Any
    text_encoder_params: Any
    scheduler_state: Any
    unet: Any = struct.field(pytree_node=False)
    vae: Any = struct.field(pytree_node=False)
    text_encoder: Any = struct.field(pytree_node=False)
    noise_scheduler: Any = struct.field(pytree_node=False)


def encode_batch(frozen, batch, learned, rng):
    """The batch's latents, from the frozen VAE (the sample is drawn from `rng`), and its text conditioning, computed
    with the new embedding rows `learned`."""
    # The frozen VAE maps images to latents; the scaling factor brings them to roughly unit variance.
    vae_variables = {"params": frozen.vae_params}
    encoded = frozen.vae.apply(vae_variables, batch["pixel_values"], deterministic=True, method=frozen.vae.encode)
    latents = jnp.transpose(encoded.latent_dist.sample(rng), (0, 3, 1, 2)) * frozen.vae.config.scaling_factor
    # The text encoder runs with gradients: they reach the new token embedding rows and nothing else.
    text_encoder_params = with_learned_rows(frozen.text_encoder_params, learned)
    encoder_hidden_states = frozen.text_encoder(batch["input_ids"], params=text_encoder_params, train=False)[0]
    return jax.lax.stop_gradient(latents), encoder_hidden_states


# ----------------------------------------------------- BEGIN MATH -----------------------------------------------------
def timestep_bias_weights(num_train_timesteps, config):
    """Relative weight of drawing each timestep under --timestep_bias_strategy: timesteps in the favoured span weigh
    config.timestep_bias_multiplier, the others 1. NumPy, so the PyTorch and JAX twins draw from the same table."""
    weights = np.ones(num_train_timesteps, np.float64)
    favoured = round(config.timestep_bias_portion * num_train_timesteps)
    if config.timestep_bias_strategy == "earlier":
        span = slice(0, favoured)
    elif config.timestep_bias_strategy == "later":
        span = slice(num_train_timesteps - favoured, num_train_timesteps)
    elif config.timestep_bias_strategy == "range":
        span = slice(config.timestep_bias_begin, min(config.timestep_bias_end, num_train_timesteps))
    else:
        raise ValueError(f"unknown timestep bias strategy {config.timestep_bias_strategy!r}")
    weights[span] *= config.timestep_bias_multiplier
    return weights


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
    unet, noise_scheduler, scheduler_state, latents, encoder_hidden_states, rng, config, sample_weights=None
):
    """The denoising loss of a batch of clean latents, averaged over the batch (weighted by `sample_weights` when
    given: a padded batch holds examples of weight 0). Every random draw comes from `rng`, in
    the PyTorch twin's order: noise, offset noise, input perturbation, timesteps."""
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

    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states)
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
    latents, encoder_hidden_states = encode_batch(frozen, batch, params["learned"], sample_rng)

    def unet(noisy_latents, timesteps, encoder_hidden_states):
        variables = {"params": frozen.unet_params}
        return frozen.unet.apply(variables, noisy_latents, timesteps, encoder_hidden_states, train=True).sample

    scheduler, scheduler_state, weights = frozen.noise_scheduler, frozen.scheduler_state, batch["sample_weights"]
    return diffusion_loss(unet, scheduler, scheduler_state, latents, encoder_hidden_states, loss_rng, config, weights)


def train_step(state, frozen, batch, rng, config):
    """One batch: its loss and gradients, then an optimizer step (accumulated by optax.MultiSteps)."""
    loss, grads = jax.value_and_grad(batch_loss)(state.params, state, frozen, batch, rng, config)
    return state.apply_gradients(grads=grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@struct.dataclass
class ValidationModels:
    """What renders validation images, all static: the modules, the tokenizer, and the sampling scheduler with its
    state. The params that change (UNet, VAE, text encoder) are passed to each render."""

    unet: Any = struct.field(pytree_node=False)
    vae: Any = struct.field(pytree_node=False)
    text_encoder: Any = struct.field(pytree_node=False)
    tokenizer: Any = struct.field(pytree_node=False)
    scheduler: Any = struct.field(pytree_node=False)
    scheduler_state: Any = struct.field(pytree_node=False)
    trailing: bool = struct.field(pytree_node=False)


def load_validation_scheduler(folder, args):
    """The Flax twin of the scheduler the saved pipeline samples with (inference_scheduler_config), its state, and
    whether it samples from the last timestep ("trailing", which Flax schedulers cannot set themselves)."""
    import diffusers

    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = inference_scheduler_config(json.load(f), args)
    cls = getattr(diffusers, "Flax" + config["_class_name"], None)
    if cls is None:
        logger.info(f"Validation renders with FlaxDDIMScheduler: diffusers has no Flax {config['_class_name']}")
        cls = diffusers.FlaxDDIMScheduler
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    scheduler = cls.from_config(config)
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(np.asarray(scheduler.create_state().common.betas))
        scheduler = cls.from_config(config, trained_betas=betas.tolist())
    return scheduler, scheduler.create_state(), config.get("timestep_spacing") == "trailing"


def make_renderer(models, size, num_inference_steps=20, guidance_scale=7.5):
    """A compiled function (params, prompt_ids, rng) -> one image of `size` (height, width) as uint8 HWC: the
    pipeline's classifier-free guided sampling, as the PyTorch twin renders (20 steps, guidance 7.5, empty negative
    prompt). Compiled once per run, whatever the prompts."""
    height, width = size
    empty_ids = models.tokenizer("", padding="max_length", max_length=models.tokenizer.model_max_length).input_ids
    empty_ids = np.asarray([empty_ids])
    scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    shape = (1, models.unet.config.in_channels, height // scale, width // scale)

    def render(params, prompt_ids, rng):
        text = models.text_encoder(prompt_ids, params=params["text_encoder"], train=False)[0]
        empty = models.text_encoder(empty_ids, params=params["text_encoder"], train=False)[0]
        encoder_hidden_states = jnp.concatenate([empty, text])
        state = models.scheduler.set_timesteps(models.scheduler_state, num_inference_steps, shape)
        if models.trailing:
            # Lin et al. 2023 sec. 3.3: with zero terminal SNR, sampling starts at the last timestep.
            train_steps = models.scheduler.config.num_train_timesteps
            timesteps = np.round(np.arange(train_steps, 0, -train_steps / num_inference_steps)).astype(np.int32) - 1
            state = state.replace(timesteps=jnp.asarray(timesteps))
        latents = jax.random.normal(rng, shape, jnp.float32) * state.init_noise_sigma

        def denoise(step, carry):
            latents, state = carry
            t = state.timesteps[step]
            model_input = models.scheduler.scale_model_input(state, jnp.concatenate([latents] * 2), t)
            timesteps = jnp.broadcast_to(t, (2,))
            variables = {"params": params["unet"]}
            model_pred = models.unet.apply(variables, model_input, timesteps, encoder_hidden_states).sample
            unconditional, conditional = jnp.split(model_pred, 2)
            # Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598).
            model_pred = unconditional + guidance_scale * (conditional - unconditional)
            return models.scheduler.step(state, model_pred, t, latents).to_tuple()

        latents, _ = jax.lax.fori_loop(0, num_inference_steps, denoise, (latents, state))
        latents = latents / models.vae.config.scaling_factor
        image = models.vae.apply({"params": params["vae"]}, latents, method=models.vae.decode).sample[0]
        return jnp.round(jnp.clip(image / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).astype(jnp.uint8)

    return jax.jit(render)


def validation_renderer(folder, args, unet, vae, text_encoder, tokenizer):
    """The compiled validation sampler (make_renderer) of these models, at --validation_resolution."""
    scheduler, scheduler_state, trailing = load_validation_scheduler(folder, args)
    models = ValidationModels(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        scheduler_state=scheduler_state,
        trailing=trailing,
    )
    return make_renderer(models, args.validation_resolution)


def render_validation_images(render, params, tokenizer, prompts, seed):
    """One image per prompt, each from its own fixed seed, so grids compare across steps and across a resume."""
    images = []
    for index, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        rng = jax.random.PRNGKey(derive_seed(seed, VALIDATION_SEED_KEY, index) % (2**31))
        images.append(Image.fromarray(np.asarray(render(params, np.asarray([prompt_ids.input_ids]), rng))))
    return images


def save_validation_grid(images, prompts, output_dir, tag, global_step):
    """The images side by side in output_dir/validation/<tag>-step-<global_step>.png. Main process only."""
    grid = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)))
    x = 0
    for image in images:
        grid.paste(image, (x, 0))
        x += image.width
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid_path = os.path.join(folder, f"{tag}-step-{global_step:06d}.png")
    grid.save(grid_path)
    logger.info(f"Validation grid ({' | '.join(prompts)}): {grid_path}")


def inference_scheduler_config(config, args):
    """The saved scheduler's config for what this run trained: its prediction type, and with
    --rescale_betas_zero_snr the rescaled schedule sampled from its last timestep ("trailing", Lin et al. 2023 sec.
    3.3). A scheduler class that cannot rescale (PNDM, LMS) is replaced by DDIM, which the paper samples with."""
    config = dict(config)
    if args.prediction_type is not None:
        config["prediction_type"] = args.prediction_type
    if args.rescale_betas_zero_snr:
        import diffusers

        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if (
            "rescale_betas_zero_snr"
            not in inspect.signature(getattr(diffusers, config["_class_name"]).__init__).parameters
        ):
            logger.info(f"--rescale_betas_zero_snr: {config['_class_name']} cannot rescale, saving a DDIMScheduler")
            # Latents are not confined to [-1, 1]: DDIM's default clipping of its x0 estimate would distort them.
            config.update(_class_name="DDIMScheduler", clip_sample=False)
    return config


def validate(render, state, frozen, tokenizer, prompts, args, seed, global_step, tag, is_main_process):
    """Render the validation prompts with the embedding learned so far, through the frozen pipeline. Every process
    renders; the main process saves."""
    learned = evaluation_params(state, args)["learned"]
    text_encoder_params = with_learned_rows(frozen.text_encoder_params, learned)
    params = {"unet": frozen.unet_params, "vae": frozen.vae_params, "text_encoder": text_encoder_params}
    images = render_validation_images(render, params, tokenizer, prompts, seed)
    if is_main_process:
        save_validation_grid(images, prompts, args.output_dir, tag, global_step)


def stop_agreed(stop_request):
    """Whether any process received a stop signal, the same answer on every process at the same update."""
    requested = int(stop_request.signal_name is not None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        requested = int(np.max(multihost_utils.process_allgather(np.array(requested))))
    return bool(requested)


def check_finite(tree, loss, what, global_step):
    """Before anything is written: every array about to be written is finite, and so is the loss the new params give
    on the last batch (params can stay finite while a model's outputs do not). Otherwise stop, naming the step and
    the arrays; only then is anything written, so no file ever holds a diverged model."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    floating = [(path, leaf) for path, leaf in leaves if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)]
    bad = [jax.tree_util.keystr(path) for path, leaf in floating if not bool(jnp.isfinite(leaf).all())]
    if bad or not math.isfinite(loss):
        culprits = f"non-finite values in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}" if bad else ""
        culprits = culprits or f"a loss of {loss} on the last batch"
        raise FloatingPointError(
            f"{what} diverged at step {global_step} ({culprits}): stopping, nothing was written for this step. "
            "Lower --learning_rate, or clip gradients with --max_grad_norm"
        )


def save_checkpoint(state, output_dir, global_step, run_metadata, total_limit=None):
    """Write checkpoint-N crash-safely: into a hidden temporary folder, flushed to disk, then renamed into place (a
    checkpoint is visible only when complete); then keep the newest `total_limit` (--checkpoints_total_limit).
    Called by every process: Orbax, JAX's multi-host checkpointer, writes the train state (the step, the params and
    the optimizer state; each array once, by the processes that hold it) and returns when every process is done;
    process 0 writes the metadata and publishes the folder. With several hosts, output_dir must be shared by all."""
    is_main_process = jax.process_index() == 0
    final_path = os.path.abspath(os.path.join(output_dir, f"checkpoint-{global_step}"))
    partial_path = os.path.abspath(os.path.join(output_dir, f".checkpoint-{global_step}.partial"))
    if is_main_process:
        shutil.rmtree(partial_path, ignore_errors=True)
    multihost_utils.sync_global_devices(f"checkpoint-{global_step}: cleared")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(partial_path, TRAIN_STATE), state)
            checkpointer.wait_until_finished()
        if is_main_process:
            write_checkpoint_metadata(partial_path, {**run_metadata, "global_step": global_step})
    except OSError as err:
        if is_main_process:
            shutil.rmtree(partial_path, ignore_errors=True)
        raise OSError(write_failure(f"checkpoint-{global_step}", output_dir, err)) from err
    if is_main_process:
        publish_checkpoint(partial_path, final_path)
        logger.info(f"Saved {final_path}")
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                logger.info(f"Deleting {path} (--checkpoints_total_limit {total_limit})")
                shutil.rmtree(path)
    multihost_utils.sync_global_devices(f"checkpoint-{global_step}: published")


def restore_train_state(state, checkpoint_path, sharding):
    """`state` with the step, params and optimizer state saved in a checkpoint, as arrays placed by `sharding` (each
    process reads what its devices hold)."""
    path = os.path.abspath(os.path.join(checkpoint_path, TRAIN_STATE))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), state)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except Exception as err:
        raise RuntimeError(f"{path} could not be loaded ({type(err).__name__}: {err})") from err


# A1111/Forge and ComfyUI read this key too; InvokeAI's probe reads the vector width from it (from a file keyed by the
# token it reads the number of vectors instead, and refuses the file).
UI_EMBEDDING_KEY = "emb_params"


def ui_embedding_name(placeholder_token):
    """The name the UIs show and prompts use for the embedding, which they take from its file name: the placeholder
    without the characters file systems or prompt syntax reserve, "<cat-toy>" -> "cat-toy"."""
    return re.sub(r"[^\w.-]+", "", placeholder_token).strip(".") or "embedding"


def embedding_files(args, suffix):
    """(key, path) of each final embeddings file --embedding_format asks for: learned_embeds.<suffix> keyed by the
    placeholder (diffusers' layout) and <name>.<suffix> keyed by UI_EMBEDDING_KEY (the UIs' layout)."""
    files = []
    if args.embedding_format in ("diffusers", "both"):
        files.append((args.placeholder_token, os.path.join(args.output_dir, f"learned_embeds.{suffix}")))
    if args.embedding_format in ("ui", "both"):
        name = ui_embedding_name(args.placeholder_token)
        files.append((UI_EMBEDDING_KEY, os.path.join(args.output_dir, f"{name}.{suffix}")))
    return files


def save_embeddings(learned, key, path):
    """{key: tensor[num_vectors, hidden]}, key the placeholder (diffusers) or UI_EMBEDDING_KEY (the UIs), the same
    as the PyTorch twin writes. Written to a temporary name, flushed to disk and renamed, so a crash never
    leaves a truncated file."""
    import safetensors.numpy

    partial = path + ".partial"
    try:
        rows = np.asarray(jax.device_get(learned), dtype=np.float32)
        safetensors.numpy.save_file({key: rows}, partial, metadata={"format": "pt"})
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
    except OSError as err:
        if os.path.exists(partial):
            os.remove(partial)
        raise OSError(write_failure(os.path.basename(path), os.path.dirname(path), err)) from err
    os.replace(partial, path)
    fsync_folder(os.path.dirname(path))


def files_to_upload(output_dir):
    """(path in the repository, local path) for what push_to_hub uploads: the pipeline (component links resolved), the
    model card, embeddings and validation grids; not checkpoints, tracker logs or hidden files."""
    found = []
    for root, folders, names in os.walk(output_dir, followlinks=True):
        top = os.path.relpath(root, output_dir) == "."
        folders[:] = [
            f for f in folders if not f.startswith(".") and not (top and f.startswith(("checkpoint-", "logs")))
        ]
        for name in names:
            if not name.startswith("."):
                path = os.path.join(root, name)
                found.append((os.path.relpath(path, output_dir).replace(os.sep, "/"), path))
    return sorted(found)


def push_to_hub(args):
    """Upload output_dir's files_to_upload in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(
        args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), exist_ok=True
    ).repo_id
    files = [CommitOperationAdd(path_in_repo, local) for path_in_repo, local in files_to_upload(args.output_dir)]
    api.create_commit(repo_id, operations=files, commit_message="End of training")


def start_distributed(args):
    """Join the run's other processes, before JAX touches a device: at the coordinator and with the process count and
    index given, or found by JAX itself on TPU pods and the clusters it knows (--jax_distributed alone)."""
    if not (args.jax_distributed or args.coordinator_address):
        return
    # CPU processes exchange arrays over gloo (JAX's CPU backend has no collectives of its own); GPUs and TPUs
    # ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout_seconds=args.heartbeat_timeout_seconds,
    )


def main(argv=None):
    args = parse_args(argv)

    # ------------------------------------------------------------------------------------------------------ setup
    start_distributed(args)
    # force: importing Orbax (or anything that logs at import time) leaves a root handler that would make this a no-op.
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
        force=True,
    )
    is_main_process = jax.process_index() == 0
    if not is_main_process:
        logger.setLevel(logging.ERROR)
    image_paths = find_example_images(args.train_data_dir)
    # Only the main process writes (but for each process's share of a checkpoint's arrays), and only while it holds
    # output_dir: a second run into it is refused.
    output_lock = lock_output_dir(args.output_dir) if is_main_process else None
    stop_request = StopRequest()
    resume_path = find_resume_checkpoint(args)
    resume_metadata = read_checkpoint_metadata(resume_path)
    seed = choose_seed(args, resume_metadata)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    # ------------------------------------------------------------------------------------------------ load models
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTokenizerFast

    weight_dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    folder = resolve_pipeline_folder(args)
    if args.tokenizer_name:
        tokenizer = CLIPTokenizerFast.from_pretrained(args.tokenizer_name, cache_dir=args.cache_dir)
    else:
        tokenizer = CLIPTokenizerFast.from_pretrained(folder, subfolder="tokenizer")
    # The text encoder computes in fp32: gradients flow through it to the new rows.
    text_encoder = load_flax_text_encoder(folder, args.variant, jnp.float32)
    vae, vae_params = load_flax_model(FlaxAutoencoderKL, folder, "vae", args.variant, weight_dtype)
    if args.gradient_checkpointing:
        enable_block_rematerialisation()
    unet, unet_params = load_flax_model(FlaxUNet2DConditionModel, folder, "unet", args.variant, weight_dtype)
    # Lin et al. 2023 (arXiv:2305.08891): rescaled betas reach zero SNR at the last timestep, as sampling starts.
    noise_scheduler, scheduler_state = load_noise_scheduler(folder, args)
    # Everything is frozen; the only trainable tensor is the new rows, each starting at the initializer's embedding.
    token = (args.placeholder_token, args.initializer_token, args.num_vectors)
    placeholder_tokens, placeholder_ids, learned, extended_text_encoder = add_learned_embedding(
        text_encoder, tokenizer, *token
    )
    frozen = FrozenModels(
        unet_params=unet_params,
        vae_params=vae_params,
        text_encoder_params=text_encoder.params,
        scheduler_state=scheduler_state,
        unet=unet,
        vae=vae,
        text_encoder=extended_text_encoder,
        noise_scheduler=noise_scheduler,
    )
    validation_prompts = [args.validation_prompt] * args.num_validation_images if args.validation_prompt else []
    render = (
        validation_renderer(folder, args, unet, vae, extended_text_encoder, tokenizer) if validation_prompts else None
    )
    prediction_type = args.prediction_type or noise_scheduler.config.prediction_type
    loss_config = LossConfig(
        prediction_type=prediction_type,
        snr_gamma=args.snr_gamma,
        **recipe_fields(args, prediction_type, noise_scheduler.config.num_train_timesteps),
    )

    # ------------------------------------------------------------------------------------------------------- data
    train_dataset = TextualInversionDataset(image_paths, tokenizer, " ".join(placeholder_tokens), args, seed)
    global_batch_size = args.train_batch_size * jax.device_count()
    epoch_global_batches = functools.partial(shuffled_batches, len(train_dataset), global_batch_size, seed)
    batches_per_epoch = len(epoch_global_batches(0))  # the same every epoch
    if batches_per_epoch < args.gradient_accumulation_steps:
        raise ValueError(
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
    state = TrainState.create(apply_fn=None, params={"learned": learned}, tx=make_optimizer(args, schedule))
    total_batch_size = global_batch_size * args.gradient_accumulation_steps
    run_metadata = {"seed": seed, "total_batch_size": total_batch_size, "updates_per_epoch": updates_per_epoch}
    run_metadata["process_count"] = jax.process_count()  # information only: the run does not depend on it

    # ----------------------------------------------------------------------------------------------------- resume
    global_step = 0
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        state = restore_train_state(state, resume_path, replicated)
        global_step = resume_metadata["global_step"]
        warn_if_batch_layout_changed(resume_metadata, run_metadata)
    state, frozen = jax.device_put((state, frozen), replicated)
    first_epoch = global_step // updates_per_epoch
    if is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
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
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        # Resume mid-epoch: skip exactly the batches the interrupted run had consumed.
        skip = (global_step - epoch * updates_per_epoch) * args.gradient_accumulation_steps
        global_batches = epoch_global_batches(epoch)
        batches = epoch_batches(train_dataset, epoch, global_batches, skip)
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
            stopping = stop_agreed(stop_request)  # a SIGTERM / SIGUSR1 on any process
            is_checkpoint_step = global_step % args.checkpointing_steps == 0 or stopping
            is_save_step = global_step % args.save_steps == 0 or is_checkpoint_step
            # Reading the loss back waits for the device: only at logging steps, and before anything is saved (the
            # read raises on a non-finite loss, so no saved embedding or checkpoint ever holds a diverged one).
            if global_step % args.logging_steps == 0 or is_save_step or global_step >= max_train_steps:
                logs = window.read(global_step, epoch, float(schedule(global_step - 1)))
                logger.info(format_logs(global_step, logs))
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            if is_save_step:
                probe = float(probe_fn(state.params, state, frozen, *last_batch))
                check_finite(
                    {"params": state.params, "opt_state": state.opt_state}, probe, "the embedding", global_step
                )
            if is_main_process:
                if global_step % args.save_steps == 0:
                    path = os.path.join(args.output_dir, f"learned_embeds-steps-{global_step}.safetensors")
                    save_embeddings(evaluation_params(state, args)["learned"], args.placeholder_token, path)
            if is_checkpoint_step:
                save_checkpoint(state, args.output_dir, global_step, run_metadata, args.checkpoints_total_limit)
            if validation_prompts and global_step % args.validation_steps == 0 and global_step < max_train_steps:
                validate(
                    render,
                    state,
                    frozen,
                    tokenizer,
                    validation_prompts,
                    args,
                    seed,
                    global_step,
                    "validation",
                    is_main_process,
                )
            if stopping:
                logger.warning(preemption_message(stop_request, global_step))
                sys.exit(PREEMPTED_EXIT_CODE)
            if global_step >= max_train_steps:
                break

    # ------------------------------------------------------------------------------------------------------- save
    params = evaluation_params(state, args)
    if last_batch is not None:  # what is about to be saved, checked as every checkpoint is
        probe = float(probe_fn(params, state, frozen, *last_batch))
        check_finite({"params": params}, probe, "the embedding", global_step)
    if is_main_process:
        for key, path in embedding_files(args, "safetensors"):
            save_embeddings(params["learned"], key, path)
            logger.info(f"Saved {os.path.abspath(path)}")
    if validation_prompts:
        validate(
            render, state, frozen, tokenizer, validation_prompts, args, seed, global_step, "final", is_main_process
        )
    if is_main_process:
        if args.push_to_hub:
            push_to_hub(args)
        output_lock.release()


if __name__ == "__main__":
    main()

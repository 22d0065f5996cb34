#!/usr/bin/env python
"""Fine-tune the UNet of a Stable Diffusion 1.x / 2.x pipeline on image-caption pairs (JAX/Flax twin of
train_text_to_image.py). Reads a standard PyTorch diffusers folder or hub id, trains data-parallel over every local
device, and saves a PyTorch diffusers pipeline (safetensors) that current diffusers loads.

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
"""

import argparse
import concurrent.futures
import ctypes
import dataclasses
import functools
import inspect
import io
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

import datasets
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
# Seed, step and batch layout of a checkpoint, written last into it: its presence marks the checkpoint complete.
CHECKPOINT_METADATA = "checkpoint_metadata.json"
LOCK_FILE = ".training.lock"  # held (an OS lock) by the run writing into output_dir; a killed run holds none
TRAIN_STATE = "train_state"  # inside checkpoint-N: the Orbax checkpoint of the step, params and optimizer state
PIPELINE_LINK = ".pipeline"  # -> the current .pipeline-<n> folder; output_dir's components link through it
PIPELINE_VERSION = re.compile(r"^\.pipeline-(\d+)$")
# The second key of every validation seed, derive_seed(seed, VALIDATION_SEED_KEY, prompt index): training draws use
# four keys, so a validation image never shares its noise with a training step.
VALIDATION_SEED_KEY = 7919
# The largest decay of --use_ema, as diffusers' EMAModel.
EMA_MAX_DECAY = 0.9999
# The third key of bucket draws, derive_seed(seed, epoch, BUCKET_SEED_KEY, ...), and of each image's fixed bucket crop.
BUCKET_SEED_KEY = 6007
PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after writing a checkpoint; relaunch to continue
INTERPOLATION_MODES = ["lanczos", "bicubic", "bilinear", "nearest", "box", "hamming"]
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine"]
OPTIMIZERS = ["adamw", "adafactor", "lion", "prodigy", "schedule_free_adamw"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune the UNet of a Stable Diffusion pipeline on image-caption pairs (JAX/Flax)."
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
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Training target; default: the scheduler config's prediction_type.",
    )
    # Data
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset id or local dataset folder that datasets.load_dataset reads.",
    )
    parser.add_argument(
        "--dataset_config_name", type=str, default=None, help="Config name of the dataset, if it has several."
    )
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Local imagefolder with a metadata.jsonl of file_name and caption (when --dataset_name is not given).",
    )
    parser.add_argument("--image_column", type=str, default="image", help="Dataset column holding the images.")
    parser.add_argument(
        "--caption_column",
        type=str,
        default="text",
        help="Dataset column holding a caption or a list of captions (one is drawn per use).",
    )
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Train on a random subset of this many examples (for debugging).",
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    parser.add_argument(
        "--resolution", type=int, default=512, help="Training images are resized and cropped to this square size."
    )
    parser.add_argument(
        "--center_crop", action="store_true", help="Crop the center of each image instead of a random crop."
    )
    parser.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image once (both flips with --random_flip); train from the cache. Needs --center_crop.",
    )
    parser.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help="Encode every distinct caption once before training and train from the stored text-encoder outputs.",
    )
    parser.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=INTERPOLATION_MODES,
        help="Interpolation used to resize images.",
    )
    parser.add_argument(
        "--use_aspect_ratio_buckets",
        action="store_true",
        help="Batch images by aspect ratio (one bucket per batch) instead of cropping every one to a square.",
    )
    parser.add_argument(
        "--aspect_ratio_buckets",
        type=str,
        default=None,
        help="Buckets as 'height,width;...' (implies --use_aspect_ratio_buckets); default: made from --resolution.",
    )
    parser.add_argument(
        "--bucket_no_upscale",
        action="store_true",
        help="Never enlarge an image to fit a bucket: an image smaller than every bucket gets one of its own size.",
    )
    parser.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="Replace each use of a caption by the empty caption with this probability (classifier-free guidance).",
    )
    parser.add_argument(
        "--shuffle_caption", action="store_true", help="Shuffle the comma-separated tags of a caption at every use."
    )
    parser.add_argument(
        "--keep_tokens",
        type=int,
        default=0,
        help="Tags at the start of a caption that stay in place (and are never dropped).",
    )
    parser.add_argument(
        "--caption_tag_dropout_rate",
        type=float,
        default=0.0,
        help="Drop each tag of a caption (after --keep_tokens) with this probability at every use.",
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
        "--max_train_steps", type=int, default=None, help="Total optimizer updates; overrides --num_train_epochs."
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
    parser.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the UNet and save it as the final model.",
    )
    parser.add_argument(
        "--ema_validation",
        type=str,
        default="ema",
        choices=["ema", "raw", "both"],
        help="With --use_ema, what validation renders: the EMA, the raw weights (-raw grids), or both side by side.",
    )
    parser.add_argument(
        "--noise_offset", type=float, default=0.0, help="Scale of offset noise (0.1 is typical); 0 turns it off."
    )
    parser.add_argument(
        "--input_perturbation",
        type=float,
        default=0.0,
        help="Scale of input perturbation (0.1 is recommended); 0 turns it off.",
    )
    add_optimizer_arguments(parser)
    parser.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Clip gradients to this global norm (0 turns clipping off)."
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
    # Checkpointing
    parser.add_argument(
        "--output_dir", type=str, default="sd-model-finetuned", help="Where the final pipeline and checkpoints go."
    )
    parser.add_argument(
        "--save_single_file",
        action="store_true",
        help="Also write output_dir/<its name>.safetensors in the original SD layout (A1111/Forge, ComfyUI, InvokeAI).",
    )
    parser.add_argument(
        "--single_file_dtype",
        type=str,
        default="fp16",
        choices=SINGLE_FILE_DTYPES,
        help="Precision of the --save_single_file weights (fp16 halves the file; the UIs run fp16 anyway).",
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
        "--validation_prompts",
        type=str,
        default=None,
        nargs="+",
        help="Prompts rendered every --validation_epochs and at the end.",
    )
    parser.add_argument(
        "--validation_epochs", type=int, default=5, help="Render the validation prompts every this many epochs."
    )
    parser.add_argument(
        "--validation_resolution",
        type=str,
        default=None,
        help="Size of the validation images, 'height,width' (a bucket's, say); default: --resolution square.",
    )
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the Hugging Face Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `hf auth login`).")
    parser.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository to push to; default: the output folder's name."
    )
    args = parser.parse_args(argv)

    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("no training data: pass --dataset_name (hub id or local dataset folder) or --train_data_dir")
    positive = "resolution train_batch_size gradient_accumulation_steps checkpointing_steps validation_epochs"
    for name in (positive + " logging_steps").split():
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ["max_train_steps", "checkpoints_total_limit", "max_train_samples"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
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
    for name in ["proportion_empty_prompts", "caption_tag_dropout_rate"]:
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.keep_tokens < 0:
        parser.error(f"--keep_tokens must be 0 or more, got {args.keep_tokens}")
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


def exchange_entries(path_a, path_b):
    """Swap two directory entries in one atomic step (Linux's renameat2 with RENAME_EXCHANGE); False where the
    system or the filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    here, rename_exchange = -100, 2  # AT_FDCWD (paths are absolute or relative to the working folder)
    return renameat2(here, os.fsencode(path_a), here, os.fsencode(path_b), rename_exchange) == 0


def point_link(link, target):
    """Point the symbolic link `link` at `target` in one atomic step: a new link renamed over the old one."""
    temporary = link + ".new"
    if os.path.lexists(temporary):
        os.remove(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, link)
    fsync_folder(os.path.dirname(link))


def link_component(output_dir, name):
    """Make output_dir/<name> the relative link .pipeline/<name>. A real file is replaced by its link in one rename;
    a real folder is swapped with it in one exchange (or, where the system cannot, moved aside first)."""
    path, target = os.path.join(output_dir, name), os.path.join(PIPELINE_LINK, name)
    if os.path.islink(path) and os.readlink(path) == target:
        return
    temporary = os.path.join(output_dir, f".{name}.link")
    if os.path.lexists(temporary):
        os.remove(temporary)
    os.symlink(target, temporary)
    if os.path.isdir(path) and not os.path.islink(path):
        if not exchange_entries(temporary, path):
            os.rename(path, temporary + ".old")
            os.rename(temporary, path)
            temporary += ".old"
        shutil.rmtree(temporary)
    else:
        os.replace(temporary, path)


def next_pipeline_version(output_dir):
    numbers = [int(match.group(1)) for match in map(PIPELINE_VERSION.match, os.listdir(output_dir)) if match]
    return f".pipeline-{max(numbers, default=0) + 1}"


def publish_pipeline(partial, output_dir):
    """Make the complete pipeline in the folder `partial` the one output_dir holds, atomically. It becomes a hidden
    version folder .pipeline-<n>; every component in output_dir (model_index.json, unet/, ...) is a relative link
    through the link .pipeline; and one rename, pointing .pipeline at the new version, switches them all. So at every
    instant, crash or not, from_pretrained(output_dir) loads the old pipeline or the new one. Where symbolic links
    cannot be made (Windows without developer mode), components are moved in one at a time, with a warning."""
    fsync_tree(partial)
    link = os.path.join(output_dir, PIPELINE_LINK)
    components = sorted(os.listdir(partial))
    try:
        os.symlink(PIPELINE_LINK, link + ".probe")
        os.remove(link + ".probe")
    except (OSError, NotImplementedError):
        logger.warning(f"no symbolic links in {output_dir}: the pipeline is replaced one component at a time")
        for name in components:
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(partial, name), target)
        os.rmdir(partial)
        return
    shown = [name for name in components if os.path.lexists(os.path.join(output_dir, name))]
    if any(not os.path.islink(os.path.join(output_dir, name)) for name in shown):
        # Saved as real files and folders (by an older version, or by diffusers' own script): a snapshot of what
        # output_dir shows now (hard links, no extra space) first becomes the current version, entry for entry.
        snapshot = os.path.join(output_dir, next_pipeline_version(output_dir))
        os.makedirs(snapshot)
        for name in shown:
            source = os.path.join(output_dir, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(snapshot, name), copy_function=os.link)
            else:
                os.link(source, os.path.join(snapshot, name))
        fsync_tree(snapshot)
        point_link(link, os.path.basename(snapshot))
    previous = os.readlink(link) if os.path.islink(link) else None
    for name in components:  # a link to a component the current version lacks points nowhere until the switch
        link_component(output_dir, name)
    version = next_pipeline_version(output_dir)
    os.rename(partial, os.path.join(output_dir, version))
    fsync_folder(output_dir)
    point_link(link, version)  # the one step that switches every component
    for name in os.listdir(output_dir):  # links to components the new pipeline does not have
        path = os.path.join(output_dir, name)
        if os.path.islink(path) and os.readlink(path).startswith(PIPELINE_LINK + os.sep) and not os.path.exists(path):
            os.remove(path)
    if previous is not None and previous != version:
        shutil.rmtree(os.path.join(output_dir, previous), ignore_errors=True)


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


def parse_buckets(text):
    """--aspect_ratio_buckets "h,w;h,w;...": the buckets as (height, width) pairs; None when not given."""
    if text is None:
        return None
    buckets = []
    for part in text.replace(" ", "").strip(";").split(";"):
        try:
            height, width = (int(side) for side in part.split(","))
        except ValueError:
            raise ValueError(
                f"--aspect_ratio_buckets: {part!r} is not 'height,width' (e.g. '512,512;384,640')"
            ) from None
        if height < 8 or width < 8 or height % 8 or width % 8:
            raise ValueError(f"--aspect_ratio_buckets: {height},{width} has a side that is not a multiple of 8")
        buckets.append((height, width))
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"--aspect_ratio_buckets {text!r}: a bucket is listed twice")
    return buckets


def bucket_step(resolution, model_factor):
    """The multiple every generated bucket side is made of: what the VAE and the UNet's downsampling need
    (`model_factor`, 64 for Stable Diffusion), and at least an eighth of the resolution (64 at 512, as kohya's
    default), so the number of buckets stays small."""
    return model_factor * max(1, resolution // 8 // model_factor)


def generate_buckets(resolution, step, max_ratio=4.0):
    """Buckets of at most resolution² pixels with both sides multiples of `step`, no side under half the resolution
    and aspect ratios from 1:max_ratio to max_ratio:1: for each landscape width, the tallest height that fits, and
    each of those turned to portrait too (17 buckets at 512 with step 64). Sorted from tall to wide."""
    shortest = max(resolution // 2 // step * step, step)
    buckets = set()
    for width in range(resolution // step * step, resolution * resolution // shortest + 1, step):
        height = min(resolution * resolution // width // step * step, width // step * step)
        if height >= shortest and width / height <= max_ratio:
            buckets.update({(height, width), (width, height)})
    return sorted(buckets, key=lambda bucket: (bucket[1] / bucket[0], bucket[0]))


def assign_buckets(sizes, buckets, no_upscale, step):
    """The bucket of each image, given its (width, height): the one nearest its aspect ratio (in log ratio). With
    no_upscale only buckets that fit inside the image count, and an image smaller than all of them gets a bucket of
    its own size (cut down to multiples of `step`). Returns the bucket index of every image and the buckets,
    extended with those own sizes."""
    buckets = list(buckets)
    assigned = []
    for width, height in sizes:
        candidates = range(len(buckets))
        if no_upscale:
            candidates = [i for i in candidates if buckets[i][0] <= height and buckets[i][1] <= width]
            if not candidates:
                own = (max(height // step, 1) * step, max(width // step, 1) * step)
                if own not in buckets:
                    buckets.append(own)
                candidates = [buckets.index(own)]
        ratio = math.log(width / height)
        assigned.append(min(candidates, key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - ratio), i)))
    return assigned, buckets


def bucket_batches(bucket_of_row, global_batch_size, seed, epoch):
    """The epoch's global batches as lists of (row, weight), every batch from one bucket: each bucket's rows shuffled,
    cut into batches (cut_into_batches: a small bucket still trains, and the number of batches is the same every
    epoch), then the batches shuffled; all a pure function of (seed, epoch)."""
    rows_by_bucket = {}
    for row, bucket in enumerate(bucket_of_row):
        rows_by_bucket.setdefault(int(bucket), []).append(row)
    batches = []
    for bucket, rows in sorted(rows_by_bucket.items()):
        order = np.random.default_rng(derive_seed(seed, epoch, BUCKET_SEED_KEY, bucket)).permutation(rows).tolist()
        batches.extend(cut_into_batches(order, global_batch_size))
    batch_order = np.random.default_rng(derive_seed(seed, epoch, BUCKET_SEED_KEY)).permutation(len(batches))
    return [batches[index] for index in batch_order]


def describe_buckets(bucket_of_row, buckets, global_batch_size):
    """The bucket histogram for the log: images and batches per bucket, largest first."""
    counts = np.bincount(np.asarray(bucket_of_row), minlength=len(buckets))
    lines = [
        f"  {buckets[i][0]}x{buckets[i][1]} (h x w): {counts[i]} images, {math.ceil(counts[i] / global_batch_size)} "
        f"batches"
        for i in np.argsort(-counts, kind="stable")
        if counts[i]
    ]
    return "\n".join(lines)


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


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """How a caption changes at each use, built once from the flags in main()."""

    proportion_empty_prompts: float = 0.0  # chance that a use sees the empty caption
    shuffle_caption: bool = False  # shuffle the comma-separated tags
    keep_tokens: int = 0  # tags at the start that stay in place and are never dropped
    caption_tag_dropout_rate: float = 0.0  # chance that each other tag is dropped


def edit_caption(caption, rng, config):
    """The caption as this use sees it. Tag-style captions ("1girl, red hair, smiling") get their comma-separated tags
    dropped and shuffled, the first config.keep_tokens tags kept in place; then the whole caption is replaced by the
    empty one with probability config.proportion_empty_prompts, so the model also learns the unconditional picture
    that classifier-free guidance needs. Every draw comes from this use's `rng`."""
    if config.shuffle_caption or config.caption_tag_dropout_rate > 0:
        tags = [tag.strip() for tag in caption.split(",")]
        kept, rest = tags[: config.keep_tokens], tags[config.keep_tokens :]
        if config.caption_tag_dropout_rate > 0:
            rest = [tag for tag in rest if rng.random() >= config.caption_tag_dropout_rate]
        if config.shuffle_caption:
            rest = [rest[index] for index in rng.permutation(len(rest))]
        caption = ", ".join(kept + rest)
    if config.proportion_empty_prompts > 0 and rng.random() < config.proportion_empty_prompts:
        caption = ""
    return caption


def load_image_caption_dataset(args, seed):
    """The training rows as a datasets.Dataset, with both columns checked; images stay undecoded until used."""
    if args.dataset_name is not None:
        source = f"--dataset_name {args.dataset_name}"
        looks_local = args.dataset_name.startswith(("/", "./", "../", "~")) or os.path.exists(args.dataset_name)
        if looks_local and not os.path.exists(os.path.expanduser(args.dataset_name)):
            raise FileNotFoundError(f"{source}: no such folder")
        name = os.path.expanduser(args.dataset_name) if looks_local else args.dataset_name
        try:
            dataset = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
        except Exception as err:
            raise RuntimeError(f"{source}: could not load a 'train' split ({type(err).__name__}: {err})") from err
    else:
        source = f"--train_data_dir {args.train_data_dir}"
        if not os.path.isdir(args.train_data_dir):
            raise FileNotFoundError(f"{source}: no such folder")
        try:
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir, split="train"
            )
        except Exception as err:
            raise RuntimeError(f"{source}: not a readable imagefolder ({type(err).__name__}: {err})") from err
    for flag, column in [("--image_column", args.image_column), ("--caption_column", args.caption_column)]:
        if column not in dataset.column_names:
            raise ValueError(
                f"{flag} '{column}' is not a column of {source}; its columns are: {', '.join(dataset.column_names)}"
            )
    if len(dataset) == 0:
        raise ValueError(f"{source} has no rows")
    if isinstance(dataset.features[args.image_column], datasets.Image):
        # Decode ourselves, so an unreadable file is reported by name.
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(args.max_train_samples, len(dataset))))
    return dataset


class ImageCaptionDataset:
    """Rows -> {pixel_values (CHW in [-1, 1]), input_ids} as numpy arrays. Indexed by (epoch, row) keys: crop, flip and
    caption edits are drawn from an RNG seeded by (seed, epoch, row), so a resumed run sees the same samples."""

    def __init__(self, rows, tokenizer, args, seed):
        self.rows, self.tokenizer, self.args, self.seed = rows, tokenizer, args, seed
        self.resample = getattr(Image.Resampling, args.image_interpolation_mode.upper())
        self.caption_config = CaptionConfig(
            proportion_empty_prompts=args.proportion_empty_prompts,
            shuffle_caption=args.shuffle_caption,
            keep_tokens=args.keep_tokens,
            caption_tag_dropout_rate=args.caption_tag_dropout_rate,
        )
        # Set by setup_buckets(): each row's bucket and the buckets' (height, width); None crops squares.
        self.bucket_of_row = None
        self.buckets = None
        # Set by build_caches(): row -> (latent means, stds) per view; (caption -> index, text embeddings).
        self.latent_cache = None
        self.text_cache = None

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
        return verify_image(*self.image_source(row))

    def transform(self, image, row, rng, flip=None):
        if self.buckets is None:
            height = width = size = self.args.resolution
            # Shorter side to `size`, keeping the aspect ratio (the same rule as torchvision's resize).
            if image.width <= image.height:
                new_size = (size, int(size * image.height / image.width))
            else:
                new_size = (int(size * image.width / image.height), size)
            crop_rng = rng
        else:
            # Resized to cover its bucket, then cropped; a random crop is drawn once per image (from the seed and the
            # row), as in the PyTorch twin, where --cache_latents relies on it.
            height, width = self.buckets[self.bucket_of_row[row]]
            scale = max(height / image.height, width / image.width)
            new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            crop_rng = np.random.default_rng([self.seed, BUCKET_SEED_KEY, row])
        image = image.resize(new_size, resample=self.resample)
        if self.args.center_crop:
            top, left = int(round((image.height - height) / 2.0)), int(round((image.width - width) / 2.0))
        else:
            top = int(crop_rng.integers(0, image.height - height + 1))
            left = int(crop_rng.integers(0, image.width - width + 1))
        image = image.crop((left, top, left + width, top + height))
        if flip is None:
            flip = self.args.random_flip and rng.random() < 0.5
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0  # the VAE's input range

    def pick_caption(self, value, row, rng):
        if isinstance(value, str):
            return value
        choices = self.caption_choices(value, row)
        return choices[int(rng.integers(len(choices)))]

    def caption_choices(self, value, row):
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(
            f"--caption_column '{self.args.caption_column}', row {row}: "
            f"expected a string or a list of strings, got {value!r}"
        )

    def __getitem__(self, key):
        epoch, row = key
        rng = np.random.default_rng([self.seed, epoch, row])
        example = {}
        if self.latent_cache is None:
            example["pixel_values"] = self.transform(self.open_image(row), row, rng)
        else:
            # The same draws as transform(): with a fixed crop only the flip is random.
            view = int(self.args.random_flip and rng.random() < 0.5)
            means, stds = self.latent_cache[row]
            example["latent_mean"], example["latent_std"] = means[view], stds[view]
        caption = self.pick_caption(self.rows[row][self.args.caption_column], row, rng)
        caption = edit_caption(caption, rng, self.caption_config)
        if self.text_cache is None:
            input_ids = self.tokenizer(
                caption, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True
            ).input_ids
            example["input_ids"] = np.asarray(input_ids, dtype=np.int32)
        else:
            index_of_caption, embeddings = self.text_cache
            example["encoder_hidden_states"] = embeddings[index_of_caption[caption]]
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
        from jax.experimental import multihost_utils

        count = int(np.sum(multihost_utils.process_allgather(np.array(count))))
        sizes = np.sum(multihost_utils.process_allgather(sizes), axis=0)  # each row is filled by one process
    if count:
        listed = "\n  ".join(sorted(problems)[:10]) or "(listed by the other processes)"
        raise ValueError(f"{count} of {len(dataset)} images cannot be read; fix or remove them:\n  {listed}")
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
            from jax.experimental import multihost_utils

            encoded = multihost_utils.process_allgather(encoded, tiled=True)
        outputs.append([np.asarray(part)[: len(items) - start] for part in encoded])
    return tuple(np.concatenate(parts) for parts in zip(*outputs, strict=True))


def build_caches(dataset, frozen, tokenizer, args, global_batch_size, batch_sharding):
    """--cache_latents: the VAE's latent distribution (mean, std) of every image (and its mirror image with
    --random_flip), at its bucket's size, so the VAE leaves the jitted step. --cache_text_embeddings: the text
    encoder's output for every caption the data holds, and the empty one."""
    if args.cache_latents:

        @jax.jit
        def encode_images(vae_params, pixel_values):
            encoded = frozen.vae.apply(
                {"params": vae_params}, pixel_values, deterministic=True, method=frozen.vae.encode
            )
            return encoded.latent_dist.mean, encoded.latent_dist.std

        def prepare(share):
            return np.stack(
                [dataset.transform(dataset.open_image(row), row, None, flip=view == 1) for row, view in share]
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
        logger.info(f"Cached latents: {len(dataset)} images x {views} views, {size / 2**20:.1f} MiB of host memory")
    if args.cache_text_embeddings:
        captions = {"": 0}  # a dropped caption (--proportion_empty_prompts) is the empty one
        for row, value in enumerate(dataset.rows.select_columns([args.caption_column])[args.caption_column]):
            for caption in dataset.caption_choices(value, row):
                captions.setdefault(caption, len(captions))

        @jax.jit
        def encode_text(text_encoder_params, input_ids):
            return (frozen.text_encoder(input_ids, params=text_encoder_params, train=False)[0],)

        def prepare(share):
            ids = tokenizer(share, max_length=tokenizer.model_max_length, padding="max_length", truncation=True)
            return np.asarray(ids.input_ids, np.int32)

        encode = functools.partial(encode_text, frozen.text_encoder_params)
        description = "Caching text embeddings"
        (embeddings,) = encode_once(list(captions), prepare, encode, global_batch_size, batch_sharding, description)
        dataset.text_cache = (captions, embeddings)
        logger.info(
            f"Cached text embeddings: {embeddings.shape} {embeddings.dtype}, {embeddings.nbytes / 2**20:.1f} MiB"
        )


def setup_buckets(dataset, sizes, args, model_factor, global_batch_size):
    """--use_aspect_ratio_buckets: each image's bucket, from --aspect_ratio_buckets or generated from --resolution;
    logs the bucket histogram."""
    step = bucket_step(args.resolution, model_factor)
    if args.aspect_ratio_buckets is not None:
        buckets = args.aspect_ratio_buckets
        for height, width in buckets:
            if height % model_factor or width % model_factor:
                raise ValueError(
                    f"--aspect_ratio_buckets: {height},{width} has a side that is not a multiple of {model_factor}, "
                    "which this model's VAE and UNet downsampling need"
                )
        origin = f"{len(buckets)} from --aspect_ratio_buckets"
    else:
        buckets = generate_buckets(args.resolution, step)
        origin = f"{len(buckets)} generated for --resolution {args.resolution}: sides multiples of {step}, 1:4 to 4:1"
    dataset.bucket_of_row, dataset.buckets = assign_buckets(sizes, buckets, args.bucket_no_upscale, model_factor)
    if len(dataset.buckets) > len(buckets):
        origin += f", {len(dataset.buckets) - len(buckets)} more for images smaller than all (--bucket_no_upscale)"
    histogram = describe_buckets(dataset.bucket_of_row, dataset.buckets, global_batch_size)
    logger.info(f"Aspect-ratio buckets ({origin}):\n{histogram}")


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

    vae_params: Any
    text_encoder_params: Any
    scheduler_state: Any
    vae: Any = struct.field(pytree_node=False)
    text_encoder: Any = struct.field(pytree_node=False)
    noise_scheduler: Any = struct.field(pytree_node=False)


def encode_batch(frozen, batch, rng):
    """The batch's latents and text conditioning, from the frozen VAE and text encoder, or from their caches
    (build_caches). The VAE sample is drawn from `rng`."""
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
        encoder_hidden_states = batch["encoder_hidden_states"]  # --cache_text_embeddings
    else:
        # The frozen text encoder's last hidden state conditions the UNet through cross-attention.
        input_ids = batch["input_ids"]
        encoder_hidden_states = frozen.text_encoder(input_ids, params=frozen.text_encoder_params, train=False)[0]
    return jax.lax.stop_gradient((latents, encoder_hidden_states))


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
    """The loss `params` give on one batch: encode, then the denoising loss. Pure: every draw comes from `rng`."""
    sample_rng, loss_rng = jax.random.split(rng)
    latents, encoder_hidden_states = encode_batch(frozen, batch, sample_rng)

    def unet(noisy_latents, timesteps, encoder_hidden_states):
        variables = {"params": params}
        return state.apply_fn(variables, noisy_latents, timesteps, encoder_hidden_states, train=True).sample

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


def validate(render, state, frozen, tokenizer, args, seed, global_step, tag, is_main_process):
    """Render the validation prompts with the weights that would be saved now (the EMA with --use_ema), and with
    --ema_validation raw or both, with the raw trained weights. Every process renders; the main process saves."""
    for suffix, ema_weights in validation_weights(args):
        unet_params = state.ema_params if ema_weights else evaluation_params(state, args)
        params = {"unet": unet_params, "vae": frozen.vae_params, "text_encoder": frozen.text_encoder_params}
        images = render_validation_images(render, params, tokenizer, args.validation_prompts, seed)
        if is_main_process:
            save_validation_grid(images, args.validation_prompts, args.output_dir, tag + suffix, global_step)


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


def save_pipeline(unet_params, folder, args):
    """The full pipeline as PyTorch diffusers with safetensors weights: the trained UNet converted from Flax, the
    frozen parts (text encoder, VAE, tokenizer, scheduler) copied byte for byte from the source. Written to a
    temporary folder first, so a crash never leaves a half-written model over a good one."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.modeling_pytorch_flax_utils import load_flax_weights_in_pytorch_model

    partial = os.path.join(args.output_dir, ".pipeline.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for component in ["scheduler", "tokenizer", "text_encoder", "vae"]:
        shutil.copytree(os.path.join(folder, component), os.path.join(partial, component))
    # The model now predicts this target on this schedule: the saved scheduler must say so, or inference silently
    # goes wrong.
    scheduler_config = os.path.join(partial, "scheduler", "scheduler_config.json")
    with open(scheduler_config) as f:
        config = inference_scheduler_config(json.load(f), args)
    with open(scheduler_config, "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "model_index.json")) as f:
        model_index = json.load(f)
    # The source's safety checker is not downloaded (nothing the user did not name); the saved pipeline has none.
    model_index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    model_index["scheduler"] = ["diffusers", config["_class_name"]]  # the class pipelines load it as
    with open(os.path.join(partial, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=2)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    unet = load_flax_weights_in_pytorch_model(unet, jax.tree_util.tree_map(np.array, jax.device_get(unet_params)))
    try:
        unet.to(torch.float32).save_pretrained(os.path.join(partial, "unet"), safe_serialization=True)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(write_failure("the pipeline", args.output_dir, err)) from err
    publish_pipeline(partial, args.output_dir)


# ----------------------------------------------------------------------------------------------------------------------
# The single file the UIs load: the original Stable Diffusion (LDM) key layout
# ----------------------------------------------------------------------------------------------------------------------
SINGLE_FILE_DTYPES = ["fp16", "bf16", "fp32"]
SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
SD_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
# Inside a ResNet block the original names its layers by position in a Sequential.
LDM_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
LDM_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
LDM_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP (SD 2.x) names for the layers of a transformers CLIP encoder layer.
OPEN_CLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def single_file_layout(unet_config, vae_config, text_config):
    """The layout, "sd1" (CLIP ViT-L text encoder) or "sd2" (OpenCLIP), of models the original Stable Diffusion code
    defines; a ValueError naming what differs otherwise (an SDXL, LCM, upscaler or unCLIP UNet, another VAE or text
    encoder), since no UI would load a file with an invented layout."""
    problems = []
    layers = unet_config.get("layers_per_block")
    if not isinstance(layers, int):
        problems.append(f"UNet layers_per_block {layers!r} (one number in SD)")
    for key in ["addition_embed_type", "class_embed_type", "encoder_hid_dim", "time_cond_proj_dim"]:
        if unet_config.get(key) is not None:
            problems.append(f"UNet {key}={unet_config[key]!r} (SD has none)")
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"UNet mid_block_type {unet_config['mid_block_type']!r}")
    if unet_config.get("transformer_layers_per_block", 1) != 1:
        problems.append(f"UNet transformer_layers_per_block {unet_config['transformer_layers_per_block']!r}")
    down, up = list(unet_config.get("down_block_types", [])), list(unet_config.get("up_block_types", []))
    if any(kind not in SD_DOWN_BLOCKS for kind in down) or any(kind not in SD_UP_BLOCKS for kind in up):
        problems.append(f"UNet blocks {down} / {up} (SD has only {SD_DOWN_BLOCKS} / {SD_UP_BLOCKS})")
    elif [kind.startswith("CrossAttn") for kind in down] != [kind.startswith("CrossAttn") for kind in reversed(up)]:
        problems.append(f"UNet up blocks {up} do not mirror the down blocks {down}")
    vae_blocks = set(vae_config.get("down_block_types", [])) | set(vae_config.get("up_block_types", []))
    if vae_blocks != {"DownEncoderBlock2D", "UpDecoderBlock2D"} or not vae_config.get("mid_block_add_attention", True):
        problems.append(f"VAE blocks {sorted(vae_blocks)}")
    if text_config.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        problems.append(f"text encoder model_type {text_config.get('model_type')!r} (SD uses CLIP)")
    if problems:
        raise ValueError(
            "--save_single_file: no original Stable Diffusion single-file layout for this model: " + "; ".join(problems)
        )
    # The one architectural difference between the two text encoders: OpenCLIP ViT-H uses GELU, OpenAI's CLIP ViT-L
    # its "quick" approximation.
    return "sd1" if text_config.get("hidden_act", "quick_gelu") == "quick_gelu" else "sd2"


def ldm_unet_prefixes(unet_config):
    """(diffusers prefix, original prefix, renames inside) for every block of an SD UNet. The original numbers its
    input blocks and output blocks in one running sequence each: conv_in, then per level its ResNet(+attention)
    layers and its downsampler; per up level, layers+1 ResNet(+attention) layers, the last with the upsampler."""
    layers = unet_config["layers_per_block"]
    prefixes = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", LDM_RESNET_NAMES),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", LDM_RESNET_NAMES),
    ]
    for level in range(len(unet_config["down_block_types"])):
        for layer in range(layers):
            index = 1 + level * (layers + 1) + layer
            prefixes.append((f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{index}.0.", LDM_RESNET_NAMES))
            prefixes.append((f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{index}.1.", {}))
        index = (level + 1) * (layers + 1)
        prefixes.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", {}))
    for level, kind in enumerate(unet_config["up_block_types"]):
        for layer in range(layers + 1):
            index = level * (layers + 1) + layer
            prefixes.append((f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{index}.0.", LDM_RESNET_NAMES))
            prefixes.append((f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{index}.1.", {}))
        # The upsampler follows the ResNet, and the attention where the level has one.
        position = 2 if kind.startswith("CrossAttn") else 1
        index = (level + 1) * (layers + 1) - 1
        prefixes.append((f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{index}.{position}.", {}))
    return prefixes


def ldm_vae_prefixes(vae_config):
    """(diffusers prefix, original prefix, renames inside) for every block of the SD VAE. The original numbers the
    decoder's levels from the bottom (the encoder's order), diffusers from the top."""
    levels, layers = len(vae_config["block_out_channels"]), vae_config["layers_per_block"]
    prefixes = [(name, name, {}) for name in ["encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in."]]
    prefixes += [(name, name, {}) for name in ["decoder.conv_out.", "quant_conv.", "post_quant_conv."]]
    for part in ["encoder", "decoder"]:
        prefixes += [
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", LDM_VAE_RESNET_NAMES),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", LDM_VAE_ATTENTION_NAMES),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", LDM_VAE_RESNET_NAMES),
        ]
    for level in range(levels):
        for layer in range(layers):
            prefixes.append(
                (
                    f"encoder.down_blocks.{level}.resnets.{layer}.",
                    f"encoder.down.{level}.block.{layer}.",
                    LDM_VAE_RESNET_NAMES,
                )
            )
        prefixes.append((f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample.", {}))
        up = levels - 1 - level
        for layer in range(layers + 1):
            prefixes.append(
                (f"decoder.up_blocks.{level}.resnets.{layer}.", f"decoder.up.{up}.block.{layer}.", LDM_VAE_RESNET_NAMES)
            )
        prefixes.append((f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{up}.upsample.", {}))
    return prefixes


def rename_by_prefix(state, prefixes, what):
    """state with every key's prefix replaced by its original one (longest prefix wins) and the name inside the
    block renamed; a key no prefix covers is an error, so a layout change never silently drops a weight."""
    ordered = sorted(prefixes, key=lambda entry: -len(entry[0]))
    renamed = {}
    for key, tensor in state.items():
        match = next((entry for entry in ordered if key.startswith(entry[0])), None)
        if match is None:
            raise ValueError(f"{what} weight {key} has no name in the original Stable Diffusion layout")
        old, new, inner = match
        rest = key[len(old) :]
        for name, original in inner.items():
            if rest.startswith(name + "."):
                rest = original + rest[len(name) :]
                break
        renamed[new + rest] = tensor
    return renamed


def open_clip_state(state):
    """transformers CLIP text-model weights in OpenCLIP's names (SD 2.x). OpenCLIP keeps the query, key and value
    projections in one in_proj matrix, stacked in that order."""
    import torch

    converted = {}
    for key, tensor in state.items():
        name = key.removeprefix("text_model.")
        if name.startswith("encoder.layers."):
            index, layer_name = name.removeprefix("encoder.layers.").split(".", 1)
            prefix = f"transformer.resblocks.{index}."
            if layer_name.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                if layer_name.startswith("self_attn.q_proj."):
                    kind = layer_name.rsplit(".", 1)[1]
                    parts = [state[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    converted[prefix + f"attn.in_proj_{kind}"] = torch.cat(parts)
                continue
            for old, new in OPEN_CLIP_LAYER_NAMES.items():
                if layer_name.startswith(old + "."):
                    layer_name = new + layer_name[len(old) :]
                    break
            else:
                raise ValueError(f"text encoder weight {key} has no name in the OpenCLIP layout")
            converted[prefix + layer_name] = tensor
        elif name == "embeddings.token_embedding.weight":
            converted["token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            converted["positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            converted["ln_final." + name.removeprefix("final_layer_norm.")] = tensor
        elif name != "embeddings.position_ids":
            raise ValueError(f"text encoder weight {key} has no name in the OpenCLIP layout")
    return converted


def component_configs(pipeline_dir):
    """The UNet, VAE and text encoder configs of a pipeline folder."""
    configs = []
    for name in ["unet", "vae", "text_encoder"]:
        with open(os.path.join(pipeline_dir, name, "config.json")) as f:
            configs.append(json.load(f))
    return configs


def read_component_weights(folder):
    """A diffusers/transformers component's weights, from its one safetensors file or its shards."""
    import safetensors.torch

    names = [name for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")]
    if not names:
        raise ValueError(f"{folder} has no .safetensors weights to write into the single file")
    state = {}
    for name in names:
        state.update(safetensors.torch.load_file(os.path.join(folder, name)))
    return state


def original_layout_state(pipeline_dir):
    """(layout, state) of a saved diffusers pipeline, in the original Stable Diffusion keys that A1111/Forge,
    ComfyUI and InvokeAI load: model.diffusion_model.* (UNet), first_stage_model.* (VAE) and
    cond_stage_model.transformer.* (SD 1.x CLIP) or cond_stage_model.model.* (SD 2.x OpenCLIP)."""
    unet_config, vae_config, text_config = component_configs(pipeline_dir)
    layout = single_file_layout(unet_config, vae_config, text_config)
    unet = rename_by_prefix(
        read_component_weights(os.path.join(pipeline_dir, "unet")), ldm_unet_prefixes(unet_config), "UNet"
    )
    vae = rename_by_prefix(
        read_component_weights(os.path.join(pipeline_dir, "vae")), ldm_vae_prefixes(vae_config), "VAE"
    )
    # The original VAE's attention projections are 1x1 convolutions, diffusers' are linear layers: same numbers.
    for key, tensor in vae.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            vae[key] = tensor.reshape(*tensor.shape, 1, 1)
    text = {}
    for key, tensor in read_component_weights(os.path.join(pipeline_dir, "text_encoder")).items():
        # transformers 5 may save without the "text_model." prefix that the original layout keeps.
        text[key if key.startswith("text_model.") else "text_model." + key] = tensor
    if layout == "sd1":
        text = {"transformer." + key: tensor for key, tensor in text.items() if not key.endswith("position_ids")}
    else:
        text = {"model." + key: tensor for key, tensor in open_clip_state(text).items()}
    state = {"model.diffusion_model." + key: tensor for key, tensor in unet.items()}
    state.update({"first_stage_model." + key: tensor for key, tensor in vae.items()})
    state.update({"cond_stage_model." + key: tensor for key, tensor in text.items()})
    return layout, state


def write_single_file(state, path, dtype, metadata):
    """state as one .safetensors file in `dtype` ("fp16", "bf16" or "fp32"), with `metadata` in its header; written
    beside `path` and renamed over it, so it appears only when complete."""
    import safetensors.torch
    import torch

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    state = {key: tensor.to(torch_dtype).contiguous() for key, tensor in state.items()}
    partial = path + ".partial"
    try:
        safetensors.torch.save_file(state, partial, metadata={"format": "pt", **metadata})
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as err:
        if os.path.exists(partial):
            os.remove(partial)
        raise OSError(write_failure("the single-file checkpoint", os.path.dirname(path), err)) from err
    fsync_folder(os.path.dirname(path))


def single_file_metadata(layout, prediction_type, zero_terminal_snr, resolution, base_model, global_step, title):
    """The SAI model spec header (github.com/Stability-AI/ModelSpec) that UIs read to tell SD 1.x, SD 2.x-512 and
    SD 2.x-768-v apart, plus how the model was trained."""
    v_prediction = prediction_type == "v_prediction"
    if layout == "sd1":
        architecture, implementation = "stable-diffusion-v1", "https://github.com/CompVis/stable-diffusion"
    else:
        architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        implementation = "https://github.com/Stability-AI/stablediffusion"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "training.base_model": base_model,
        "training.global_step": str(global_step),
        "training.prediction_type": prediction_type,
        "training.zero_terminal_snr": str(bool(zero_terminal_snr)).lower(),
    }


def save_single_file(args, prediction_type, global_step):
    """output_dir/<its name>.safetensors from the pipeline just saved there."""
    title = os.path.basename(os.path.abspath(args.output_dir))
    path = os.path.join(args.output_dir, title + ".safetensors")
    layout, state = original_layout_state(args.output_dir)
    metadata = single_file_metadata(
        layout,
        prediction_type,
        args.rescale_betas_zero_snr,
        args.resolution,
        args.pretrained_model_name_or_path,
        global_step,
        title,
    )
    write_single_file(state, path, args.single_file_dtype, metadata)
    logger.info(f"Saved the single-file checkpoint ({layout}, {args.single_file_dtype}) to {os.path.abspath(path)}")


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
    # Only the main process writes (but for each process's share of a checkpoint's arrays), and only while it holds
    # output_dir: a second run into it is refused.
    output_lock = lock_output_dir(args.output_dir) if is_main_process else None
    stop_request = StopRequest()
    resume_path = find_resume_checkpoint(args)
    resume_metadata = read_checkpoint_metadata(resume_path)
    if resume_path is not None and bool(resume_metadata.get("use_ema")) != args.use_ema:
        saved = "with" if resume_metadata.get("use_ema") else "without"
        raise ValueError(
            f"{resume_path} was saved {saved} --use_ema: resume it the same way, or start a new output_dir"
        )
    seed = choose_seed(args, resume_metadata)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    # ------------------------------------------------------------------------------------------------ load models
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTokenizerFast

    weight_dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    folder = resolve_pipeline_folder(args)
    if args.save_single_file:  # refused now rather than after training
        single_file_layout(*component_configs(folder))
    tokenizer = CLIPTokenizerFast.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = load_flax_text_encoder(folder, args.variant, weight_dtype)
    vae, vae_params = load_flax_model(FlaxAutoencoderKL, folder, "vae", args.variant, weight_dtype)
    if args.gradient_checkpointing:
        enable_block_rematerialisation()
    unet, unet_params = load_flax_model(FlaxUNet2DConditionModel, folder, "unet", args.variant, weight_dtype)
    # Lin et al. 2023 (arXiv:2305.08891): rescaled betas reach zero SNR at the last timestep, as sampling starts.
    noise_scheduler, scheduler_state = load_noise_scheduler(folder, args)
    frozen = FrozenModels(
        vae_params=vae_params,
        text_encoder_params=text_encoder.params,
        scheduler_state=scheduler_state,
        vae=vae,
        text_encoder=text_encoder,
        noise_scheduler=noise_scheduler,
    )
    render = validation_renderer(folder, args, unet, vae, text_encoder, tokenizer) if args.validation_prompts else None
    prediction_type = args.prediction_type or noise_scheduler.config.prediction_type
    loss_config = LossConfig(
        prediction_type=prediction_type,
        snr_gamma=args.snr_gamma,
        noise_offset=args.noise_offset,
        input_perturbation=args.input_perturbation,
        **recipe_fields(args, prediction_type, noise_scheduler.config.num_train_timesteps),
    )

    # ------------------------------------------------------------------------------------------------------- data
    train_dataset = ImageCaptionDataset(load_image_caption_dataset(args, seed), tokenizer, args, seed)
    image_sizes = check_images(train_dataset)
    global_batch_size = args.train_batch_size * jax.device_count()
    if args.use_aspect_ratio_buckets:
        # The VAE shrinks images by 2 per block after its first; the UNet halves latents per down block after its first.
        model_factor = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.down_block_types) - 1)
        setup_buckets(train_dataset, image_sizes, args, model_factor, global_batch_size)
        epoch_global_batches = functools.partial(bucket_batches, train_dataset.bucket_of_row, global_batch_size, seed)
    else:
        epoch_global_batches = functools.partial(shuffled_batches, len(train_dataset), global_batch_size, seed)
    batches_per_epoch = len(epoch_global_batches(0))  # the same every epoch
    if batches_per_epoch < args.gradient_accumulation_steps:
        raise ValueError(
            f"{len(train_dataset)} examples make {batches_per_epoch} global batches of {global_batch_size} "
            f"({args.train_batch_size} per device x {jax.device_count()} devices); "
            f"one update needs {args.gradient_accumulation_steps}"
        )
    frozen = jax.device_put(frozen, replicated)
    if args.cache_latents or args.cache_text_embeddings:
        build_caches(train_dataset, frozen, tokenizer, args, global_batch_size, batch_sharding)

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
    run_metadata = {"seed": seed, "total_batch_size": total_batch_size, "updates_per_epoch": updates_per_epoch}
    # Not part of the batch layout here: every draw is made over the global batch from the step's key, so a checkpoint
    # resumes exactly on another process count with the same global batch (tested with 2 processes and 1).
    run_metadata["process_count"] = jax.process_count()
    run_metadata["use_ema"] = args.use_ema
    run_metadata["aspect_ratio_buckets"] = [list(bucket) for bucket in train_dataset.buckets or []] or None

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
            stopping = stop_agreed(stop_request)  # a SIGTERM / SIGUSR1 on any process
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
                check_finite(trained, probe, "the UNet", global_step)
                save_checkpoint(state, args.output_dir, global_step, run_metadata, args.checkpoints_total_limit)
            if stopping:
                logger.warning(preemption_message(stop_request, global_step))
                sys.exit(PREEMPTED_EXIT_CODE)
            if global_step >= max_train_steps:
                break

        end_of_run = global_step >= max_train_steps
        if args.validation_prompts and (epoch + 1) % args.validation_epochs == 0 and not end_of_run:
            validate(render, state, frozen, tokenizer, args, seed, global_step, "validation", is_main_process)

    # ------------------------------------------------------------------------------------------------------- save
    unet_params = state.ema_params if args.use_ema else evaluation_params(state, args)
    if last_batch is not None:  # what is about to be saved, checked as every checkpoint is
        probe = float(probe_fn(unet_params, state, frozen, *last_batch))
        check_finite({"params": unet_params}, probe, "the UNet", global_step)
    if is_main_process:
        save_pipeline(unet_params, folder, args)
        logger.info(f"Saved the pipeline to {os.path.abspath(args.output_dir)}")
        if args.save_single_file:
            save_single_file(args, prediction_type, global_step)
    if args.validation_prompts:
        validate(render, state, frozen, tokenizer, args, seed, global_step, "final", is_main_process)
    if is_main_process:
        if args.push_to_hub:
            push_to_hub(args)
        output_lock.release()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Textual inversion: learn the text embedding of a new placeholder token from 3-5 images of a concept
(PyTorch + Accelerate).

Only the new embedding rows train; the text encoder, UNet and VAE stay frozen, and the result is a small
learned_embeds.safetensors that diffusers (`pipe.load_textual_inversion`) and the common UIs load.

One GPU (or CPU):
    accelerate launch textual_inversion.py \
      --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --train_data_dir=./cat_toy --learnable_property=object --placeholder_token="<cat-toy>" --initializer_token=toy \
      --resolution=512 --train_batch_size=1 --gradient_accumulation_steps=4 --max_train_steps=3000 \
      --learning_rate=5.0e-04 --scale_lr --lr_scheduler=constant --lr_warmup_steps=0 --mixed_precision=fp16 \
      --validation_prompt="a <cat-toy> on the beach" --validation_steps=500 --output_dir=textual_inversion_cat

Several GPUs: run `accelerate config` once, then `accelerate launch --multi_gpu textual_inversion.py <same flags>`.
Two CPU processes (DDP over gloo, what the tests do):
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 textual_inversion.py <same flags>
After a crash or preemption, relaunch the same command with --resume_from_checkpoint=latest: the resumed run ends
with the same embeddings as one that was never interrupted.
"""

import argparse
import concurrent.futures
import ctypes
import dataclasses
import functools
import importlib
import importlib.util
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

import diffusers
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_dream_and_update_latents
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

logger = get_logger(__name__, log_level="INFO")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Seed, step and batch layout of a checkpoint, written last into it: its presence marks the checkpoint complete.
CHECKPOINT_METADATA = "checkpoint_metadata.json"
# The second key of every validation seed, derive_seed(seed, VALIDATION_SEED_KEY, prompt index): training draws use
# four keys, so a validation image never shares its noise with a training step.
VALIDATION_SEED_KEY = 7919
LOCK_FILE = ".training.lock"  # held (an OS lock) by the run writing into output_dir; a killed run holds none
PIPELINE_LINK = ".pipeline"  # -> the current .pipeline-<n> folder; output_dir's components link through it
PIPELINE_VERSION = re.compile(r"^\.pipeline-(\d+)$")
PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after writing a checkpoint; relaunch to continue
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
OPTIMIZERS = ["adamw", "adamw_8bit", "adafactor", "lion", "prodigy", "schedule_free_adamw"]
# The optimizers that need a package of their own: module, pip package.
OPTIMIZER_PACKAGES = {
    "adamw_8bit": ("bitsandbytes", "bitsandbytes"),
    "lion": ("lion_pytorch", "lion-pytorch"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "schedule_free_adamw": ("schedulefree", "schedulefree"),
}

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
        description="Learn the text embedding of a new token from a few images (textual inversion)."
    )
    # Model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a diffusers Stable Diffusion pipeline.",
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
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="Data loading worker processes; default: 4 on GPU (with pinned memory), 0 (the main process) on CPU.",
    )
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every example image and its mirror image once before training and train from the stored latents.",
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
        help="Recompute activations in the backward pass to save memory.",
    )
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate (after warmup).")
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps x batch size x processes.",
    )
    parser.add_argument(
        "--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule."
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup optimizer updates of the schedule.")
    parser.add_argument(
        "--lr_num_cycles", type=int, default=1, help="Hard restarts of the cosine_with_restarts schedule."
    )
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
        choices=["no", "fp16", "bf16"],
        help="Mixed precision for the frozen UNet and VAE.",
    )
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention (needs xformers; PyTorch SDPA is the default).",
    )
    parser.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the UNet and the text encoder with torch.compile: a slower start (minutes), faster steps.",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by distributed launchers; do not pass by hand.")
    # Checkpointing and saving
    parser.add_argument(
        "--output_dir",
        type=str,
        default="text-inversion-model",
        help="Where the embeddings, checkpoints, validation images and logs go.",
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
        "--no_safe_serialization",
        action="store_true",
        help="Save the embeddings as .bin (torch.save) instead of .safetensors.",
    )
    parser.add_argument(
        "--save_as_full_pipeline",
        action="store_true",
        help="Also save the full pipeline with the extended tokenizer and text encoder.",
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
    # Logging and validation
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
    parser.add_argument(
        "--validation_epochs",
        type=int,
        default=None,
        help="Deprecated: validate every this many epochs (converted to --validation_steps).",
    )
    parser.add_argument(
        "--report_to", type=str, default="tensorboard", help="Tracker: tensorboard, wandb, comet_ml, all, or none."
    )
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir.")
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the embeddings and the full pipeline to the Hugging Face Hub.",
    )
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `hf auth login`).")
    parser.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository to push to; default: the output folder's name."
    )
    args = parser.parse_args(argv)

    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    positive = "num_vectors repeats resolution train_batch_size max_train_steps gradient_accumulation_steps save_steps"
    for name in (positive + " checkpointing_steps validation_steps num_validation_images logging_steps").split():
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}")
    if not args.placeholder_token.strip() or any(c.isspace() for c in args.placeholder_token):
        parser.error(f"--placeholder_token {args.placeholder_token!r} must be one word without spaces")
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("--hub_token with --report_to=wandb would leak the token to wandb; use `hf auth login` instead")
    try:
        args.validation_resolution = parse_size(args.validation_resolution, args.resolution)
    except ValueError as err:
        parser.error(str(err))
    check_recipe_arguments(parser, args)
    check_optimizer_arguments(parser, args)
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
    """--optimizer and its hyperparameters, the same flags in both PyTorch scripts."""
    parser.add_argument(
        "--optimizer",
        type=str,
        default="adamw",
        choices=OPTIMIZERS,
        help="adamw, 8-bit AdamW, Adafactor, Lion, Prodigy (use --learning_rate 1) or schedule-free AdamW.",
    )
    parser.add_argument(
        "--use_8bit_adam", action="store_true", help="Same as --optimizer adamw_8bit (GPU only; needs bitsandbytes)."
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
    """--use_8bit_adam is an alias; an optional package that is missing is named before any model loads."""
    chosen = f"--optimizer {args.optimizer}"
    if args.use_8bit_adam:
        if args.optimizer not in ("adamw", "adamw_8bit"):
            parser.error(f"--use_8bit_adam and {chosen} contradict each other: pick one")
        args.optimizer, chosen = "adamw_8bit", "--use_8bit_adam"
    if args.optimizer in OPTIMIZER_PACKAGES:
        module, package = OPTIMIZER_PACKAGES[args.optimizer]
        if importlib.util.find_spec(module) is None:
            parser.error(f"{chosen} needs the {package} package: pip install {package}")
    if args.optimizer == "schedule_free_adamw" and args.lr_scheduler != "constant":
        # Schedule-free replaces the schedule (Defazio et al. 2024); its warmup is --lr_warmup_steps, inside it.
        parser.error(f"--optimizer schedule_free_adamw needs --lr_scheduler constant, got {args.lr_scheduler}")


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


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


class LearnedTokenEmbedding(torch.nn.Module):
    """The text encoder's token embedding, extended by trainable rows for the new tokens. The original table stays
    frozen and out of the optimizer, so every pre-existing row stays bit-identical, whatever the weight decay."""

    def __init__(self, base, initial_rows):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.first_new_id = base.num_embeddings
        self.learned = torch.nn.Parameter(initial_rows.clone().float())

    def forward(self, input_ids):
        is_new = input_ids >= self.first_new_id
        old = self.base(input_ids.masked_fill(is_new, 0))
        new = self.learned[(input_ids - self.first_new_id).clamp(0, len(self.learned) - 1)]
        return torch.where(is_new.unsqueeze(-1), new.to(old.dtype), old)

    def merged(self):
        """A plain nn.Embedding holding old and new rows, for saving a standard text encoder."""
        weight = torch.cat([self.base.weight.detach(), self.learned.detach().to(self.base.weight.dtype)])
        return torch.nn.Embedding.from_pretrained(weight, freeze=True)


def add_learned_embedding(text_encoder, tokenizer, placeholder_token, initializer_token, num_vectors):
    """Add the placeholder's tokens to the tokenizer and give the text encoder a LearnedTokenEmbedding whose new rows
    all start at the initializer token's embedding. Returns the new tokens, their ids and the embedding module."""
    init_id = initializer_token_id(tokenizer, initializer_token)
    placeholder_tokens, placeholder_ids = add_placeholder_tokens(tokenizer, placeholder_token, num_vectors)
    vocab_size = text_encoder.config.vocab_size
    if placeholder_ids != list(range(vocab_size, vocab_size + num_vectors)):
        raise ValueError(
            f"the tokenizer ({len(tokenizer) - num_vectors} tokens) does not match "
            f"the text encoder's vocabulary ({vocab_size})"
        )
    base_embedding = text_encoder.get_input_embeddings()
    initial_rows = base_embedding.weight.detach()[init_id].repeat(num_vectors, 1)
    learned_embedding = LearnedTokenEmbedding(base_embedding, initial_rows)
    text_encoder.set_input_embeddings(learned_embedding)
    return placeholder_tokens, placeholder_ids, learned_embedding


class TextualInversionDataset(torch.utils.data.Dataset):
    """The example images repeated --repeats times, each with a prompt from the templates holding the placeholder.
    Indexed by (epoch, index, weight) keys: the template and the flip are drawn from an RNG seeded by (seed, epoch,
    index), so the same sample is identical in a resumed run, and the cached path draws exactly what the uncached one
    does."""

    def __init__(self, image_paths, tokenizer, placeholder_text, args, seed):
        self.image_paths, self.tokenizer, self.placeholder_text = image_paths, tokenizer, placeholder_text
        self.args, self.seed = args, seed
        self.templates = STYLE_TEMPLATES if args.learnable_property == "style" else OBJECT_TEMPLATES
        self.latent_cache = None  # [image, flipped] -> VAE latent distribution parameters, set by build_latent_cache()

    def __len__(self):
        return len(self.image_paths) * self.args.repeats

    def pixels(self, image_index, flip):
        image = load_rgb(self.image_paths[image_index], self.image_paths[image_index])
        if self.args.center_crop:
            side = min(image.size)
            image = TF.center_crop(image, [side, side])
        image = TF.resize(image, [self.args.resolution, self.args.resolution], interpolation=InterpolationMode.BICUBIC)
        if flip:
            image = TF.hflip(image)
        return TF.to_tensor(image) * 2.0 - 1.0  # [0, 1] -> [-1, 1], the VAE's input range

    def __getitem__(self, key):
        epoch, index, weight = key
        rng = np.random.default_rng([self.seed, epoch, index])
        image_index, flipped = index % len(self.image_paths), rng.random() < 0.5
        prompt = self.templates[int(rng.integers(len(self.templates)))].format(self.placeholder_text)
        example = {"input_ids": tokenize(self.tokenizer, [prompt], [0])[0], "sample_weights": torch.tensor(weight)}
        if self.latent_cache is None:
            example["pixel_values"] = self.pixels(image_index, flipped)
        else:
            example["latent_parameters"] = self.latent_cache[image_index, int(flipped)]
        return example


def image_views(dataset, indices):
    """Pixel batches for the latent cache: item i is example image i // 2, horizontally flipped when i is odd."""
    return torch.stack([dataset.pixels(i // 2, flip=i % 2 == 1) for i in indices])


def tokenize(tokenizer, captions, indices):
    """Token ids of captions[i] for i in indices, padded (or cut) to the text encoder's context length."""
    selected = [captions[i] for i in indices]
    padding = dict(max_length=tokenizer.model_max_length, padding="max_length", truncation=True)
    return tokenizer(selected, return_tensors="pt", **padding).input_ids


def encode_once(accelerator, num_items, batch_size, prepare, encode, description, num_workers=0):
    """encode(prepare(indices)) over items 0..num_items-1, once, for --cache_latents / --cache_text_embeddings. Each
    process encodes every num_processes-th batch and all of them receive the whole result as one CPU tensor: the only
    copy of the cache (dataloader workers share it, they do not copy it)."""
    per_round = batch_size * accelerator.num_processes
    starts = range(0, num_items, per_round)
    first = accelerator.process_index * batch_size
    # Padded with the last item, so every process contributes a batch of the same shape to the gather.
    batches = [[min(i, num_items - 1) for i in range(s + first, s + first + batch_size)] for s in starts]
    loader = torch.utils.data.DataLoader(
        range(num_items), batch_sampler=batches, collate_fn=prepare, num_workers=num_workers
    )
    progress = tqdm(loader, desc=description, disable=not accelerator.is_local_main_process)
    cache = None
    for start, prepared in zip(starts, progress, strict=True):
        with torch.no_grad():
            encoded = accelerator.gather(encode(prepared).contiguous()).cpu()
        if cache is None:
            cache = torch.empty((num_items, *encoded.shape[1:]), dtype=encoded.dtype)
        stop = min(start + per_round, num_items)
        cache[start:stop] = encoded[: stop - start]
    return cache


def build_latent_cache(train_dataset, vae, accelerator, args, num_workers):
    """--cache_latents: the VAE's latent distribution of every example image and of its mirror image, so the VAE
    leaves the training loop."""
    num_images = len(train_dataset.image_paths)
    parameters = encode_once(
        accelerator,
        num_images * 2,
        args.train_batch_size,
        functools.partial(image_views, train_dataset),
        lambda pixels: vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters,
        "Caching latents",
        num_workers,
    )
    train_dataset.latent_cache = parameters.view(num_images, 2, *parameters.shape[1:])
    size = parameters.numel() * parameters.element_size() / 2**20
    logger.info(
        f"Cached latents: {tuple(train_dataset.latent_cache.shape)} {parameters.dtype}, {size:.1f} MiB of CPU memory"
    )


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


def shuffled_batches(num_rows, global_batch_size, seed, epoch):
    """The epoch's global batches as lists of (row, weight): all rows in an order that depends only on (seed, epoch),
    cut into batches (cut_into_batches). NumPy, so the PyTorch and JAX twins see the same batches."""
    order = np.random.default_rng(derive_seed(seed, epoch)).permutation(num_rows).tolist()
    return cut_into_batches(order, global_batch_size)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields each epoch's global batches (lists of (row, weight) from epoch_global_batches(epoch)) as per-process
    batches of (epoch, row, weight) keys, process 0's share first. Accelerate deals batch k to process k %
    num_processes, so each process gets its share of every global batch: the run sees the same global batches however
    many processes share them. The training loop sets `.epoch` itself; there is deliberately no set_epoch(), which
    Accelerate would call with its own iteration counter."""

    def __init__(self, epoch_global_batches, batch_size, num_processes):
        self.epoch_global_batches, self.batch_size, self.num_processes = epoch_global_batches, batch_size, num_processes
        self.drop_last, self.epoch = False, 0  # read by Accelerate's batch sharding
        self.num_batches = len(epoch_global_batches(0)) * num_processes  # the same every epoch

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        for batch in self.epoch_global_batches(self.epoch):
            for process in range(self.num_processes):
                share = batch[process * self.batch_size : (process + 1) * self.batch_size]
                yield [(self.epoch, row, weight) for row, weight in share]


def collate(examples):
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def default_num_workers(args, accelerator):
    """--dataloader_num_workers, or 4 workers on GPU (decoding and augmenting overlap the step) and none on CPU."""
    if args.dataloader_num_workers is not None:
        return args.dataloader_num_workers
    return 4 if accelerator.device.type == "cuda" else 0


class LogWindow:
    """Loss and gradient norm summed on the device between logging steps. Reading them back waits for the device, so
    it happens once per --logging_steps updates (and before each checkpoint), not at every update."""

    def __init__(self, accelerator, images_per_update, global_step):
        self.accelerator, self.images_per_update = accelerator, images_per_update
        self.loss = torch.zeros((), device=accelerator.device)
        self.grad_norm = torch.zeros((), device=accelerator.device)
        self.reset(global_step)

    def reset(self, global_step):
        self.loss.zero_()
        self.grad_norm.zero_()
        self.first_step, self.updates, self.clipped, self.started = global_step + 1, 0, False, time.perf_counter()

    def add_batch(self, loss, gradient_accumulation_steps):
        self.loss += loss.detach() / gradient_accumulation_steps

    def add_update(self, grad_norm):
        self.updates += 1
        if grad_norm is not None:
            self.grad_norm += grad_norm
            self.clipped = True

    def read(self, global_step, epoch, lr):
        """Averages over the window as a logs dict, then a new window. A non-finite loss stops the run, naming the
        steps."""
        loss = self.accelerator.reduce(self.loss, reduction="mean").item() / self.updates
        if not math.isfinite(loss):
            steps = f"at step {global_step}" if self.updates == 1 else f"in steps {self.first_step}-{global_step}"
            raise FloatingPointError(
                f"loss is {loss} {steps} (epoch {epoch}): stopping; no checkpoint was written for these steps"
            )
        elapsed = time.perf_counter() - self.started
        logs = {"loss": loss, "lr": lr}
        if self.clipped:
            logs["grad_norm"] = self.grad_norm.item() / self.updates
        logs["step_time"] = elapsed / self.updates
        logs["images_per_second"] = self.updates * self.images_per_update / elapsed
        if self.accelerator.device.type == "cuda":
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        self.reset(global_step)
        return logs


def format_logs(global_step, logs):
    return f"step {global_step}: " + ", ".join(f"{key}={value:.4g}" for key, value in logs.items())


def stop_agreed(stop_request, accelerator, group):
    """Whether any process received a stop signal, the same answer on every process at the same update: one
    all-reduce of a CPU integer over gloo per update, which never waits for the GPU."""
    requested = torch.tensor([int(stop_request.signal_name is not None)])
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(requested.item())


def check_finite(named_tensors, loss, what, global_step):
    """Before anything is written: every tensor about to be written is finite, and so is the loss the new weights
    give on the last batch (weights can stay finite while a model's outputs do not). Otherwise stop, naming the step
    and the tensors; only then is anything written, so no file ever holds a diverged model."""
    bad = [name for name, tensor in named_tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad or not math.isfinite(loss):
        culprits = f"non-finite values in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}" if bad else ""
        culprits = culprits or f"a loss of {loss} on the last batch"
        raise FloatingPointError(
            f"{what} diverged at step {global_step} ({culprits}): stopping, nothing was written for this step. "
            "Lower --learning_rate, or clip gradients with --max_grad_norm"
        )


def optimizer_tensors(optimizer):
    """The optimizer's state tensors, named by parameter index and key."""
    for index, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if torch.is_tensor(value):
                yield f"optimizer state {index}.{key}", value


def probe_loss(accelerator, unet, text_encoder, noise_scheduler, latents, input_ids, config, seed):
    """The loss the learned rows give now on a batch (the mean over processes), with draws of its own."""
    generator = torch.Generator(device=latents.device).manual_seed(seed)
    with torch.no_grad(), accelerator.autocast():
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0].to(latents.dtype)
        loss = diffusion_loss(unet, noise_scheduler, latents, encoder_hidden_states, generator, config)
    return accelerator.reduce(loss.detach().float(), reduction="mean").item()


def load_component(cls, args, subfolder, **kwargs):
    """One part of the --pretrained_model_name_or_path pipeline, at --revision unless kwargs name another."""
    kwargs = {"revision": args.revision, "cache_dir": args.cache_dir, **kwargs}
    return cls.from_pretrained(args.pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


def register_checkpoint_hooks(accelerator, learned_embedding, args):
    """A checkpoint holds the new rows only, in the learned_embeds format, not a copy of the whole text encoder."""

    def save_model_hook(models, weights, output_dir):
        # Under DeepSpeed and FSDP every rank runs this hook; the file is the main process's to write.
        if accelerator.is_main_process:
            path = os.path.join(output_dir, "learned_embeds.safetensors")
            save_embeddings(learned_embedding.learned, args.placeholder_token, path)
        weights.clear()  # the text encoder is frozen but for these rows: no copy of it in the checkpoint

    def load_model_hook(models, input_dir):
        path = os.path.join(input_dir, "learned_embeds.safetensors")
        rows = safetensors.torch.load_file(path)[args.placeholder_token]
        if rows.shape != learned_embedding.learned.shape:
            raise ValueError(
                f"{input_dir}: learned embeddings of shape {tuple(rows.shape)}, "
                f"this run trains {tuple(learned_embedding.learned.shape)} (--num_vectors)"
            )
        with torch.no_grad():
            learned_embedding.learned.copy_(rows)
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def make_optimizer(args, params):
    """The --optimizer over params. AdamW is PyTorch's fused kernel (one kernel for the whole update: half the time of
    the foreach version on CPU); the others come from the libraries their authors maintain."""
    betas, decay = (args.adam_beta1, args.adam_beta2), args.adam_weight_decay
    if args.optimizer == "adamw":
        return torch.optim.AdamW(
            params, fused=True, lr=args.learning_rate, betas=betas, weight_decay=decay, eps=args.adam_epsilon
        )
    if args.optimizer == "adafactor":
        # Adafactor (Shazeer & Stern 2018, arXiv:1804.04235): factored second moments, a fraction of AdamW's memory.
        return torch.optim.Adafactor(params, lr=args.learning_rate, weight_decay=decay)
    library = importlib.import_module(OPTIMIZER_PACKAGES[args.optimizer][0])
    if args.optimizer == "adamw_8bit":
        return library.optim.AdamW8bit(
            params, lr=args.learning_rate, betas=betas, weight_decay=decay, eps=args.adam_epsilon
        )
    if args.optimizer == "lion":
        # Lion (Chen et al. 2023, arXiv:2302.06675): the sign of a momentum blend; wants a 3-10x smaller lr.
        return library.Lion(params, lr=args.learning_rate, betas=betas, weight_decay=decay)
    if args.optimizer == "prodigy":
        # Prodigy (Mishchenko & Defazio 2023, arXiv:2306.06101) estimates the step size itself: --learning_rate 1.
        return library.Prodigy(params, lr=args.learning_rate, betas=betas, weight_decay=decay, eps=args.adam_epsilon)
    # Schedule-free AdamW (Defazio et al. 2024, arXiv:2405.15682): averaging replaces the learning-rate schedule.
    return library.AdamWScheduleFree(
        params,
        lr=args.learning_rate,
        betas=betas,
        weight_decay=decay,
        eps=args.adam_epsilon,
        warmup_steps=args.lr_warmup_steps,
    )


def encode_batch(batch, vae, text_encoder, generator, share):
    """The batch's latents, from the frozen VAE or its cache (the VAE sample is the first draw from `generator`, made
    for the global batch `share` belongs to: see BatchShare), and its text conditioning, which carries gradients back
    to the new embedding rows."""
    with torch.no_grad():
        if "latent_parameters" in batch:
            # --cache_latents: sampling from the stored distribution draws exactly what encoding the image would.
            latent_dist = DiagonalGaussianDistribution(batch["latent_parameters"].to(vae.device, vae.dtype))
        else:
            # The frozen VAE maps images to latents; the scaling factor brings them to roughly unit variance.
            latent_dist = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
        # What latent_dist.sample() computes, with the draw made for the global batch.
        mean, std = latent_dist.mean, latent_dist.std
        sample_shape = (share.global_batch_size, *mean.shape[1:])
        sample = torch.randn(sample_shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latents = (mean + std * sample[share.start : share.stop]) * vae.config.scaling_factor
    # The text encoder runs with gradients: they reach the new token embedding rows and nothing else. Its output
    # takes the dtype of the frozen UNet, which is the VAE's (both hold the mixed-precision dtype).
    encoder_hidden_states = text_encoder(batch["input_ids"].to(latents.device), return_dict=False)[0]
    return latents, encoder_hidden_states.to(latents.dtype)


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
    dream_detail_preservation: float | None = None  # DREAM's detail preservation p; None turns DREAM off
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


@dataclasses.dataclass(frozen=True)
class BatchShare:
    """This process's rows, start:stop, of a global batch of global_batch_size. Each random draw is made for the whole
    global batch and cut to these rows (as the JAX twin draws over its global arrays), so a sample's draws depend on
    its place in the global batch, and the run on the global batch, not on how many processes share it."""

    start: int
    stop: int
    global_batch_size: int

    @classmethod
    def of_process(cls, process_index, batch_size, num_processes):
        return cls(process_index * batch_size, (process_index + 1) * batch_size, batch_size * num_processes)


def diffusion_loss(
    unet, noise_scheduler, latents, encoder_hidden_states, generator, config, sample_weights=None, share=None
):
    """The denoising loss of a batch of clean latents, averaged over the batch (weighted by `sample_weights` when
    given: a padded batch holds examples of weight 0). Every random draw comes from `generator`, in the JAX twin's
    order: noise, offset noise, input perturbation, timesteps; each is drawn for the global batch `share` belongs to
    (None: this batch is the whole batch) and cut to its rows."""
    bsz = latents.shape[0]
    share = share or BatchShare(0, bsz, bsz)
    rows, draws = slice(share.start, share.stop), share.global_batch_size
    noise_shape = (draws, *latents.shape[1:])
    noise = torch.randn(noise_shape, generator=generator, device=latents.device, dtype=latents.dtype)[rows]
    if config.noise_offset:
        # Offset noise (Guttenberg 2023, crosslabs.org/blog/diffusion-with-offset-noise): a per-channel constant
        # lets the model change the overall brightness of an image.
        offset_shape = (draws, latents.shape[1], 1, 1)
        offset = torch.randn(offset_shape, generator=generator, device=latents.device, dtype=latents.dtype)[rows]
        noise = noise + config.noise_offset * offset
    noised_with = noise
    if config.input_perturbation:
        # Input perturbation (Ning et al. 2023, arXiv:2301.11706): noise the input with slightly perturbed noise but
        # keep the clean noise as target, which reduces exposure bias.
        perturbation = torch.randn(noise_shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noised_with = noise + config.input_perturbation * perturbation[rows]
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if config.timestep_sampling == "logit_normal":
        # Logit-normal timesteps (Esser et al. 2024, arXiv:2403.03206, as SD3 trains): t/T = sigmoid(n) with
        # n ~ N(mean, std) draws the middle timesteps, where denoising is hardest, most often.
        normal = torch.randn((draws,), generator=generator, device=latents.device, dtype=torch.float32)[rows]
        fraction = torch.sigmoid(config.logit_mean + config.logit_std * normal)
        timesteps = (fraction * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    elif config.timestep_bias_strategy != "none":
        # Biased timesteps (diffusers' SDXL script): invert the cumulative weights at a uniform draw.
        cdf = np.cumsum(timestep_bias_weights(num_train_timesteps, config))
        cdf = torch.from_numpy((cdf / cdf[-1]).astype(np.float32)).to(latents.device)
        uniform = torch.rand((draws,), generator=generator, device=latents.device, dtype=torch.float32)[rows]
        timesteps = torch.searchsorted(cdf, uniform, right=True).clamp(max=num_train_timesteps - 1)
    else:
        timesteps = torch.randint(0, num_train_timesteps, (draws,), generator=generator, device=latents.device)[rows]
    # Forward diffusion: noisy_latents = sqrt(alpha_bar_t) * latents + sqrt(1 - alpha_bar_t) * noise.
    noisy_latents = noise_scheduler.add_noise(latents, noised_with, timesteps)

    # The target depends on what the model predicts: the noise (epsilon) or the velocity v (Salimans & Ho 2022).
    if config.prediction_type == "epsilon":
        target = noise
    elif config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {config.prediction_type!r}")

    if config.dream_detail_preservation is not None:
        # DREAM (Zhou et al. 2023, arXiv:2312.00210): blend the model's own estimate into input and target.
        noisy_latents, target = compute_dream_and_update_latents(
            unet,
            noise_scheduler,
            timesteps,
            noise,
            noisy_latents,
            target,
            encoder_hidden_states,
            config.dream_detail_preservation,
        )

    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    # Signal-to-noise ratio of each sample's timestep, alpha_bar / (1 - alpha_bar): 0 at a zero-terminal-SNR end.
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(latents.device)[timesteps].float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    if config.loss_type == "l2":
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    elif config.loss_type == "l1":
        loss = (model_pred.float() - target.float()).abs()
    else:
        # Scheduled pseudo-Huber loss (Khrapov et al. 2024, arXiv:2403.16728): quadratic below c and linear above,
        # so outliers in the data pull less; c is large at low noise (nearly L2) and falls to huber_c at high noise.
        if config.huber_schedule == "exponential":
            huber_c = config.huber_c ** (timesteps.float() / num_train_timesteps)
        elif config.huber_schedule == "snr":
            sigmas = torch.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
            huber_c = (1.0 - config.huber_c) / (1.0 + sigmas) ** 2 + config.huber_c
        else:
            huber_c = torch.full((bsz,), config.huber_c, device=latents.device)
        huber_c = huber_c.view(bsz, *[1] * (model_pred.ndim - 1))
        pseudo_huber = torch.sqrt((model_pred.float() - target.float()) ** 2 + huber_c**2) - huber_c
        # "huber" is scaled to match L2's curvature near 0, "smooth_l1" to match L1's slope in the tails.
        loss = 2.0 * huber_c * pseudo_huber if config.loss_type == "huber" else 2.0 * pseudo_huber
    loss = loss.mean(dim=list(range(1, model_pred.ndim)))

    # The timestep weights below are defined on the epsilon loss. A v-prediction loss is (SNR + 1) / SNR times the
    # epsilon loss (Salimans & Ho 2022), so in v terms a weight w becomes w * SNR / (SNR + 1).
    if config.snr_gamma is not None:
        # Min-SNR-gamma weighting (Hang et al. 2023, arXiv:2303.09556): min(SNR, gamma) / SNR in epsilon terms,
        # min(SNR, gamma) / (SNR + 1) in v terms; 1 where the epsilon SNR is 0.
        divisor = snr + 1.0 if config.prediction_type == "v_prediction" else snr
        weights = torch.where(divisor > 0, torch.clamp(snr, max=config.snr_gamma) / divisor, torch.ones_like(snr))
        loss = loss * weights
    if config.debiased_estimation:
        # Debiased estimation (Yu et al. 2024, arXiv:2310.08442): weight 1/sqrt(SNR) in epsilon terms, with the SNR
        # held within [1e-3, 1e3] so the weight stays finite (at most 31.6) at a zero-terminal-SNR end.
        weights = torch.rsqrt(torch.clamp(snr, min=1e-3, max=1e3))
        if config.prediction_type == "v_prediction":
            weights = weights * snr / (snr + 1.0)
        loss = loss * weights
    if sample_weights is not None:
        loss = loss * sample_weights
    return loss.mean()


# ------------------------------------------------------ END MATH ------------------------------------------------------


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


def save_embeddings(learned, key, path, safe_serialization=True):
    """{key: tensor[num_vectors, hidden]}, key the placeholder (diffusers) or UI_EMBEDDING_KEY (the UIs).
    Written to a temporary name, flushed to disk and renamed, so a crash never leaves a truncated file."""
    state = {key: learned.detach().float().cpu().contiguous()}
    partial = path + ".partial"
    try:
        if safe_serialization:
            safetensors.torch.save_file(state, partial, metadata={"format": "pt"})
        else:
            torch.save(state, partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        if os.path.exists(partial):
            os.remove(partial)
        raise OSError(write_failure(os.path.basename(path), os.path.dirname(path), err)) from err
    os.replace(partial, path)
    fsync_folder(os.path.dirname(path))


def save_checkpoint(accelerator, output_dir, global_step, run_metadata, total_limit=None):
    """Write checkpoint-N crash-safely: into a hidden temporary folder, flushed to disk, then renamed into place (a
    checkpoint is visible only when complete); then keep the newest `total_limit` (--checkpoints_total_limit).
    Called by every process. Under DeepSpeed and FSDP, save_state is collective (each rank writes its own shards into
    the folder, which must be shared by all machines) and the checkpoint is published only if every rank succeeded;
    otherwise the main process writes it alone."""
    collective = accelerator.state.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if not (accelerator.is_main_process or collective):
        return
    final_path = os.path.join(output_dir, f"checkpoint-{global_step}")
    partial_path = os.path.join(output_dir, f".checkpoint-{global_step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial_path, ignore_errors=True)
    failure = None
    if collective:
        accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial_path)
        if accelerator.is_main_process:
            write_checkpoint_metadata(partial_path, {**run_metadata, "global_step": global_step})
    except (OSError, RuntimeError) as err:
        failure = err
    if collective:
        failed = torch.tensor(float(failure is not None), device=accelerator.device)
        if accelerator.reduce(failed, reduction="sum").item() and failure is None:
            failure = RuntimeError("another process could not write its part")
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(partial_path, ignore_errors=True)
        raise OSError(write_failure(f"checkpoint-{global_step}", output_dir, failure)) from failure
    if accelerator.is_main_process:
        publish_checkpoint(partial_path, final_path)
        logger.info(f"Saved {final_path}")
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                logger.info(f"Deleting {path} (--checkpoints_total_limit {total_limit})")
                shutil.rmtree(path)
    if collective:
        accelerator.wait_for_everyone()


def render_validation_images(pipeline, prompts, size, seed, weight_dtype):
    """One image per prompt, each from its own fixed seed, so grids compare across steps and across a resume."""
    device = pipeline.device
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(derive_seed(seed, VALIDATION_SEED_KEY, index))
        # Trained and frozen parts may differ in dtype under mixed precision; autocast reconciles them.
        with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            height, width = size
            output = pipeline(prompt, num_inference_steps=20, generator=generator, height=height, width=width)
        images.append(output.images[0])
    return images


def log_validation(pipeline, prompts, args, accelerator, seed, global_step, tag, weight_dtype):
    """Render, save a PNG grid under output_dir/validation/, and log the images to the trackers."""
    pipeline.set_progress_bar_config(disable=True)
    images = render_validation_images(pipeline, prompts, args.validation_resolution, seed, weight_dtype)
    grid = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)))
    x = 0
    for image in images:
        grid.paste(image, (x, 0))
        x += image.width
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid_path = os.path.join(folder, f"{tag}-step-{global_step:06d}.png")
    grid.save(grid_path)
    logger.info(f"Validation grid ({' | '.join(prompts)}): {grid_path}")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(i) for i in images]), global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            logged = [wandb.Image(image, caption=prompt) for image, prompt in zip(images, prompts, strict=True)]
            tracker.log({tag: logged}, step=global_step)
    return images


def inference_scheduler(scheduler, args):
    """The pipeline's scheduler set up for what this run trained: its prediction type, and with
    --rescale_betas_zero_snr the rescaled schedule sampled from its last timestep ("trailing", Lin et al. 2023 sec.
    3.3). A scheduler class that cannot rescale (PNDM, LMS) is replaced by DDIM, which the paper samples with."""
    overrides = {} if args.prediction_type is None else {"prediction_type": args.prediction_type}
    if not args.rescale_betas_zero_snr:
        return scheduler.from_config(scheduler.config, **overrides) if overrides else scheduler
    overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if "rescale_betas_zero_snr" in inspect.signature(type(scheduler).__init__).parameters:
        return type(scheduler).from_config(scheduler.config, **overrides)
    logger.info(f"--rescale_betas_zero_snr: {type(scheduler).__name__} cannot rescale, saving a DDIMScheduler")
    # Latents are not confined to [-1, 1]: DDIM's default clipping of its x0 estimate would distort them.
    return DDIMScheduler.from_config(scheduler.config, **overrides, clip_sample=False)


def validate(accelerator, text_encoder, tokenizer, unet, vae, prompts, args, seed, global_step, tag, weight_dtype):
    """Render the validation prompts with the embedding learned so far, through the frozen pipeline."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        text_encoder=accelerator.unwrap_model(text_encoder),
        tokenizer=tokenizer,
        unet=unet,
        vae=vae,
        safety_checker=None,
        revision=args.revision,
        variant=args.variant,
        dtype=weight_dtype,
        cache_dir=args.cache_dir,
    )
    pipeline.scheduler = inference_scheduler(pipeline.scheduler, args)
    log_validation(pipeline, prompts, args, accelerator, seed, global_step, tag, weight_dtype)


def write_model_card(args, global_step, validation_grid):
    name = "learned_embeds.bin" if args.no_safe_serialization else "learned_embeds.safetensors"
    lines = [
        "---",
        "license: creativeml-openrail-m",
        f"base_model: {args.pretrained_model_name_or_path}",
        "tags:",
        "- stable-diffusion",
        "- text-to-image",
        "- diffusers",
        "- textual_inversion",
        "library_name: diffusers",
        "---",
        "",
        f"# Textual inversion: {args.placeholder_token}",
        "",
        f"Embedding of `{args.placeholder_token}` ({args.num_vectors} vector(s)) "
        f"learned on `{args.pretrained_model_name_or_path}` "
        f"from the images in `{args.train_data_dir}`, {global_step} optimizer updates.",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}")',
        f'pipe.load_textual_inversion("{args.output_dir}/{name}")',
        f'image = pipe("{args.validation_prompt or "a photo of a " + args.placeholder_token}").images[0]',
        "```",
    ]
    if validation_grid:
        lines += ["", f"![validation]({validation_grid})"]
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_hub_style_text_encoder(text_encoder_dir):
    """transformers 5 saves CLIPTextModel weights without the 'text_model.' key prefix that hub checkpoints carry and
    that transformers 4, the Flax twins and single-file converters expect (they silently load random weights
    otherwise). transformers 5 reads both layouts, so rewrite the saved file(s) with the prefix."""

    def hub_key(key):
        return "text_model." + key if key.split(".")[0] in ("embeddings", "encoder", "final_layer_norm") else key

    index_path = os.path.join(text_encoder_dir, "model.safetensors.index.json")
    names = ["model.safetensors", "pytorch_model.bin"]
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        names = sorted(set(index["weight_map"].values()))
        index["weight_map"] = {hub_key(k): v for k, v in index["weight_map"].items()}
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
    for name in names:
        path = os.path.join(text_encoder_dir, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".safetensors"):
            state = safetensors.torch.load_file(path)
            safetensors.torch.save_file({hub_key(k): v for k, v in state.items()}, path, metadata={"format": "pt"})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            torch.save({hub_key(k): v for k, v in state.items()}, path)


def save_full_pipeline(text_encoder, tokenizer, unet, vae, weight_dtype, args):
    """The pipeline with the extended tokenizer and a standard text encoder holding the learned rows, written to a
    temporary folder first. The frozen UNet and VAE are re-read from the source when training held them in
    reduced precision, so the saved files keep the original precision."""
    token_embedding = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(token_embedding.merged())
    text_encoder.config.vocab_size = len(tokenizer)
    frozen = {"unet": unet, "vae": vae} if weight_dtype == torch.float32 else {}
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **frozen,
    )
    # The saved scheduler says what this run trained with (prediction type, zero terminal SNR).
    pipeline.scheduler = inference_scheduler(pipeline.scheduler, args)
    partial = os.path.join(args.output_dir, ".pipeline.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        pipeline.save_pretrained(partial, safe_serialization=not args.no_safe_serialization)
        write_hub_style_text_encoder(os.path.join(partial, "text_encoder"))
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(write_failure("the pipeline", args.output_dir, err)) from err
    publish_pipeline(partial, args.output_dir)
    text_encoder.set_input_embeddings(token_embedding)


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


def main(argv=None):
    args = parse_args(argv)

    # ------------------------------------------------------------------------------------------------------ setup
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    if not accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_error()
    if args.enable_xformers_memory_efficient_attention and not diffusers.utils.is_xformers_available():
        raise ImportError(
            "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers (GPU only)"
        )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    image_paths = find_example_images(args.train_data_dir)
    # Only the main process writes, and only while it holds output_dir: a second run into it is refused.
    output_lock = lock_output_dir(args.output_dir) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    stop_request = StopRequest()
    # A CPU side channel for agreeing on stop requests, so that it never waits for the GPU.
    stop_group = torch.distributed.new_group(backend="gloo") if accelerator.num_processes > 1 else None
    resume_path = find_resume_checkpoint(args)
    resume_metadata = read_checkpoint_metadata(resume_path)
    seed = choose_seed(args, resume_metadata)

    # ------------------------------------------------------------------------------------------------ load models
    if args.tokenizer_name:
        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name, cache_dir=args.cache_dir)
    else:
        tokenizer = load_component(CLIPTokenizer, args, "tokenizer")
    # Lin et al. 2023 (arXiv:2305.08891): rescaled betas reach zero SNR at the last timestep, as sampling starts.
    noise_scheduler = load_component(
        DDPMScheduler, args, "scheduler", rescale_betas_zero_snr=args.rescale_betas_zero_snr
    )
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    text_encoder = load_component(CLIPTextModel, args, "text_encoder", variant=args.variant)
    vae = load_component(AutoencoderKL, args, "vae", variant=args.variant)
    unet = load_component(UNet2DConditionModel, args, "unet", variant=args.variant)
    # Everything is frozen; the only trainable tensor is the new rows, each starting at the initializer's embedding.
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    placeholder_tokens, placeholder_ids, learned_embedding = add_learned_embedding(
        text_encoder, tokenizer, args.placeholder_token, args.initializer_token, args.num_vectors
    )
    text_encoder.train()
    if args.gradient_checkpointing:
        # Gradients flow through the frozen UNet back to the text encoder; checkpointing both saves their activations.
        unet.train()
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    # The frozen UNet and VAE run in the mixed-precision dtype; the text encoder and the new rows stay fp32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    if accelerator.device.type == "cuda":
        # cuDNN's fastest convolution kernels for fp16/bf16 work on NHWC ("channels last") tensors.
        unet.to(memory_format=torch.channels_last)
    if args.torch_compile:
        unet.compile()  # in place: the modules and their state-dict keys stay as they are
        text_encoder.compile()
    register_checkpoint_hooks(accelerator, learned_embedding, args)
    prediction_type = noise_scheduler.config.prediction_type
    loss_config = LossConfig(
        prediction_type=prediction_type,
        snr_gamma=args.snr_gamma,
        **recipe_fields(args, prediction_type, noise_scheduler.config.num_train_timesteps),
    )

    # ------------------------------------------------------------------------------------------------------- data
    train_dataset = TextualInversionDataset(image_paths, tokenizer, " ".join(placeholder_tokens), args, seed)
    num_workers = default_num_workers(args, accelerator)
    if args.cache_latents:
        build_latent_cache(train_dataset, vae, accelerator, args, num_workers)
    # The run depends on the global batch, not on how many processes share it: batches and draws are made for it.
    global_batch_size = args.train_batch_size * accelerator.num_processes
    epoch_global_batches = functools.partial(shuffled_batches, len(train_dataset), global_batch_size, seed)
    sampler = GlobalBatchSampler(epoch_global_batches, args.train_batch_size, accelerator.num_processes)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
    )

    # ---------------------------------------------------------------------------------- optimizer and schedule
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, [learned_embedding.learned])
    text_encoder, optimizer, train_dataloader = accelerator.prepare(text_encoder, optimizer, train_dataloader)
    # global_step counts optimizer updates; --max_train_steps is authoritative and epochs are derived from it.
    batches_per_epoch = len(train_dataloader)
    if args.gradient_accumulation_steps > batches_per_epoch:
        raise ValueError(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} is more than the {batches_per_epoch} "
            f"batches of an epoch ({len(train_dataset)} examples, {args.train_batch_size} per device x "
            f"{accelerator.num_processes} processes): use at most {batches_per_epoch}, or a smaller batch"
        )
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps
    num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
    if args.validation_epochs is not None:
        logger.warning("--validation_epochs is deprecated: use --validation_steps")
        args.validation_steps = args.validation_epochs * updates_per_epoch
    # The prepared scheduler steps once per process at every update, hence the factor num_processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    run_metadata = {"seed": seed, "total_batch_size": total_batch_size, "updates_per_epoch": updates_per_epoch}
    run_metadata["process_count"] = accelerator.num_processes  # information only: the run does not depend on it

    # ----------------------------------------------------------------------------------------------------- resume
    global_step = 0
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        try:
            accelerator.load_state(resume_path)
        except Exception as err:
            raise RuntimeError(f"{resume_path} could not be loaded ({type(err).__name__}: {err})") from err
        global_step = resume_metadata["global_step"]
        warn_if_batch_layout_changed(resume_metadata, run_metadata)
    first_epoch = global_step // updates_per_epoch

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("textual_inversion", config=tracker_config)
    embeds_suffix = "bin" if args.no_safe_serialization else "safetensors"
    validation_prompts = [args.validation_prompt] * args.num_validation_images if args.validation_prompt else []
    validation_models = (text_encoder, tokenizer, unet, vae, validation_prompts)
    logger.info("***** Running training *****")
    logger.info(
        f"  Images = {len(image_paths)} x {args.repeats} repeats, epochs = {num_train_epochs}, "
        f"updates per epoch = {updates_per_epoch}"
    )
    logger.info(
        f"  Batch per device = {args.train_batch_size}, processes = {accelerator.num_processes}, "
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
    generator = torch.Generator(device=accelerator.device)
    share = BatchShare.of_process(accelerator.process_index, args.train_batch_size, accelerator.num_processes)
    progress_bar = tqdm(
        range(max_train_steps),
        initial=min(global_step, max_train_steps),
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    window = LogWindow(accelerator, total_batch_size, global_step)
    last_batch = None  # (latents, input_ids) of the last batch, to probe the new rows before writing them
    # Schedule-free AdamW steps one sequence of weights and evaluates another, its average: it trains in train mode
    # and is switched to eval mode (on every process) whenever the rows are checked, rendered or saved. The other
    # optimizers have no modes, and Accelerate makes these calls no-ops for them.
    optimizer.train()
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        sampler.epoch = epoch
        # Resume mid-epoch: skip exactly the batches the interrupted run had consumed (every earlier update in this
        # epoch used a full accumulation group).
        skip = (global_step - epoch * updates_per_epoch) * args.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch_index, batch in enumerate(batches, start=skip):
            generator.manual_seed(derive_seed(seed, epoch, batch_index))  # the same in every process: see BatchShare
            # The epoch's last accumulation group may be short: its update averages the batches it has.
            group_start = batch_index - batch_index % args.gradient_accumulation_steps
            group_size = min(args.gradient_accumulation_steps, batches_per_epoch - group_start)
            with accelerator.accumulate(text_encoder):
                latents, encoder_hidden_states = encode_batch(batch, vae, text_encoder, generator, share)
                sample_weights = batch["sample_weights"].to(latents.device)
                loss = diffusion_loss(
                    unet, noise_scheduler, latents, encoder_hidden_states, generator, loss_config, sample_weights, share
                )
                window.add_batch(loss, group_size)
                accelerator.backward(loss * (args.gradient_accumulation_steps / group_size))
                last_batch = (latents, batch["input_ids"].to(latents.device))
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_([learned_embedding.learned], args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            window.add_update(grad_norm)
            progress_bar.update(1)
            stopping = stop_agreed(stop_request, accelerator, stop_group)  # a SIGTERM / SIGUSR1 on any process
            is_checkpoint_step = global_step % args.checkpointing_steps == 0 or stopping
            is_save_step = global_step % args.save_steps == 0 or is_checkpoint_step
            # Reading the loss back waits for the device: only at logging steps, and before anything is saved (the
            # read raises on a non-finite loss, so no saved embedding or checkpoint ever holds a diverged one).
            if global_step % args.logging_steps == 0 or is_save_step or global_step >= max_train_steps:
                logs = window.read(global_step, epoch, lr_scheduler.get_last_lr()[0])
                accelerator.log(logs, step=global_step)
                logger.info(format_logs(global_step, logs))
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            is_validation_step = validation_prompts and global_step % args.validation_steps == 0
            if is_save_step or is_validation_step:
                optimizer.eval()  # what is saved or rendered is the model at this step; resume switches back exactly
            if is_save_step:
                tensors = [("the new rows", learned_embedding.learned), *optimizer_tensors(optimizer)]
                probe = probe_loss(accelerator, unet, text_encoder, noise_scheduler, *last_batch, loss_config, seed)
                check_finite(tensors, probe, "the embedding", global_step)
            if accelerator.is_main_process:
                if global_step % args.save_steps == 0:
                    path = os.path.join(args.output_dir, f"learned_embeds-steps-{global_step}.{embeds_suffix}")
                    save_embeddings(
                        learned_embedding.learned, args.placeholder_token, path, not args.no_safe_serialization
                    )
                if is_validation_step and global_step < max_train_steps:
                    validate(accelerator, *validation_models, args, seed, global_step, "validation", weight_dtype)
            if is_checkpoint_step:
                save_checkpoint(accelerator, args.output_dir, global_step, run_metadata, args.checkpoints_total_limit)
            if is_save_step or is_validation_step:
                optimizer.train()
            if stopping:
                accelerator.wait_for_everyone()
                logger.warning(preemption_message(stop_request, global_step))
                accelerator.end_training()
                sys.exit(PREEMPTED_EXIT_CODE)
            if global_step >= max_train_steps:
                break

    # ------------------------------------------------------------------------------------------------------- save
    optimizer.eval()
    if last_batch is not None:  # what is about to be saved, checked as every checkpoint is
        tensors = [("the new rows", learned_embedding.learned), *optimizer_tensors(optimizer)]
        probe = probe_loss(accelerator, unet, text_encoder, noise_scheduler, *last_batch, loss_config, seed)
        check_finite(tensors, probe, "the embedding", global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for key, path in embedding_files(args, embeds_suffix):
            save_embeddings(learned_embedding.learned, key, path, not args.no_safe_serialization)
            logger.info(f"Saved {os.path.abspath(path)}")
        grid = None
        if validation_prompts:
            validate(accelerator, *validation_models, args, seed, global_step, "final", weight_dtype)
            grid = f"validation/final-step-{global_step:06d}.png"
        if args.save_as_full_pipeline or args.push_to_hub:
            save_full_pipeline(accelerator.unwrap_model(text_encoder), tokenizer, unet, vae, weight_dtype, args)
        write_model_card(args, global_step, grid)
        if args.push_to_hub:
            push_to_hub(args)
    accelerator.end_training()
    if output_lock is not None:
        output_lock.release()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Fine-tune the UNet of a Stable Diffusion 1.x / 2.x pipeline on image-caption pairs (PyTorch + Accelerate).

One GPU (or CPU):
    accelerate launch train_text_to_image.py \
      --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --dataset_name=lambdalabs/naruto-blip-captions --resolution=512 --center_crop --random_flip \
      --train_batch_size=1 --gradient_accumulation_steps=4 --gradient_checkpointing --mixed_precision=fp16 \
      --max_train_steps=15000 --learning_rate=1e-05 --max_grad_norm=1 --lr_scheduler=constant --lr_warmup_steps=0 \
      --use_ema --checkpointing_steps=500 --validation_prompts "yoda" --output_dir=sd-naruto-model

Several GPUs: run `accelerate config` once, then `accelerate launch --multi_gpu train_text_to_image.py <same flags>`.
Several machines (the same on each, --machine_rank 0 on the one at --main_process_ip; output_dir shared by all):
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \
      --main_process_ip 10.0.0.1 --main_process_port 29500 train_text_to_image.py <same flags>
Two CPU processes (DDP over gloo, what the tests do):
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train_text_to_image.py <same flags>
After a crash or preemption, relaunch the same command with --resume_from_checkpoint=latest: the resumed run ends
with the same weights as one that was never interrupted, on the same or another number of processes as long as the
global batch (batch x processes x accumulation) is the same.
"""

import argparse
import concurrent.futures
import ctypes
import dataclasses
import functools
import importlib
import importlib.util
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

import datasets
import diffusers
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_dream_and_update_latents
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
# The third key of bucket draws, derive_seed(seed, epoch, BUCKET_SEED_KEY, ...), and of each image's fixed bucket crop.
BUCKET_SEED_KEY = 6007
LOCK_FILE = ".training.lock"  # held (an OS lock) by the run writing into output_dir; a killed run holds none
PIPELINE_LINK = ".pipeline"  # -> the current .pipeline-<n> folder; output_dir's components link through it
PIPELINE_VERSION = re.compile(r"^\.pipeline-(\d+)$")
PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after writing a checkpoint; relaunch to continue
INTERPOLATION_MODES = ["lanczos", "bicubic", "bilinear", "nearest", "nearest_exact", "box", "hamming"]
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
OPTIMIZERS = ["adamw", "adamw_8bit", "adafactor", "lion", "prodigy", "schedule_free_adamw"]
# The optimizers that need a package of their own: module, pip package.
OPTIMIZER_PACKAGES = {
    "adamw_8bit": ("bitsandbytes", "bitsandbytes"),
    "lion": ("lion_pytorch", "lion-pytorch"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "schedule_free_adamw": ("schedulefree", "schedulefree"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune the UNet of a Stable Diffusion pipeline on image-caption pairs."
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
        "--non_ema_revision",
        type=str,
        default=None,
        help="Revision holding the non-EMA UNet to train from (the EMA copy starts from --revision).",
    )
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
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=INTERPOLATION_MODES,
        help="Interpolation used to resize images.",
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
        help="Encode every image once (both flips with --random_flip); train from the cache. Needs --center_crop.",
    )
    parser.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help="Encode every distinct caption once before training and train from the stored text-encoder outputs.",
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
        help="Recompute UNet activations in the backward pass to save memory.",
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
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR weighting gamma (5.0 is recommended); off when not given.",
    )
    parser.add_argument(
        "--dream_training",
        action="store_true",
        help="Use DREAM (Diffusion Rectification and Estimation-Adaptive Models).",
    )
    parser.add_argument(
        "--dream_detail_preservation", type=float, default=1.0, help="DREAM detail preservation factor p (> 0)."
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
        "--offload_ema", action="store_true", help="Keep the EMA weights in CPU memory between updates."
    )
    parser.add_argument(
        "--foreach_ema", action="store_true", help="Update the EMA with fused foreach kernels (faster, more memory)."
    )
    add_optimizer_arguments(parser)
    parser.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Clip gradients to this global norm (0 turns clipping off)."
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: the accelerate config's.",
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
        help="Compile the UNet with torch.compile: a slower start (minutes), faster steps.",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by distributed launchers; do not pass by hand.")
    # Checkpointing
    parser.add_argument(
        "--output_dir",
        type=str,
        default="sd-model-finetuned",
        help="Where the final pipeline, checkpoints, validation images and logs go.",
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
    # Logging and validation
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
    parser.add_argument(
        "--report_to", type=str, default="tensorboard", help="Tracker: tensorboard, wandb, comet_ml, all, or none."
    )
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker log folder, relative to --output_dir.")
    parser.add_argument(
        "--tracker_project_name", type=str, default="text2image-fine-tune", help="Project name passed to the tracker."
    )
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the Hugging Face Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `hf auth login`).")
    parser.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository to push to; default: the output folder's name."
    )
    args = parser.parse_args(argv)

    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("no training data: pass --dataset_name (hub id or local dataset folder) or --train_data_dir")
    if args.non_ema_revision is None:
        args.non_ema_revision = args.revision
    if args.ema_validation != "ema" and not args.use_ema:
        parser.error(f"--ema_validation {args.ema_validation} renders EMA and raw weights: it needs --use_ema")
    positive = "resolution train_batch_size gradient_accumulation_steps checkpointing_steps validation_epochs"
    for name in (positive + " logging_steps").split():
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ["max_train_steps", "checkpoints_total_limit", "max_train_samples"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}")
    try:
        args.aspect_ratio_buckets = parse_buckets(args.aspect_ratio_buckets)
        args.validation_resolution = parse_size(args.validation_resolution, args.resolution)
    except ValueError as err:
        parser.error(str(err))
    args.use_aspect_ratio_buckets = args.use_aspect_ratio_buckets or args.aspect_ratio_buckets is not None
    if args.bucket_no_upscale and not args.use_aspect_ratio_buckets:
        parser.error("--bucket_no_upscale needs --use_aspect_ratio_buckets")
    if args.cache_latents and not (args.center_crop or args.use_aspect_ratio_buckets):
        parser.error(
            "--cache_latents stores one crop per image, so it needs --center_crop or --use_aspect_ratio_buckets "
            "(where each image has one crop), not a new random crop at every use"
        )
    for name in ["proportion_empty_prompts", "caption_tag_dropout_rate"]:
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.keep_tokens < 0:
        parser.error(f"--keep_tokens must be 0 or more, got {args.keep_tokens}")
    if args.cache_text_embeddings and (args.shuffle_caption or args.caption_tag_dropout_rate > 0):
        parser.error(
            "--shuffle_caption and --caption_tag_dropout_rate change a caption at every use, and "
            "--cache_text_embeddings encodes each caption once: use one or the other"
        )
    if args.dream_training and args.dream_detail_preservation <= 0:
        parser.error("--dream_detail_preservation must be positive")
    check_recipe_arguments(parser, args)
    check_optimizer_arguments(parser, args)
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("--hub_token with --report_to=wandb would leak the token to wandb; use `hf auth login` instead")
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


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Rows -> {pixel_values or latent_parameters, input_ids or encoder_hidden_states, sample_weights}. Indexed by
    (epoch, row, weight) keys: crop, flip and caption edits are drawn from an RNG seeded by (seed, epoch, row), so the
    same sample is identical in a resumed run, and the cached path draws exactly what the uncached one does."""

    def __init__(self, rows, tokenizer, args, seed):
        self.rows, self.tokenizer, self.args, self.seed = rows, tokenizer, args, seed
        self.interpolation = InterpolationMode[args.image_interpolation_mode.upper()]
        self.caption_config = CaptionConfig(
            proportion_empty_prompts=args.proportion_empty_prompts,
            shuffle_caption=args.shuffle_caption,
            keep_tokens=args.keep_tokens,
            caption_tag_dropout_rate=args.caption_tag_dropout_rate,
        )
        # Captions stay in the (memory-mapped) dataset: a Python list of them would be copied into every worker.
        self.caption_rows = rows.select_columns([args.caption_column])
        for row, value in enumerate(self.caption_rows[args.caption_column]):
            self.caption_choices(value, row)  # checked now, so a bad row fails before training, not hours into it
        # Set by setup_buckets(): each row's bucket and the buckets' (height, width); None crops squares.
        self.bucket_of_row = None
        self.buckets = None
        # Set by build_caches(): (each row's group, its place in the group, [group][place, flipped] -> the VAE's latent
        # distribution parameters), and (per-row offsets, caption indices, [caption] -> text-encoder output, the
        # empty caption's index).
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

    def shape_groups(self):
        """Rows that share an image size, as (each row's group, the rows of each group): the buckets, or one group."""
        group_of_row = np.zeros(len(self), np.int64) if self.buckets is None else np.asarray(self.bucket_of_row)
        return group_of_row, [np.flatnonzero(group_of_row == group).tolist() for group in range(group_of_row.max() + 1)]

    def transform(self, image, row, rng, flip=None):
        if self.buckets is None:
            height = width = self.args.resolution
            image = TF.resize(image, self.args.resolution, interpolation=self.interpolation)
            crop_rng = rng
        else:
            # Resized to cover its bucket, then cropped; a random crop is drawn once per image (from the seed and the
            # row), so --cache_latents stores exactly what an uncached run trains on.
            height, width = self.buckets[self.bucket_of_row[row]]
            scale = max(height / image.height, width / image.width)
            size = [max(height, round(image.height * scale)), max(width, round(image.width * scale))]
            image = TF.resize(image, size, interpolation=self.interpolation)
            crop_rng = np.random.default_rng([self.seed, BUCKET_SEED_KEY, row])
        if self.args.center_crop:
            top, left = int(round((image.height - height) / 2.0)), int(round((image.width - width) / 2.0))
        else:
            top = int(crop_rng.integers(0, image.height - height + 1))
            left = int(crop_rng.integers(0, image.width - width + 1))
        image = TF.crop(image, top, left, height, width)
        if flip is None:
            flip = self.args.random_flip and rng.random() < 0.5
        if flip:
            image = TF.hflip(image)
        return TF.to_tensor(image) * 2.0 - 1.0  # [0, 1] -> [-1, 1], the VAE's input range

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
        epoch, row, weight = key
        rng = np.random.default_rng([self.seed, epoch, row])
        example = {"sample_weights": torch.tensor(weight, dtype=torch.float32)}
        if self.latent_cache is None:
            example["pixel_values"] = self.transform(self.open_image(row), row, rng)
        else:
            # The same draws as transform(): with a fixed crop only the flip is random.
            flipped = self.args.random_flip and rng.random() < 0.5
            group_of_row, place, latents = self.latent_cache
            example["latent_parameters"] = latents[group_of_row[row]][place[row], int(flipped)]
        choices = self.caption_choices(self.caption_rows[row][self.args.caption_column], row)
        choice = int(rng.integers(len(choices))) if len(choices) > 1 else 0
        caption = edit_caption(choices[choice], rng, self.caption_config)
        if self.text_cache is None:
            example["input_ids"] = tokenize(self.tokenizer, [caption], [0])[0]
        else:
            # The same draws as above; the cache lists each row's captions in order, and the empty caption once. A
            # caption that edit_caption replaced is the dropped (empty) one; an empty caption of the data is listed.
            offsets, indices, embeddings, empty_index = self.text_cache
            index = indices[offsets[row] + choice] if caption == choices[choice] else empty_index
            example["encoder_hidden_states"] = embeddings[index]
        return example


def check_images(dataset, accelerator):
    """Every image must decode before anything else happens (a bad file found hours in would stop every resume
    too). Each process checks its share of the rows; the failures are gathered, so all processes stop together.
    Returns every image's (width, height), which the buckets need."""
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    started = time.perf_counter()
    sizes, problems = inspect_images(dataset.verify_image, indices)
    found = list(zip(indices, sizes, strict=True))
    if accelerator.num_processes > 1:
        problems, found = gather_object(problems), gather_object(found)
    if problems:
        listed = "\n  ".join(sorted(problems)[:10])
        raise ValueError(f"{len(problems)} of {len(dataset)} images cannot be read; fix or remove them:\n  {listed}")
    logger.info(f"Checked {len(dataset)} images in {time.perf_counter() - started:.1f} s")
    return [size for _, size in sorted(found)]


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


def image_views(dataset, views, rows, indices):
    """Pixel batches for the latent cache: item i is rows[i // views], horizontally flipped when i % views is 1."""
    pixels = [
        dataset.transform(dataset.open_image(rows[i // views]), rows[i // views], rng=None, flip=i % views == 1)
        for i in indices
    ]
    return torch.stack(pixels)


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


def build_caches(train_dataset, vae, text_encoder, tokenizer, accelerator, args, num_workers):
    """--cache_latents: the VAE's latent distribution of every image (and its mirror image with --random_flip), at its
    bucket's size, so the VAE leaves the training loop. --cache_text_embeddings: the text encoder's output for every
    distinct caption (and the empty one, with --proportion_empty_prompts)."""
    caches = []
    if args.cache_latents:
        views = 2 if args.random_flip else 1
        group_of_row, groups = train_dataset.shape_groups()
        place, latents = np.zeros(len(train_dataset), np.int64), []
        for rows in groups:
            if not rows:  # a bucket no image went to
                latents.append(None)
                continue
            place[rows] = np.arange(len(rows))
            parameters = encode_once(
                accelerator,
                len(rows) * views,
                args.train_batch_size,
                functools.partial(image_views, train_dataset, views, rows),
                lambda pixels: vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters,
                f"Caching latents ({len(rows)} images)",
                num_workers,
            )
            latents.append(parameters.view(len(rows), views, *parameters.shape[1:]))
        train_dataset.latent_cache = (group_of_row, place, latents)
        caches.append(("latents", [tensor for tensor in latents if tensor is not None]))
    if args.cache_text_embeddings:
        # Each distinct caption once, in first-seen order (the same in every process); rows point into the list.
        distinct, indices, offsets = {}, [], [0]
        for row, value in enumerate(train_dataset.caption_rows[args.caption_column]):
            for caption in train_dataset.caption_choices(value, row):
                indices.append(distinct.setdefault(caption, len(distinct)))
            offsets.append(len(indices))
        empty_index = distinct.setdefault("", len(distinct)) if args.proportion_empty_prompts > 0 else None
        embeddings = encode_once(
            accelerator,
            len(distinct),
            args.train_batch_size,
            functools.partial(tokenize, tokenizer, list(distinct)),
            lambda input_ids: text_encoder(input_ids.to(text_encoder.device), return_dict=False)[0],
            "Caching text embeddings",
        )
        train_dataset.text_cache = (np.array(offsets), np.array(indices), embeddings, empty_index)
        caches.append(("text embeddings", [embeddings]))
    for name, tensors in caches:
        size = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors[:4]) + (", ..." if len(tensors) > 4 else "")
        logger.info(f"Cached {name}: {shapes} {tensors[0].dtype}, {size:.1f} MiB of CPU memory")


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


def probe_loss(accelerator, unet, noise_scheduler, latents, encoder_hidden_states, config, seed):
    """The loss the UNet's current weights give on a batch (the mean over processes), with draws of its own."""
    generator = torch.Generator(device=latents.device).manual_seed(seed)
    with torch.no_grad(), accelerator.autocast():
        loss = diffusion_loss(unet, noise_scheduler, latents, encoder_hidden_states, generator, config)
    return accelerator.reduce(loss.detach().float(), reduction="mean").item()


def trained_tensors(unet, ema_unet, optimizer):
    """Everything of the trained model a checkpoint or the final pipeline holds, by name."""
    yield from unet.named_parameters()
    if ema_unet is not None:
        yield from (
            (f"EMA {name}", shadow)
            for (name, _), shadow in zip(unet.named_parameters(), ema_unet.shadow_params, strict=True)
        )
    yield from optimizer_tensors(optimizer)


def load_component(cls, args, subfolder, **kwargs):
    """One part of the --pretrained_model_name_or_path pipeline, at --revision unless kwargs name another."""
    kwargs = {"revision": args.revision, "cache_dir": args.cache_dir, **kwargs}
    return cls.from_pretrained(args.pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


def make_ema_unet(args, device):
    """--use_ema: an exponential moving average of the UNet, starting from --revision's UNet (training may start from
    --non_ema_revision), on the device or, with --offload_ema, in CPU memory (pinned on GPU machines)."""
    ema_source = load_component(UNet2DConditionModel, args, "unet", variant=args.variant)
    ema_unet = EMAModel(
        ema_source.parameters(),
        model_cls=UNet2DConditionModel,
        model_config=ema_source.config,
        foreach=args.foreach_ema,
    )
    if args.offload_ema and torch.cuda.is_available():
        ema_unet.pin_memory()
    elif not args.offload_ema:
        ema_unet.to(device)
    return ema_unet


def register_checkpoint_hooks(accelerator, ema_unet, args):
    """Checkpoints hold loadable unet/ (and unet_ema/) folders instead of anonymous state dicts."""

    def save_model_hook(models, weights, output_dir):
        # Under DeepSpeed and FSDP every rank runs this hook, and their engines save the weights and leave `weights`
        # empty; the loadable folders are the main process's to write.
        if accelerator.is_main_process:
            if ema_unet is not None:
                ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "unet"))
        weights.clear()  # already saved above: Accelerate would write a second, anonymous copy

    def load_model_hook(models, input_dir):
        if ema_unet is not None:
            loaded = EMAModel.from_pretrained(
                os.path.join(input_dir, "unet_ema"), UNet2DConditionModel, foreach=args.foreach_ema
            )
            ema_unet.load_state_dict(loaded.state_dict())
            if not args.offload_ema:
                ema_unet.to(accelerator.device)
        while models:
            model = models.pop()
            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())

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
    """The batch's latents and text conditioning, from the frozen VAE and text encoder or from their caches. The VAE
    sample is the first draw from `generator`, made for the global batch `share` belongs to (see BatchShare)."""
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
        if "encoder_hidden_states" in batch:
            encoder_hidden_states = batch["encoder_hidden_states"].to(text_encoder.device, text_encoder.dtype)
        else:
            # The frozen text encoder's last hidden state conditions the UNet through cross-attention.
            encoder_hidden_states = text_encoder(batch["input_ids"].to(text_encoder.device), return_dict=False)[0]
    return latents, encoder_hidden_states


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


def validation_weights(args):
    """(grid tag suffix, whether it renders the EMA) for each grid --ema_validation asks for. An unsuffixed grid shows
    the weights that would be saved (the EMA with --use_ema); "-raw" grids show the weights the optimizer trains, so
    the two compare side by side at every validation (SimpleTuner's EMA validation, diffusers issue 7549)."""
    if not args.use_ema:
        return [("", False)]
    return {"ema": [("", True)], "raw": [("-raw", False)], "both": [("", True), ("-raw", False)]}[args.ema_validation]


def validate(accelerator, unet, ema_unet, components, args, seed, global_step, weight_dtype):
    """Render the validation prompts mid-training with the weights that would be saved now (the EMA with --use_ema),
    and with --ema_validation raw or both, with the raw trained weights."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        unet=accelerator.unwrap_model(unet),
        safety_checker=None,
        revision=args.revision,
        variant=args.variant,
        dtype=weight_dtype,
        cache_dir=args.cache_dir,
        **components,
    )
    pipeline.scheduler = inference_scheduler(pipeline.scheduler, args)
    for suffix, ema_weights in validation_weights(args):
        if ema_weights:
            ema_unet.store(unet.parameters())
            ema_unet.copy_to(unet.parameters())
        tag = "validation" + suffix
        log_validation(pipeline, args.validation_prompts, args, accelerator, seed, global_step, tag, weight_dtype)
        if ema_weights:
            ema_unet.restore(unet.parameters())
    del pipeline


def write_model_card(args, global_step, validation_grid):
    lines = [
        "---",
        "license: creativeml-openrail-m",
        f"base_model: {args.pretrained_model_name_or_path}",
        "tags:",
        "- stable-diffusion",
        "- text-to-image",
        "- diffusers",
        "library_name: diffusers",
        "---",
        "",
        f"# {os.path.basename(os.path.abspath(args.output_dir))}",
        "",
        f"UNet of `{args.pretrained_model_name_or_path}` fine-tuned with train_text_to_image.py on "
        f"`{args.dataset_name or args.train_data_dir}`.",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{args.hub_model_id or args.output_dir}")',
        f'image = pipe("{(args.validation_prompts or ["a photo"])[0]}").images[0]',
        "```",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| optimizer updates | {global_step} |",
        f"| learning rate | {args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warmup) |",
        f"| batch per device x accumulation | {args.train_batch_size} x {args.gradient_accumulation_steps} |",
        f"| resolution | {args.resolution} |",
        f"| mixed precision | {args.mixed_precision} |",
        f"| EMA | {args.use_ema} |",
        f"| Min-SNR gamma | {args.snr_gamma} |",
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


def save_pipeline(unet, args):
    """The full pipeline (frozen parts re-read in their original precision) in output_dir, written to a temporary
    folder first and switched in atomically (publish_pipeline), so a crash never leaves a broken model."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        unet=unet,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
    )
    # The model now predicts this target on this schedule: the saved scheduler must say so, or inference silently
    # goes wrong.
    pipeline.scheduler = inference_scheduler(pipeline.scheduler, args)
    partial = os.path.join(args.output_dir, ".pipeline.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        pipeline.save_pretrained(partial, safe_serialization=True)
        write_hub_style_text_encoder(os.path.join(partial, "text_encoder"))
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(write_failure("the pipeline", args.output_dir, err)) from err
    publish_pipeline(partial, args.output_dir)
    return pipeline


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
    for library in (datasets, diffusers):
        if accelerator.is_local_main_process:
            library.utils.logging.set_verbosity_warning()
        else:
            library.utils.logging.set_verbosity_error()
    if args.enable_xformers_memory_efficient_attention and not diffusers.utils.is_xformers_available():
        raise ImportError(
            "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers (GPU only)"
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise ValueError(
            f"--mixed_precision fp16 needs a CUDA GPU (this run is on {accelerator.device.type}): use bf16 or no"
        )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
    # Lin et al. 2023 (arXiv:2305.08891): rescaled betas reach zero SNR at the last timestep, so the model learns to
    # start from pure noise, as sampling does, and can make very dark and very bright images.
    noise_scheduler = load_component(
        DDPMScheduler, args, "scheduler", rescale_betas_zero_snr=args.rescale_betas_zero_snr
    )
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    prediction_type = noise_scheduler.config.prediction_type
    if args.dream_training and prediction_type != "epsilon":
        raise ValueError(f"--dream_training supports epsilon prediction only; this run predicts {prediction_type}")
    tokenizer = load_component(CLIPTokenizer, args, "tokenizer")
    text_encoder = load_component(CLIPTextModel, args, "text_encoder", variant=args.variant)
    vae = load_component(AutoencoderKL, args, "vae", variant=args.variant)
    unet = load_component(UNet2DConditionModel, args, "unet", revision=args.non_ema_revision)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    ema_unet = make_ema_unet(args, accelerator.device) if args.use_ema else None
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if accelerator.device.type == "cuda":
        # cuDNN's fastest convolution kernels for fp16/bf16 work on NHWC ("channels last") tensors.
        unet.to(memory_format=torch.channels_last)
    if args.torch_compile:
        unet.compile()  # in place: the module, its state-dict keys and save_pretrained stay as they are
    # The frozen models only run forward: keep them in the mixed-precision dtype. The UNet keeps fp32 master weights.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if args.save_single_file:  # refused now rather than after training
        single_file_layout(dict(unet.config), dict(vae.config), text_encoder.config.to_dict())
    register_checkpoint_hooks(accelerator, ema_unet, args)
    loss_config = LossConfig(
        prediction_type=prediction_type,
        snr_gamma=args.snr_gamma,
        noise_offset=args.noise_offset,
        input_perturbation=args.input_perturbation,
        dream_detail_preservation=args.dream_detail_preservation if args.dream_training else None,
        **recipe_fields(args, prediction_type, noise_scheduler.config.num_train_timesteps),
    )

    # ------------------------------------------------------------------------------------------------------- data
    train_dataset = ImageCaptionDataset(load_image_caption_dataset(args, seed), tokenizer, args, seed)
    image_sizes = check_images(train_dataset, accelerator)
    # The run depends on the global batch, not on how many processes share it: batches and draws are made for it.
    global_batch_size = args.train_batch_size * accelerator.num_processes
    if args.use_aspect_ratio_buckets:
        # The VAE shrinks images by 2 per block after its first; the UNet halves latents per down block after its first.
        model_factor = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.down_block_types) - 1)
        setup_buckets(train_dataset, image_sizes, args, model_factor, global_batch_size)
        epoch_global_batches = functools.partial(bucket_batches, train_dataset.bucket_of_row, global_batch_size, seed)
    else:
        epoch_global_batches = functools.partial(shuffled_batches, len(train_dataset), global_batch_size, seed)
    num_workers = default_num_workers(args, accelerator)
    build_caches(train_dataset, vae, text_encoder, tokenizer, accelerator, args, num_workers)
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
    optimizer = make_optimizer(args, unet.parameters())
    unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)
    # global_step counts optimizer updates; --max_train_steps is authoritative and epochs are derived from it.
    batches_per_epoch = len(train_dataloader)
    if args.gradient_accumulation_steps > batches_per_epoch:
        raise ValueError(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} is more than the {batches_per_epoch} "
            f"batches of an epoch ({len(train_dataset)} examples, {args.train_batch_size} per device x "
            f"{accelerator.num_processes} processes): use at most {batches_per_epoch}, or a smaller batch"
        )
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
    # The prepared scheduler steps once per process at every update, hence the factor num_processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    run_metadata = {"seed": seed, "total_batch_size": total_batch_size, "updates_per_epoch": updates_per_epoch}
    run_metadata["process_count"] = accelerator.num_processes  # information only: the run does not depend on it
    run_metadata["aspect_ratio_buckets"] = [list(bucket) for bucket in train_dataset.buckets or []] or None

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
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
    logger.info("***** Running training *****")
    logger.info(
        f"  Examples = {len(train_dataset)}, epochs = {num_train_epochs}, updates per epoch = {updates_per_epoch}"
    )
    logger.info(
        f"  Batch per device = {args.train_batch_size}, processes = {accelerator.num_processes}, "
        f"accumulation = {args.gradient_accumulation_steps}, total batch = {total_batch_size}"
    )
    logger.info(f"  Optimizer updates = {max_train_steps}, starting at {global_step}, seed = {seed}")
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
    # Schedule-free AdamW steps one sequence of weights and evaluates another, its average: it trains in train mode
    # and is switched to eval mode (on every process) whenever the weights are checked, rendered or saved. The other
    # optimizers have no modes, and Accelerate makes these calls no-ops for them.
    optimizer.train()
    last_batch = None  # (latents, encoder_hidden_states) of the last batch, to probe the weights before writing them
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
            with accelerator.accumulate(unet):
                latents, encoder_hidden_states = encode_batch(batch, vae, text_encoder, generator, share)
                sample_weights = batch["sample_weights"].to(latents.device)
                loss = diffusion_loss(
                    unet, noise_scheduler, latents, encoder_hidden_states, generator, loss_config, sample_weights, share
                )
                window.add_batch(loss, group_size)
                accelerator.backward(loss * (args.gradient_accumulation_steps / group_size))
                last_batch = (latents, encoder_hidden_states)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            window.add_update(grad_norm)
            if ema_unet is not None:
                if args.offload_ema:
                    ema_unet.to(device=accelerator.device, non_blocking=True)
                ema_unet.step(unet.parameters())
                if args.offload_ema:
                    ema_unet.to(device="cpu", non_blocking=True)
            progress_bar.update(1)
            stopping = stop_agreed(stop_request, accelerator, stop_group)  # a SIGTERM / SIGUSR1 on any process
            is_checkpoint_step = global_step % args.checkpointing_steps == 0 or stopping
            # Reading the loss back waits for the device: only at logging steps, and before a checkpoint is written
            # (the read raises on a non-finite loss).
            if global_step % args.logging_steps == 0 or is_checkpoint_step or global_step >= max_train_steps:
                logs = window.read(global_step, epoch, lr_scheduler.get_last_lr()[0])
                accelerator.log(logs, step=global_step)
                logger.info(format_logs(global_step, logs))
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            if is_checkpoint_step:
                optimizer.eval()  # a checkpoint's UNet is the model at this step; resume switches back exactly
                tensors = trained_tensors(accelerator.unwrap_model(unet), ema_unet, optimizer)
                probe = probe_loss(accelerator, unet, noise_scheduler, *last_batch, loss_config, seed)
                check_finite(tensors, probe, "the UNet", global_step)
                save_checkpoint(accelerator, args.output_dir, global_step, run_metadata, args.checkpoints_total_limit)
                optimizer.train()
            if stopping:
                accelerator.wait_for_everyone()
                logger.warning(preemption_message(stop_request, global_step))
                accelerator.end_training()
                sys.exit(PREEMPTED_EXIT_CODE)
            if global_step >= max_train_steps:
                break

        end_of_run = global_step >= max_train_steps
        if args.validation_prompts and (epoch + 1) % args.validation_epochs == 0 and not end_of_run:
            optimizer.eval()
            if accelerator.is_main_process:
                components = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
                validate(accelerator, unet, ema_unet, components, args, seed, global_step, weight_dtype)
            accelerator.wait_for_everyone()
            optimizer.train()

    # ------------------------------------------------------------------------------------------------------- save
    optimizer.eval()
    if last_batch is not None:  # what is about to be saved, checked as every checkpoint is
        tensors = trained_tensors(accelerator.unwrap_model(unet), ema_unet, optimizer)
        probe = probe_loss(accelerator, unet, noise_scheduler, *last_batch, loss_config, seed)
        check_finite(tensors, probe, "the UNet", global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        renders = validation_weights(args) if args.validation_prompts else []
        if ema_unet is not None:
            if ("-raw", False) in renders:
                ema_unet.store(final_unet.parameters())  # the raw weights, rendered after the saved EMA
            ema_unet.copy_to(final_unet.parameters())
        pipeline = save_pipeline(final_unet, args)
        if args.save_single_file:
            save_single_file(args, prediction_type, global_step)
        grid = None
        if renders:
            pipeline = pipeline.to(accelerator.device)
            pipeline.safety_checker = None
            for suffix, ema_weights in renders:
                if ema_unet is not None and not ema_weights:
                    ema_unet.restore(final_unet.parameters())
                prompts, tag = args.validation_prompts, "final" + suffix
                log_validation(pipeline, prompts, args, accelerator, seed, global_step, tag, torch.float32)
            grid = f"validation/final{renders[0][0]}-step-{global_step:06d}.png"
        write_model_card(args, global_step, grid)
        logger.info(f"Saved the pipeline to {os.path.abspath(args.output_dir)}")
        if args.push_to_hub:
            push_to_hub(args)
    accelerator.end_training()
    if output_lock is not None:
        output_lock.release()


if __name__ == "__main__":
    main()

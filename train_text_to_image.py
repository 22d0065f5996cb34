#!/usr/bin/env python
"""Fine-tune the UNet of a Stable Diffusion 1.x / 2.x or SDXL pipeline on image-caption pairs (PyTorch + Accelerate).

One GPU (or CPU):
    accelerate launch train_text_to_image.py \
      --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --dataset_name=lambdalabs/naruto-blip-captions --resolution=512 --center_crop --random_flip \
      --train_batch_size=1 --gradient_accumulation_steps=4 --gradient_checkpointing --mixed_precision=fp16 \
      --max_train_steps=15000 --learning_rate=1e-05 --max_grad_norm=1 --lr_scheduler=constant --lr_warmup_steps=0 \
      --use_ema --checkpointing_steps=500 --validation_prompts "yoda" --output_dir=sd-naruto-model

SDXL (found from the pipeline: a second text encoder), with the fp16-safe VAE:
    accelerate launch train_text_to_image.py \
      --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \
      --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix \
      --dataset_name=lambdalabs/naruto-blip-captions --resolution=1024 --random_flip --train_batch_size=1 \
      --gradient_accumulation_steps=4 --gradient_checkpointing --mixed_precision=fp16 --max_train_steps=10000 \
      --learning_rate=1e-06 --lr_scheduler=constant --lr_warmup_steps=0 --output_dir=sdxl-naruto-model

Several GPUs: run `accelerate config` once, then `accelerate launch --multi_gpu train_text_to_image.py <same flags>`.
Several machines (the same on each, --machine_rank 0 on the one at --main_process_ip; output_dir shared by all):
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \
      --main_process_ip 10.0.0.1 --main_process_port 29500 train_text_to_image.py <same flags>
Two CPU processes (DDP over gloo, what the tests do):
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train_text_to_image.py <same flags>
After a crash or preemption, relaunch the same command with --resume_from_checkpoint=latest: the resumed run ends
with the same weights as one that was never interrupted, on the same or another number of processes as long as the
global batch (batch x processes x accumulation) is the same.
This file keeps the recipe you edit; the machinery it shares with the other scripts (run folder, checkpoints,
batching, image checks, single-file export) is the sdtrain/ package beside it: copy both together.
"""

import dataclasses
import functools
import importlib
import importlib.util
import io
import os
import shutil

from sdtrain.batching import (
    BatchShare,
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
from sdtrain.cli import ArgumentParser, UserError, WriteFailure, add_debug_argument, run
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
from sdtrain.hub import add_hub_arguments, hub_problem, push_to_hub
from sdtrain.images import load_rgb, verify_image
from sdtrain.logs import add_tracker_arguments, report_to_problem, tracker_hyperparameters, warmup_applied
from sdtrain.long_prompts import add_long_prompt_arguments, log_cut_captions
from sdtrain.lora import LoraConfig, add_lora_arguments, lora_identity, lora_problem, save_lora
from sdtrain.masks import DatasetMasks, MaskConfig, add_mask_arguments, crop_and_flip, mask_problem
from sdtrain.model_cards import fine_tuned_card, lora_card, write_model_card
from sdtrain.preemption import StopRequest
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
    checkpoint_metadata,
    find_resume_checkpoint,
    publish_pipeline,
    read_checkpoint_metadata,
    write_failure,
)
from sdtrain.seeds import add_seed_argument, choose_seed, derive_seed, draw_seed
from sdtrain.single_file import SingleFileConfig, add_single_file_arguments, save_single_file, single_file_layout
from sdtrain.sizes import check_model_sizes, size_factors
from sdtrain.validation_loss import ValidationLossConfig, add_validation_loss_arguments, validation_loss_problem

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
    parser = ArgumentParser(description="Fine-tune the UNet of a Stable Diffusion pipeline on image-caption pairs.")
    add_config_argument(parser)
    group = parser.add_argument_group("Model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a diffusers Stable Diffusion 1.x / 2.x or SDXL pipeline.",
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
        "--non_ema_revision",
        type=str,
        default=None,
        help="Revision holding the non-EMA UNet to train from (the EMA copy starts from --revision).",
    )
    group.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Training target; default: the scheduler config's prediction_type.",
    )
    add_lora_arguments(parser.add_argument_group("LoRA"))
    group = parser.add_argument_group("Data")
    add_dataset_arguments(group)
    add_crop_arguments(group)
    add_mask_arguments(group)
    group.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=INTERPOLATION_MODES,
        help="Interpolation used to resize images.",
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="Data loading worker processes; default: 4 on GPU (with pinned memory), 0 (the main process) on CPU.",
    )
    add_cache_arguments(group)
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
        help="Recompute UNet activations in the backward pass to save memory.",
    )
    group.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate (after warmup).")
    group.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps x batch size x processes.",
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
    group.add_argument(
        "--dream_training",
        action="store_true",
        help="Use DREAM (Diffusion Rectification and Estimation-Adaptive Models).",
    )
    group.add_argument(
        "--dream_detail_preservation", type=float, default=1.0, help="DREAM detail preservation factor p (> 0)."
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
    group.add_argument("--offload_ema", action="store_true", help="Keep the EMA weights in CPU memory between updates.")
    group.add_argument(
        "--foreach_ema", action="store_true", help="Update the EMA with fused foreach kernels (faster, more memory)."
    )
    add_optimizer_arguments(parser.add_argument_group("Optimizer"))
    group.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Clip gradients to this global norm (0 turns clipping off)."
    )
    group.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: the accelerate config's.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    group.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Use xformers attention (needs xformers; PyTorch SDPA is the default).",
    )
    group.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the UNet with torch.compile: a slower start (minutes), faster steps.",
    )
    group.add_argument("--local_rank", type=int, default=-1, help="Set by distributed launchers; do not pass by hand.")
    group = parser.add_argument_group("Checkpointing")
    group.add_argument(
        "--output_dir",
        type=str,
        default="sd-model-finetuned",
        help="Where the final pipeline, checkpoints, validation images and logs go.",
    )
    add_single_file_arguments(group)
    add_checkpoint_arguments(group)
    group = parser.add_argument_group("Logging and validation")
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
    add_tracker_arguments(group)
    group.add_argument(
        "--tracker_project_name", type=str, default="text2image-fine-tune", help="Project name passed to the tracker."
    )
    add_hub_arguments(group, "Upload the final pipeline to the Hugging Face Hub.")
    add_validation_loss_arguments(parser.add_argument_group("Validation loss on held-out images (docs/evaluation.md)"))
    args = parse_with_config(parser, argv)

    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("no training data: pass --dataset_name (hub id or local dataset folder) or --train_data_dir")
    if lora_problem(args):
        parser.error(lora_problem(args))
    if args.rank is not None and args.non_ema_revision not in (None, args.revision):
        parser.error("--non_ema_revision with --rank: a LoRA trains on the UNet it is loaded onto, --revision's")
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
    problem = validation_problem("--validation_prompts", args.validation_prompts, args.validation_resolution)
    if problem:
        parser.error(problem)
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
    problem = caption_problem(CaptionConfig.from_args(args)) or mask_problem(MaskConfig.from_args(args))
    if problem:
        parser.error(problem)
    if args.cache_text_embeddings and (args.shuffle_caption or args.caption_tag_dropout_rate > 0):
        parser.error(
            "--shuffle_caption and --caption_tag_dropout_rate change a caption at every use, and "
            "--cache_text_embeddings encodes each caption once: use one or the other"
        )
    if args.dream_training and args.dream_detail_preservation <= 0:
        parser.error("--dream_detail_preservation must be positive")
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
        report_to_problem(args.report_to),
    ):
        if problem:
            parser.error(problem)
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("--hub_token with --report_to=wandb would leak the token to wandb; use `hf auth login` instead")
    return args


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
# The frameworks load only here, after the arguments are parsed and checked: --help and a mistyped flag answer
# at once, before the seconds torch, JAX and diffusers take to import.
# ----------------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    ARGS = parse_args()

import datasets
import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_dream_and_update_latents
from torchvision.transforms import InterpolationMode

import sdtrain.torch.lora as lora
from sdtrain.captions import edit_caption  # imports datasets
from sdtrain.torch.checkpoints import (
    check_finite,
    final_save_failed,
    optimizer_tensors,
    register_unet_folder_hooks,
    resume,
    save_checkpoint,
)
from sdtrain.torch.data import GlobalBatchSampler, batch_loader, check_images, default_num_workers, encode_once
from sdtrain.torch.family import family_code
from sdtrain.torch.long_prompts import long_prompt_code, long_prompt_pipeline, token_ids
from sdtrain.torch.loop import (
    LogWindow,
    accumulation_group_size,
    epoch_batches,
    stop_agreed,
    stop_run,
    training_length,
    updates_progress_bar,
)
from sdtrain.torch.models import ModelSource, inference_scheduler, load_component, load_model, model_family
from sdtrain.torch.setup import AcceleratorConfig, begin_training, end_training, log_plan, make_accelerator
from sdtrain.torch.text import write_hub_style_text_encoder
from sdtrain.torch.validation import log_validation
from sdtrain.torch.validation_loss import HeldOutLoss, held_out_rows

logger = get_logger(__name__, log_level="INFO")


# ----------------------------------------------------------------------------------------------------------------------
# The recipe's parts: dataset, models, loss, optimizer, validation and saving (the machinery is in sdtrain/)
# ----------------------------------------------------------------------------------------------------------------------


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Rows -> {pixel_values or latent_parameters, input_ids or encoder_hidden_states (+ pooled_text_embeds),
    caption_kept, sample_weights}, and time_ids with added_conditioning (the family's: SDXL's size conditioning).
    Indexed by (epoch, row, weight) keys: crop, flip and caption edits are drawn from an RNG seeded by (seed, epoch,
    row), so the same sample is identical in a resumed run, and the cached path draws exactly what the uncached one
    does. `tokenizers`: one per text encoder (two for SDXL); input_ids holds a row of ids for each."""

    def __init__(self, rows, tokenizers, args, seed, added_conditioning=False):
        self.rows, self.tokenizers, self.args, self.seed = rows, tokenizers, args, seed
        self.added_conditioning = added_conditioning
        self.resample = TF.pil_modes_mapping[InterpolationMode[args.image_interpolation_mode.upper()]]
        self.masks = DatasetMasks(MaskConfig.from_args(args), self.image_source, rows, self.resample)
        self.caption_config = CaptionConfig.from_args(args)
        # Captions stay in the (memory-mapped) dataset: a Python list of them would be copied into every worker.
        self.caption_rows = rows.select_columns([args.caption_column])
        choices = [
            caption_choices(value, row, args.caption_column)
            for row, value in enumerate(self.caption_rows[args.caption_column])
        ]
        log_cut_captions(tokenizers[0], choices, args.max_token_length)  # rows checked now, not hours in; cuts logged
        # Set in main() from setup_buckets(): each row's bucket and the buckets' (height, width); None crops squares.
        self.bucket_of_row = None
        self.buckets = None
        # Set by build_caches(): (each row's group, its place in the group, [group][place, flipped] -> the VAE's latent
        # distribution parameters), and (per-row offsets, caption indices, [caption] -> text-encoder output, the
        # empty caption's index).
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

    def shape_groups(self):
        """Rows that share an image size, as (each row's group, the rows of each group): the buckets, or one group."""
        group_of_row = np.zeros(len(self), np.int64) if self.buckets is None else np.asarray(self.bucket_of_row)
        return group_of_row, [np.flatnonzero(group_of_row == group).tolist() for group in range(group_of_row.max() + 1)]

    def crop_box(self, row, image_width, image_height, rng):
        """Where the row's training crop comes from (see sdtrain.batching.crop_box, shared with the JAX twin)."""
        bucket = None if self.buckets is None else self.buckets[self.bucket_of_row[row]]
        return crop_box(
            (image_width, image_height), rng, self.args.resolution, self.args.center_crop, bucket, self.seed, row
        )

    def time_ids(self, row, box, flipped):
        """SDXL's size conditioning of the row's crop (see sdtrain.batching.size_conditioning)."""
        return torch.tensor(size_conditioning(self.image_sizes[row], box, flipped), dtype=torch.float32)

    def transform(self, image, row, rng, flip=None):
        """The row's image as the training crop, in [-1, 1], and its crop box (see crop_box)."""
        box = self.crop_box(row, image.width, image.height, rng)
        flip = (self.args.random_flip and rng.random() < 0.5) if flip is None else flip
        image = crop_and_flip(image, box, flip, self.resample)  # as self.masks moves the mask
        return TF.to_tensor(image) * 2.0 - 1.0, box, flip  # [0, 1] -> [-1, 1], the VAE's input range

    def __getitem__(self, key):
        epoch, row, weight = key
        rng = np.random.default_rng([self.seed, epoch, row])
        example = {"sample_weights": torch.tensor(weight, dtype=torch.float32)}
        if self.latent_cache is None:
            example["pixel_values"], box, flipped = self.transform(self.open_image(row), row, rng)
        else:
            # The same draws as transform(): with a fixed crop only the flip is random.
            flipped = self.args.random_flip and rng.random() < 0.5
            group_of_row, place, latents = self.latent_cache
            example["latent_parameters"] = latents[group_of_row[row]][place[row], int(flipped)]
            box = None  # the fixed crop, which crop_box() gives without a draw
        if self.added_conditioning:
            box = box or self.crop_box(row, *self.image_sizes[row], rng=None)
            example["time_ids"] = self.time_ids(row, box, flipped)
        if self.masks:  # with cached latents, from the cache beside them
            example["mask"] = torch.from_numpy(self.masks(row, box, flipped))
        choices = caption_choices(self.caption_rows[row][self.args.caption_column], row, self.args.caption_column)
        choice = int(rng.integers(len(choices))) if len(choices) > 1 else 0
        caption = edit_caption(choices[choice], rng, self.caption_config)
        # Where the pipeline samples the unconditional branch from zeros (force_zeros_for_empty_prompt), an empty
        # caption, dropped or in the data, trains that branch: encode_batch zeroes its conditioning.
        example["caption_kept"] = torch.tensor(float(caption != ""))
        if self.text_cache is None:
            example["input_ids"] = token_ids(self.tokenizers, [caption], self.args.max_token_length)[0]
        else:
            # The same draws as above; the cache lists each row's captions in order, and the empty caption once. A
            # caption that edit_caption replaced is the dropped (empty) one; an empty caption of the data is listed.
            offsets, indices, embeddings, pooled, empty_index = self.text_cache
            index = indices[offsets[row] + choice] if caption == choices[choice] else empty_index
            example["encoder_hidden_states"] = embeddings[index]
            if pooled is not None:
                example["pooled_text_embeds"] = pooled[index]
        return example


def image_views(dataset, views, rows, indices):
    """Pixel batches for the latent cache: item i is rows[i // views], horizontally flipped when i % views is 1."""
    pixels = [
        dataset.transform(dataset.open_image(rows[i // views]), rows[i // views], rng=None, flip=i % views == 1)[0]
        for i in indices
    ]
    return torch.stack(pixels)


def build_caches(train_dataset, vae, text_encoders, code, accelerator, args, num_workers):
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
        train_dataset.masks.fill_cache(lambda r: train_dataset.crop_box(r, *train_dataset.image_sizes[r], None), views)
        caches.append(("latents", [tensor for tensor in latents if tensor is not None]))
    if args.cache_text_embeddings:
        # Each distinct caption once, in first-seen order (the same in every process); rows point into the list.
        distinct, indices, offsets = {}, [], [0]
        for row, value in enumerate(train_dataset.caption_rows[args.caption_column]):
            for caption in caption_choices(value, row, args.caption_column):
                indices.append(distinct.setdefault(caption, len(distinct)))
            offsets.append(len(indices))
        empty_index = distinct.setdefault("", len(distinct)) if args.proportion_empty_prompts > 0 else None
        captions = list(distinct)
        embeddings, pooled = encode_once(
            accelerator,
            len(distinct),
            args.train_batch_size,
            lambda indices: token_ids(train_dataset.tokenizers, [captions[i] for i in indices], args.max_token_length),
            lambda input_ids: code.encode_text(text_encoders, input_ids.to(text_encoders[0].device)),
            "Caching text embeddings",
        )
        train_dataset.text_cache = (np.array(offsets), np.array(indices), embeddings, pooled, empty_index)
        caches.append(("text embeddings", [tensor for tensor in (embeddings, pooled) if tensor is not None]))
    for name, tensors in caches:
        size = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors[:4]) + (", ..." if len(tensors) > 4 else "")
        logger.info(f"Cached {name}: {shapes} {tensors[0].dtype}, {size:.1f} MiB of CPU memory")


def probe_loss(accelerator, unet, noise_scheduler, latents, encoder_hidden_states, added_cond_kwargs, config, seed):
    """The loss the UNet's current weights give on a batch (the mean over processes), with draws of its own."""
    generator = torch.Generator(device=latents.device).manual_seed(seed)
    with torch.no_grad(), accelerator.autocast(), lora.evaluating([unet]):  # evaluating: no LoRA dropout
        loss = diffusion_loss(
            unet,
            noise_scheduler,
            latents,
            encoder_hidden_states,
            generator,
            config,
            added_cond_kwargs=added_cond_kwargs,
        )
    return accelerator.reduce(loss.detach().float(), reduction="mean").item()


def trained_tensors(trained, ema, optimizer):
    """Everything of the trained model a checkpoint or the final save holds, by name: the trained parameters (the
    UNet's, or the LoRA's: `trained`, (name, parameter) pairs), their EMA and the optimizer's state."""
    yield from trained
    if ema is not None:
        yield from ((f"EMA {name}", shadow) for (name, _), shadow in zip(trained, ema.shadow_params, strict=True))
    yield from optimizer_tensors(optimizer)


def make_ema_unet(args, device, adapter_parameters=None):
    """--use_ema: an exponential moving average of the UNet, starting from --revision's UNet (training may start from
    --non_ema_revision), or with --rank of the LoRA's adapter_parameters only; on the device or, with --offload_ema, in
    CPU memory (pinned on GPU machines)."""
    if adapter_parameters is not None:
        ema_unet = EMAModel(adapter_parameters, foreach=args.foreach_ema)
    else:
        ema_source = load_component(UNet2DConditionModel, ModelSource.from_args(args), "unet", variant=args.variant)
        ema_unet = EMAModel(
            ema_source.parameters(),
            model_cls=UNet2DConditionModel,
            model_config=ema_source.config,
            foreach=args.foreach_ema,
        )
    if args.offload_ema and torch.cuda.is_available():
        ema_unet.to(device="cpu")  # the text encoders' adapter (--train_text_encoder) was made on the GPU
        ema_unet.pin_memory()
    elif not args.offload_ema:
        ema_unet.to(device)
    return ema_unet


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


def encode_batch(batch, vae, text_encoders, code, generator, share, train_text=False):
    """The batch's latents and text conditioning (encoder_hidden_states, and the UNet's added_cond_kwargs or None),
    from the frozen VAE and the family's text encoders (`code`: sdtrain.torch.family) or from their caches. The VAE
    sample is the first draw from `generator`, made for the global batch `share` belongs to (see BatchShare).
    train_text: the text encoders' LoRA trains (--train_text_encoder), so the text is encoded with gradients."""
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
    with torch.set_grad_enabled(train_text):
        device, dtype = text_encoders[0].device, text_encoders[0].dtype
        if "encoder_hidden_states" in batch:
            encoder_hidden_states = batch["encoder_hidden_states"].to(device, dtype)
            pooled_text_embeds = batch.get("pooled_text_embeds")
        else:
            # The text encoders' hidden states condition the UNet through cross-attention.
            encoder_hidden_states, pooled_text_embeds = code.encode_text(text_encoders, batch["input_ids"].to(device))
        if code.family.force_zeros_for_empty_prompt:
            # The pipeline samples its unconditional branch from zeros, so an empty caption trains on zeros (SDXL's
            # pooled embedding too), unless its model_index.json says force_zeros_for_empty_prompt: false.
            kept = batch["caption_kept"].to(device, dtype)
            encoder_hidden_states = encoder_hidden_states * kept[:, None, None]
            pooled_text_embeds = pooled_text_embeds.to(device, dtype) * kept[:, None]
        # SDXL: the pooled text embedding and the size conditioning enter through the UNet's added embedding.
        added_cond_kwargs = code.added_conditioning(pooled_text_embeds, batch.get("time_ids"))
        if added_cond_kwargs:  # cached embeddings and size conditioning come from CPU memory
            added_cond_kwargs = {name: value.to(device, dtype) for name, value in added_cond_kwargs.items()}
    return latents, encoder_hidden_states, added_cond_kwargs


# ----------------------------------------------------- BEGIN MATH -----------------------------------------------------


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


def diffusion_loss(
    unet,
    noise_scheduler,
    latents,
    encoder_hidden_states,
    generator,
    config,
    sample_weights=None,
    share=None,
    added_cond_kwargs=None,
    mask=None,
):
    """The denoising loss of a batch of clean latents, averaged over the batch (weighted by `sample_weights` when
    given: a padded batch holds examples of weight 0). Every random draw comes from `generator`, in the JAX twin's
    order: noise, offset noise, input perturbation, timesteps; each is drawn for the global batch `share` belongs to
    (None: this batch is the whole batch) and cut to its rows. added_cond_kwargs: SDXL's pooled text embedding and size
    conditioning (None for SD 1.x / 2.x). mask: --masked_loss's latent-grid weights, (batch, 1, h, w)."""
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

    model_pred = unet(
        noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False
    )[0]
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
    if mask is not None:
        # Masked loss (kohya issue 2083): weights over their per-sample mean (all ones: the plain loss; all zeros: 0).
        mask_mean = mask.mean(dim=(1, 2, 3), keepdim=True)
        loss = loss * torch.where(mask_mean > 0, mask / torch.clamp(mask_mean, min=1e-12), 0.0)
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


def validation_weights(args):
    """(grid tag suffix, whether it renders the EMA) for each grid --ema_validation asks for. An unsuffixed grid shows
    the weights that would be saved (the EMA with --use_ema); "-raw" grids show the weights the optimizer trains, so
    the two compare side by side at every validation (SimpleTuner's EMA validation, diffusers issue 7549)."""
    if not args.use_ema:
        return [("", False)]
    return {"ema": [("", True)], "raw": [("-raw", False)], "both": [("", True), ("-raw", False)]}[args.ema_validation]


def validate(accelerator, code, unet, ema_unet, components, args, seed, global_step, weight_dtype, parameters):
    """Render the validation prompts mid-training with the weights that would be saved now (the EMA with --use_ema),
    and with --ema_validation raw or both, with the raw trained weights. components: the other models by their
    pipeline names; parameters: the trained ones (the UNet's, or the LoRA's), which the EMA swaps."""
    pipeline = code.pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path,
        unet=accelerator.unwrap_model(unet),
        **code.validation_components(),
        revision=args.revision,
        variant=args.variant,
        dtype=weight_dtype,
        cache_dir=args.cache_dir,
        **components,
    )
    pipeline.scheduler = inference_scheduler(pipeline.scheduler, args.prediction_type, args.rescale_betas_zero_snr)
    pipeline = long_prompt_pipeline(pipeline, code)  # --max_token_length: prompts encoded as the captions are
    for suffix, ema_weights in validation_weights(args):
        if ema_weights:
            ema_unet.store(parameters)
            ema_unet.copy_to(parameters)
        prompts, size, tag = args.validation_prompts, args.validation_resolution, "validation" + suffix
        with lora.evaluating([unet, *components.values()]):  # no LoRA dropout
            log_validation(pipeline, prompts, size, args.output_dir, accelerator, seed, global_step, tag, weight_dtype)
        if ema_weights:
            ema_unet.restore(parameters)
    del pipeline


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


def save_pipeline(unet, args, code, adapted=()):
    """The full pipeline (frozen parts re-read in their original precision, the --pretrained_vae_model_name_or_path VAE
    in place of the pipeline's) in output_dir, written to a temporary folder first and switched in atomically
    (publish_pipeline), so a crash never leaves a broken model. With a LoRA (adapted: the models holding it) only its
    files are written, and the pipeline is built only for the final renders (None without): the adapted models, fp32."""
    if adapted:
        config, width = LoraConfig.from_args(args), unet.config.cross_attention_dim
        save_lora(args.output_dir, lora.adapter_state(adapted), config, code.family, width)
        if not args.validation_prompts:
            return None
    replaced = dict(adapted[1:])  # the text encoders with their LoRA
    if args.pretrained_vae_model_name_or_path:
        replaced["vae"] = AutoencoderKL.from_pretrained(
            args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir
        )
    pipeline = code.pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path,
        unet=unet,
        **replaced,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
    )
    # The model now predicts this target on this schedule: the saved scheduler must say so, or inference silently
    # goes wrong.
    pipeline.scheduler = inference_scheduler(pipeline.scheduler, args.prediction_type, args.rescale_betas_zero_snr)
    if adapted:
        lora.set_training(adapted, False)  # nothing trains any more: rendered without dropout, in fp32 as loaded
        return pipeline.to(dtype=torch.float32)
    partial = os.path.join(args.output_dir, ".pipeline.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        pipeline.save_pretrained(partial, safe_serialization=True)
        for name in code.family.text_encoders:
            if os.path.isdir(os.path.join(partial, name)):
                write_hub_style_text_encoder(os.path.join(partial, name))
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise WriteFailure(write_failure("the pipeline", args.output_dir, err)) from err
    publish_pipeline(partial, args.output_dir)
    logger.info(f"Saved the pipeline to {os.path.abspath(args.output_dir)}")
    return pipeline


def main(args):
    # ------------------------------------------------------------------------------------------------------ setup
    accelerator = make_accelerator(AcceleratorConfig.from_args(args), libraries=(datasets, diffusers))
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise UserError(
            f"--mixed_precision fp16 needs a CUDA GPU (this run is on {accelerator.device.type}): use bf16 or no"
        )
    # Only the main process writes, and only into a folder that is absent, empty or a run's, never the model's own.
    # It takes the folder (and its lock) just before training, so that a run refused before then writes nothing.
    if accelerator.is_main_process:
        model_folders = {"--pretrained_model_name_or_path": args.pretrained_model_name_or_path}
        model_folders["--pretrained_vae_model_name_or_path"] = args.pretrained_vae_model_name_or_path
        check_output_dir(args.output_dir, model_folders)
    accelerator.wait_for_everyone()
    stop_request = StopRequest()
    # A CPU side channel for agreeing on stop requests, so that it never waits for the GPU.
    stop_group = torch.distributed.new_group(backend="gloo") if accelerator.num_processes > 1 else None
    resume_path = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    resume_metadata = read_checkpoint_metadata(resume_path)
    # Process 0's draw on every process when there is no --seed, so that all shuffle and draw alike.
    seed = choose_seed(args.seed, resume_metadata, broadcast_object_list([draw_seed()])[0])

    # ------------------------------------------------------------------------------------------------ load models
    source = ModelSource.from_args(args)
    # SD 1.x / 2.x or SDXL, from model_index.json before any weights load; any other family is named and refused.
    # What differs between them is the family's: `code` loads and encodes its text (sdtrain/torch/family.py).
    family = model_family(source)
    code = family_code(family)
    if family.added_conditioning and args.dream_training:  # DREAM's extra UNet call passes no added conditioning
        raise UserError(f"--dream_training supports Stable Diffusion 1.x / 2.x pipelines; this one is {family.title}")
    # A size the model cannot train or render at is refused now, from the configs, not at the first validation.
    check_model_sizes(
        args.pretrained_model_name_or_path,
        args.pretrained_vae_model_name_or_path,
        args.revision,
        args.cache_dir,
        args.resolution,
        args.validation_resolution,
        args.aspect_ratio_buckets,
    )
    # Lin et al. 2023 (arXiv:2305.08891): rescaled betas reach zero SNR at the last timestep, so the model learns to
    # start from pure noise, as sampling does, and can make very dark and very bright images.
    noise_scheduler = load_component(
        DDPMScheduler, source, "scheduler", rescale_betas_zero_snr=args.rescale_betas_zero_snr
    )
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    prediction_type = noise_scheduler.config.prediction_type
    if args.dream_training and prediction_type != "epsilon":
        raise UserError(f"--dream_training supports epsilon prediction only; this run predicts {prediction_type}")
    tokenizers = code.load_tokenizers(source)
    code = long_prompt_code(code, tokenizers, args.max_token_length)  # --max_token_length: captions in 77-token chunks
    text_encoders = code.load_text_encoders(source, variant=args.variant)
    if args.pretrained_vae_model_name_or_path:
        flag = "--pretrained_vae_model_name_or_path"
        vae = load_model(AutoencoderKL, args.pretrained_vae_model_name_or_path, "", flag, cache_dir=args.cache_dir)
    else:
        vae = load_component(AutoencoderKL, source, "vae", variant=args.variant)
    unet = load_component(UNet2DConditionModel, source, "unet", revision=args.non_ema_revision)
    vae.requires_grad_(False)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False)
    unet.train()
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
    # SDXL's VAE overflows in fp16 and says so (force_upcast): it stays in fp32. An fp16-safe VAE says otherwise.
    vae_dtype = code.vae_dtype(vae.config, weight_dtype)
    vae.to(accelerator.device, dtype=vae_dtype)
    logger.info(
        f"VAE in {vae_dtype}" + (" (its config asks for it: force_upcast)" if vae_dtype != weight_dtype else "")
    )
    for text_encoder in text_encoders:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    # --rank: a LoRA (Hu et al. 2021, arXiv:2106.09685) trains in fp32 beside the frozen base, in weight_dtype.
    adapted = lora.add_adapters(unet, text_encoders, family, LoraConfig.from_args(args), weight_dtype, seed)
    trained = list(lora.adapter_parameters(adapted) if adapted else unet.named_parameters())  # (name, parameter)
    parameters, text_parameters = [p for _, p in trained], [p for _, p in lora.adapter_parameters(adapted[1:])]
    ema_unet = make_ema_unet(args, accelerator.device, parameters if adapted else None) if args.use_ema else None
    if args.save_single_file:  # refused now rather than after training
        single_file_layout(dict(unet.config), dict(vae.config), [encoder.config.to_dict() for encoder in text_encoders])
    if adapted:  # a checkpoint holds the adapter, not the base model
        lora.register_lora_hooks(accelerator, adapted, ema_unet, args.offload_ema)
    else:
        register_unet_folder_hooks(accelerator, ema_unet, args.foreach_ema, args.offload_ema)
    loss_config = LossConfig(
        prediction_type=prediction_type,
        snr_gamma=args.snr_gamma,
        noise_offset=args.noise_offset,
        input_perturbation=args.input_perturbation,
        dream_detail_preservation=args.dream_detail_preservation if args.dream_training else None,
        **recipe_fields(RecipeConfig.from_args(args), prediction_type, noise_scheduler.config.num_train_timesteps),
    )

    # ------------------------------------------------------------------------------------------------------- data
    rows, held_rows = held_out_rows(ValidationLossConfig.from_args(args), DatasetConfig.from_args(args), seed)
    train_dataset = ImageCaptionDataset(rows, tokenizers, args, seed, family.added_conditioning)
    image_sizes = train_dataset.image_sizes = check_images(train_dataset.verify_image, len(train_dataset), accelerator)
    # The run depends on the global batch, not on how many processes share it: batches and draws are made for it.
    global_batch_size = args.train_batch_size * accelerator.num_processes
    if args.use_aspect_ratio_buckets:
        # Every bucket side is a multiple of it (check_model_sizes refused any other at the start).
        model_factor = size_factors(vae.config, unet.config)[1]
        train_dataset.bucket_of_row, train_dataset.buckets = setup_buckets(
            image_sizes, BucketConfig.from_args(args), model_factor, global_batch_size
        )
        epoch_global_batches = functools.partial(bucket_batches, train_dataset.bucket_of_row, global_batch_size, seed)
    else:
        epoch_global_batches = functools.partial(shuffled_batches, len(train_dataset), global_batch_size, seed)
    num_workers = default_num_workers(args.dataloader_num_workers, accelerator.device)
    build_caches(train_dataset, vae, text_encoders, code, accelerator, args, num_workers)
    held_out = None
    if held_rows is not None:  # center crops, unflipped, each in the bucket it would train in (docs/evaluation.md)
        held_args = type(args)(**{**vars(args), "center_crop": True, "random_flip": False, "masked_loss": False})
        held_dataset = ImageCaptionDataset(held_rows, tokenizers, held_args, seed, family.added_conditioning)
        models = (vae, unet.config, text_encoders, code, noise_scheduler, prediction_type, train_dataset.buckets)
        held_out = HeldOutLoss(ValidationLossConfig.from_args(args), held_dataset, models, accelerator, seed)
    sampler = GlobalBatchSampler(epoch_global_batches, args.train_batch_size, accelerator.num_processes)
    train_dataloader = batch_loader(train_dataset, sampler, num_workers, accelerator.device)

    # ---------------------------------------------------------------------------------- optimizer and schedule
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, parameters)
    unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)
    # global_step counts optimizer updates; --max_train_steps is authoritative and epochs are derived from it.
    batches_per_epoch = len(train_dataloader)
    layout = (
        f"{len(train_dataset)} examples, {args.train_batch_size} per device x {accelerator.num_processes} processes"
    )
    updates_per_epoch, max_train_steps, num_train_epochs = training_length(
        batches_per_epoch, args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs, layout
    )
    # The prepared scheduler steps once per process at every update, hence the factor num_processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    # What this run trains, recorded in its checkpoints: a checkpoint resumes only a run of the same kind.
    run_identity = {"script": "train_text_to_image.py", "lora": lora_identity(LoraConfig.from_args(args))}
    run_metadata = checkpoint_metadata(
        run_identity, seed, total_batch_size, updates_per_epoch, accelerator.num_processes
    )
    run_metadata["aspect_ratio_buckets"] = [list(bucket) for bucket in train_dataset.buckets or []] or None

    # ----------------------------------------------------------------------------------------------------- resume
    global_step = resume(accelerator, resume_path, resume_metadata, run_identity, run_metadata)
    first_epoch = global_step // updates_per_epoch

    script, tracker_config = os.path.basename(__file__), tracker_hyperparameters(vars(args))
    output_lock = begin_training(
        accelerator, args.output_dir, script, [args.logging_dir, RUN_CONFIG], args.tracker_project_name, tracker_config
    )
    if accelerator.is_main_process:
        write_config(args.output_dir, args, seed=seed)
    logger.info("***** Running training *****")
    logger.info(
        f"  Examples = {len(train_dataset)}, epochs = {num_train_epochs}, updates per epoch = {updates_per_epoch}"
    )
    log_plan(accelerator, args.train_batch_size, args.gradient_accumulation_steps, max_train_steps, global_step, seed)

    # ------------------------------------------------------------------------------------------------- train loop
    generator = torch.Generator(device=accelerator.device)
    share = BatchShare.of_process(accelerator.process_index, args.train_batch_size, accelerator.num_processes)
    progress_bar = updates_progress_bar(accelerator, max_train_steps, global_step)
    window = LogWindow(accelerator, total_batch_size, global_step)
    # Schedule-free AdamW steps one sequence of weights and evaluates another, its average: it trains in train mode
    # and is switched to eval mode (on every process) whenever the weights are checked, rendered or saved. The other
    # optimizers have no modes, and Accelerate makes these calls no-ops for them.
    optimizer.train()
    last_batch = None  # the last batch's encode_batch(), to probe the weights before writing them
    stop_request.stop_on_ctrl_c(True)  # from here on, an update is in progress for Ctrl-C to let finish
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        # Resumed mid-epoch, the batches the interrupted run had consumed are skipped.
        batches = epoch_batches(
            accelerator,
            train_dataloader,
            sampler,
            epoch,
            global_step,
            updates_per_epoch,
            args.gradient_accumulation_steps,
        )
        for batch_index, batch in batches:
            generator.manual_seed(derive_seed(seed, epoch, batch_index))  # the same in every process: see BatchShare
            group_size = accumulation_group_size(batch_index, args.gradient_accumulation_steps, batches_per_epoch)
            with accelerator.accumulate(unet):
                latents, encoder_hidden_states, added_cond_kwargs = encode_batch(
                    batch, vae, text_encoders, code, generator, share, bool(text_parameters)
                )
                sample_weights = batch["sample_weights"].to(latents.device)
                conditioning = (encoder_hidden_states, generator, loss_config, sample_weights, share, added_cond_kwargs)
                loss = diffusion_loss(unet, noise_scheduler, latents, *conditioning, mask=batch.get("mask"))
                window.add_batch(loss, group_size)
                accelerator.backward(loss * (args.gradient_accumulation_steps / group_size))
                last_batch = (latents, encoder_hidden_states, added_cond_kwargs)
                if accelerator.sync_gradients:  # the text encoders' LoRA (the UNet's gradients are DDP's)
                    lora.average_gradients(text_parameters, accelerator.num_processes)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
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
                ema_unet.step(parameters)
                if args.offload_ema:
                    ema_unet.to(device="cpu", non_blocking=True)
            progress_bar.update(1)
            if held_out is not None:  # the held-out loss, every --validation_loss_steps and at the end
                held_out.evaluate(global_step, max_train_steps, args.output_dir, unet, optimizer, ema_unet, parameters)
            stopping = stop_agreed(stop_request, accelerator, stop_group)  # a SIGTERM / SIGUSR1 / Ctrl-C on any process
            is_checkpoint_step = global_step % args.checkpointing_steps == 0 or stopping
            # Reading the loss back waits for the device: only at logging steps, and before a checkpoint is written
            # (the read raises on a non-finite loss).
            if global_step % args.logging_steps == 0 or is_checkpoint_step or global_step >= max_train_steps:
                window.log(global_step, epoch, lr_scheduler.get_last_lr()[0], progress_bar)
            if is_checkpoint_step:
                optimizer.eval()  # a checkpoint's UNet is the model at this step; resume switches back exactly
                tensors = trained_tensors(trained, ema_unet, optimizer)
                probe = probe_loss(accelerator, unet, noise_scheduler, *last_batch, loss_config, seed)
                check_finite(tensors, probe, "the LoRA" if adapted else "the UNet", global_step)
                save_checkpoint(accelerator, args.output_dir, global_step, run_metadata, args.checkpoints_total_limit)
                optimizer.train()
            if stopping:
                stop_run(stop_request, accelerator, global_step)
            if global_step >= max_train_steps:
                break

        end_of_run = global_step >= max_train_steps
        if args.validation_prompts and (epoch + 1) % args.validation_epochs == 0 and not end_of_run:
            optimizer.eval()
            if accelerator.is_main_process:
                components = {"vae": vae, **code.components(text_encoders, tokenizers)}
                validation = (components, args, seed, global_step, weight_dtype, parameters)
                validate(accelerator, code, unet, ema_unet, *validation)
            accelerator.wait_for_everyone()
            optimizer.train()

    # ------------------------------------------------------------------------------------------------------- save
    stop_request.stop_on_ctrl_c(False)  # nothing left to finish: Ctrl-C interrupts the save as usual
    optimizer.eval()
    if last_batch is not None:  # what is about to be saved, checked as every checkpoint is
        tensors = trained_tensors(trained, ema_unet, optimizer)
        probe = probe_loss(accelerator, unet, noise_scheduler, *last_batch, loss_config, seed)
        check_finite(tensors, probe, "the LoRA" if adapted else "the UNet", global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        renders = validation_weights(args) if args.validation_prompts else []
        if ema_unet is not None:
            # The raw weights are kept: rendered after the saved EMA, and checkpointed if the save fails.
            ema_unet.store(parameters)
            ema_unet.copy_to(parameters)
        try:
            pipeline = save_pipeline(final_unet, args, code, adapted)
            if args.save_single_file:
                save_single_file(SingleFileConfig.from_args(args), prediction_type, global_step)
        except Exception as err:  # a full disk, most often: the steps since the last checkpoint must not be lost
            if ema_unet is not None:
                ema_unet.restore(parameters)
            raise final_save_failed(accelerator, args.output_dir, global_step, run_metadata, err) from err
        grid = None
        if renders:
            pipeline = long_prompt_pipeline(pipeline.to(accelerator.device), code)
            for name, component in code.validation_components().items():  # SD renders without its safety checker
                setattr(pipeline, name, component)
            for suffix, ema_weights in renders:
                if ema_unet is not None and not ema_weights:
                    ema_unet.restore(parameters)
                prompts, size, tag = args.validation_prompts, args.validation_resolution, "final" + suffix
                log_validation(
                    pipeline, prompts, size, args.output_dir, accelerator, seed, global_step, tag, torch.float32
                )
            grid = f"validation/final{renders[0][0]}-step-{global_step:06d}.png"
        write_model_card(args.output_dir, model_card(code.family, args, global_step, grid))
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
    end_training(accelerator, output_lock)


if __name__ == "__main__":
    run(functools.partial(main, ARGS), debug=ARGS.debug)

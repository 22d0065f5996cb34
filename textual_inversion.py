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

SDXL: the placeholder gets rows in both text encoders, saved as learned_embeds.safetensors and
learned_embeds_2.safetensors (diffusers) and <name>.safetensors with clip_l / clip_g (A1111/Forge, ComfyUI, InvokeAI):
    accelerate launch textual_inversion.py \
      --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \
      --train_data_dir=./cat_toy --placeholder_token="<cat-toy>" --initializer_token=toy --resolution=1024 \
      --train_batch_size=1 --gradient_accumulation_steps=4 --max_train_steps=1000 --learning_rate=5.0e-04 \
      --mixed_precision=bf16 --validation_prompt="a <cat-toy> on the beach" --output_dir=textual_inversion_cat_sdxl

Several GPUs: run `accelerate config` once, then `accelerate launch --multi_gpu textual_inversion.py <same flags>`.
Two CPU processes (DDP over gloo, what the tests do):
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 textual_inversion.py <same flags>
After a crash or preemption, relaunch the same command with --resume_from_checkpoint=latest: the resumed run ends
with the same embeddings as one that was never interrupted.
This file keeps the recipe you edit; the machinery it shares with the other scripts (run folder, checkpoints,
batching, image checks, single-file export) is the sdtrain/ package beside it: copy both together.
"""

import dataclasses
import functools
import importlib
import importlib.util
import os
import shutil

from sdtrain.batching import BatchShare, parse_size, sdxl_time_ids, shuffled_batches
from sdtrain.checks import training_problem, validation_problem
from sdtrain.cli import ArgumentParser, UserError, WriteFailure, add_debug_argument, run
from sdtrain.config_file import RUN_CONFIG, add_config_argument, parse_with_config, write_config
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
from sdtrain.hub import add_hub_arguments, hub_problem, push_to_hub
from sdtrain.images import load_rgb
from sdtrain.logs import add_tracker_arguments, report_to_problem, tracker_hyperparameters
from sdtrain.masks import ExampleMasks, MaskConfig, add_mask_arguments, mask_problem, square_crop_and_flip
from sdtrain.model_cards import textual_inversion_card, write_model_card
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
    flush_file,
    fsync_folder,
    publish_pipeline,
    read_checkpoint_metadata,
    write_failure,
)
from sdtrain.seeds import add_seed_argument, choose_seed, derive_seed, draw_seed
from sdtrain.sizes import check_model_sizes

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
    parser = ArgumentParser(
        description="Learn the text embedding of a new token from a few images (textual inversion)."
    )
    add_config_argument(parser)
    group = parser.add_argument_group("Model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of a diffusers Stable Diffusion 1.x / 2.x or SDXL pipeline.",
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
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="Data loading worker processes; default: 4 on GPU (with pinned memory), 0 (the main process) on CPU.",
    )
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every example image and its mirror image once before training and train from the stored latents.",
    )
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
        help="Recompute activations in the backward pass to save memory.",
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
        "--lr_num_cycles", type=int, default=1, help="Hard restarts of the cosine_with_restarts schedule."
    )
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
        choices=["no", "fp16", "bf16"],
        help="Mixed precision for the frozen UNet and VAE.",
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
        help="Compile the UNet and the text encoder with torch.compile: a slower start (minutes), faster steps.",
    )
    group.add_argument("--local_rank", type=int, default=-1, help="Set by distributed launchers; do not pass by hand.")
    group = parser.add_argument_group("Checkpointing and saving")
    group.add_argument(
        "--output_dir",
        type=str,
        default="text-inversion-model",
        help="Where the embeddings, checkpoints, validation images and logs go.",
    )
    group.add_argument(
        "--save_steps",
        type=int,
        default=500,
        help="Also save learned_embeds(_2 for SDXL)-steps-N every this many optimizer updates.",
    )
    add_embedding_format_argument(group)
    group.add_argument(
        "--no_safe_serialization",
        action="store_true",
        help="Save the embeddings as .bin (torch.save) instead of .safetensors.",
    )
    group.add_argument(
        "--save_as_full_pipeline",
        action="store_true",
        help="Also save the full pipeline with the extended tokenizer and text encoder.",
    )
    add_checkpoint_arguments(group)
    group = parser.add_argument_group("Logging and validation")
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
    group.add_argument(
        "--validation_epochs",
        type=int,
        default=None,
        help="Deprecated: validate every this many epochs (converted to --validation_steps).",
    )
    add_tracker_arguments(group)
    add_hub_arguments(group, "Upload the embeddings and the full pipeline to the Hugging Face Hub.")
    args = parse_with_config(parser, argv)

    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    positive = "num_vectors repeats resolution train_batch_size max_train_steps gradient_accumulation_steps save_steps"
    for name in (
        positive + " checkpointing_steps validation_steps num_validation_images logging_steps lr_num_cycles"
    ).split():
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ["checkpoints_total_limit", "validation_epochs"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}")
    if not args.placeholder_token.strip() or any(c.isspace() for c in args.placeholder_token):
        parser.error(f"--placeholder_token {args.placeholder_token!r} must be one word without spaces")
    if report_to_problem(args.report_to) is not None:
        parser.error(report_to_problem(args.report_to))
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("--hub_token with --report_to=wandb would leak the token to wandb; use `hf auth login` instead")
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

import diffusers
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_dream_and_update_latents

from sdtrain.torch.checkpoints import check_finite, final_save_failed, optimizer_tensors, resume, save_checkpoint
from sdtrain.torch.data import GlobalBatchSampler, batch_loader, default_num_workers, encode_once
from sdtrain.torch.family import family_code
from sdtrain.torch.loop import (
    LogWindow,
    accumulation_group_size,
    epoch_batches,
    stop_agreed,
    stop_run,
    training_length,
    updates_progress_bar,
)
from sdtrain.torch.models import ModelSource, inference_scheduler, load_component, model_family
from sdtrain.torch.setup import AcceleratorConfig, begin_training, end_training, log_plan, make_accelerator
from sdtrain.torch.text import tokenize, write_hub_style_text_encoder
from sdtrain.torch.validation import log_validation

logger = get_logger(__name__, log_level="INFO")


# ----------------------------------------------------------------------------------------------------------------------
# The recipe's parts: dataset, models, loss, optimizer, validation and saving (the machinery is in sdtrain/)
# ----------------------------------------------------------------------------------------------------------------------


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
    does. `tokenizers`: one per text encoder (two for SDXL); input_ids holds a row of ids for each, and with
    added_conditioning (the family's: SDXL's size conditioning) each example has its time_ids."""

    def __init__(self, image_paths, tokenizers, placeholder_text, args, seed, added_conditioning=False):
        self.image_paths, self.tokenizers, self.placeholder_text = image_paths, tokenizers, placeholder_text
        self.args, self.seed = args, seed
        self.templates = STYLE_TEMPLATES if args.learnable_property == "style" else OBJECT_TEMPLATES
        self.latent_cache = None  # [image, flipped] -> VAE latent distribution parameters, set by build_latent_cache()
        self.masks = ExampleMasks(MaskConfig.from_args(args), image_paths, args.resolution, args.center_crop)
        # Every image's (width, height) as decoded (EXIF rotation applied): SDXL's original-size conditioning.
        self.image_sizes = [load_rgb(path, path).size for path in image_paths] if added_conditioning else None

    def __len__(self):
        return len(self.image_paths) * self.args.repeats

    def pixels(self, image_index, flip):
        image = load_rgb(self.image_paths[image_index], self.image_paths[image_index])
        image = square_crop_and_flip(image, self.args.resolution, self.args.center_crop, flip)  # as self.masks does
        return TF.to_tensor(image) * 2.0 - 1.0  # [0, 1] -> [-1, 1], the VAE's input range

    def time_ids(self, image_index, flipped):
        """SDXL's size conditioning of the example (sdxl_time_ids): the crop pixels() takes, at --resolution."""
        width, height = self.image_sizes[image_index]
        time_ids = sdxl_time_ids(width, height, self.args.resolution, self.args.center_crop, flipped)
        return torch.tensor(time_ids, dtype=torch.float32)

    def __getitem__(self, key):
        epoch, index, weight = key
        rng = np.random.default_rng([self.seed, epoch, index])
        image_index, flipped = index % len(self.image_paths), rng.random() < 0.5
        prompt = self.templates[int(rng.integers(len(self.templates)))].format(self.placeholder_text)
        input_ids = torch.stack([tokenize(tokenizer, [prompt], [0])[0] for tokenizer in self.tokenizers])
        example = {"input_ids": input_ids, "sample_weights": torch.tensor(weight)}
        if self.image_sizes is not None:
            example["time_ids"] = self.time_ids(image_index, flipped)
        if self.latent_cache is None:
            example["pixel_values"] = self.pixels(image_index, flipped)
        else:
            example["latent_parameters"] = self.latent_cache[image_index, int(flipped)]
        if self.masks:
            example["mask"] = torch.from_numpy(self.masks(image_index, flipped))
        return example


def image_views(dataset, indices):
    """Pixel batches for the latent cache: item i is example image i // 2, horizontally flipped when i is odd."""
    return torch.stack([dataset.pixels(i // 2, flip=i % 2 == 1) for i in indices])


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
    if train_dataset.masks:  # the masks beside the latents, both flips
        train_dataset.masks.fill_cache()
    size = parameters.numel() * parameters.element_size() / 2**20
    logger.info(
        f"Cached latents: {tuple(train_dataset.latent_cache.shape)} {parameters.dtype}, {size:.1f} MiB of CPU memory"
    )


def probe_loss(accelerator, unet, text_encoders, code, noise_scheduler, latents, input_ids, time_ids, config, seed):
    """The loss the learned rows give now on a batch (the mean over processes), with draws of its own."""
    generator = torch.Generator(device=latents.device).manual_seed(seed)
    with torch.no_grad(), accelerator.autocast():
        conditioning = text_conditioning(text_encoders, code, input_ids, time_ids, latents.dtype)
        encoder_hidden_states, added_cond_kwargs = conditioning
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


def register_checkpoint_hooks(accelerator, learned_embeddings, args):
    """A checkpoint holds the new rows only, in the learned_embeds format (learned_embeds_2 for SDXL's second text
    encoder), not a copy of the whole text encoder."""

    def save_model_hook(models, weights, output_dir):
        # Under DeepSpeed and FSDP every rank runs this hook; the file is the main process's to write.
        if accelerator.is_main_process:
            for index, learned_embedding in enumerate(learned_embeddings):
                path = os.path.join(output_dir, f"{learned_embeds_name(index)}.safetensors")
                save_embeddings({args.placeholder_token: learned_embedding.learned}, path)
        weights.clear()  # the text encoders are frozen but for these rows: no copy of them in the checkpoint

    def load_model_hook(models, input_dir):
        for index, learned_embedding in enumerate(learned_embeddings):
            path = os.path.join(input_dir, f"{learned_embeds_name(index)}.safetensors")
            if not os.path.exists(path):
                raise UserError(f"{input_dir}: no {os.path.basename(path)}; is it a checkpoint of this pipeline?")
            saved = safetensors.torch.load_file(path)
            if args.placeholder_token not in saved:
                raise UserError(
                    f"{input_dir} was trained for {', '.join(saved)}, not --placeholder_token "
                    f"{args.placeholder_token}: resume it with that token, or start a new --output_dir"
                )
            rows = saved[args.placeholder_token]
            if rows.shape != learned_embedding.learned.shape:
                raise UserError(
                    f"{path}: learned embeddings of shape {tuple(rows.shape)}, "
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


def text_conditioning(text_encoders, code, input_ids, time_ids, dtype):
    """The UNet's conditioning from the family's (`code`: sdtrain.torch.family) text encoders: encoder_hidden_states,
    and added_cond_kwargs (SDXL's pooled embedding and size conditioning) or None. Cast to the dtype of the frozen
    UNet, which is the latents' (the mixed-precision dtype)."""
    encoder_hidden_states, pooled_text_embeds = code.encode_text(text_encoders, input_ids)
    added_cond_kwargs = code.added_conditioning(pooled_text_embeds, time_ids)
    if added_cond_kwargs:
        added_cond_kwargs = {name: value.to(dtype) for name, value in added_cond_kwargs.items()}
    return encoder_hidden_states.to(dtype), added_cond_kwargs


def encode_batch(batch, vae, text_encoders, code, generator, share, unet_dtype):
    """The batch's latents in the frozen UNet's dtype, from the frozen VAE or its cache (the VAE sample is the first
    draw from `generator`, made for the global batch `share` belongs to: see BatchShare), and its text conditioning
    (encoder_hidden_states, and added_cond_kwargs or None), which carries gradients back to the new embedding rows."""
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
        latents = latents.to(unet_dtype)  # an fp32 VAE (SDXL's: see main) beside a reduced-precision UNet
    # The text encoders run with gradients: they reach the new token embedding rows and nothing else.
    input_ids, time_ids = batch["input_ids"].to(latents.device), batch.get("time_ids")
    time_ids = None if time_ids is None else time_ids.to(latents.device)
    return latents, *text_conditioning(text_encoders, code, input_ids, time_ids, latents.dtype)


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


def learned_array(rows):
    return rows.detach().float().cpu().numpy()


def save_embeddings(tensors, path, safe_serialization=True):
    """{key: rows[num_vectors, hidden]}, keys as embedding_files() names them (the placeholder for diffusers, the UIs'
    keys). Written to a temporary name, flushed to disk and renamed, so a crash never leaves a truncated file."""
    state = {key: learned.detach().float().cpu().contiguous() for key, learned in tensors.items()}
    partial = path + ".partial"
    try:
        if safe_serialization:
            safetensors.torch.save_file(state, partial, metadata={"format": "pt"})
        else:
            torch.save(state, partial)
        flush_file(partial)
    except (OSError, RuntimeError) as err:
        if os.path.exists(partial):
            os.remove(partial)
        raise WriteFailure(write_failure(os.path.basename(path), os.path.dirname(path), err)) from err
    os.replace(partial, path)
    fsync_folder(os.path.dirname(path))


def validate(
    accelerator, code, text_encoders, tokenizers, unet, vae, prompts, args, seed, global_step, tag, weight_dtype
):
    """Render the validation prompts with the embedding learned so far, through the frozen pipeline."""
    text_encoders = [accelerator.unwrap_model(text_encoder) for text_encoder in text_encoders]
    pipeline = code.pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path,
        **code.components(text_encoders, tokenizers),
        unet=unet,
        vae=vae,
        **code.validation_components(),
        revision=args.revision,
        variant=args.variant,
        dtype=weight_dtype,
        cache_dir=args.cache_dir,
    )
    pipeline.scheduler = inference_scheduler(pipeline.scheduler, args.prediction_type, args.rescale_betas_zero_snr)
    log_validation(
        pipeline,
        prompts,
        args.validation_resolution,
        args.output_dir,
        accelerator,
        seed,
        global_step,
        tag,
        weight_dtype,
    )


def model_card(family, args, global_step, validation_grid):
    """README.md: the license and tags of the base model's family, how to load the embedding and use the token."""
    suffix = "bin" if args.no_safe_serialization else "safetensors"
    paths = [f"{args.output_dir}/{learned_embeds_name(index)}.{suffix}" for index in range(family.num_text_encoders)]
    prompt = args.validation_prompt or "a photo of a " + args.placeholder_token
    token = (args.placeholder_token, args.num_vectors)
    base_model, data = args.pretrained_model_name_or_path, args.train_data_dir
    return textual_inversion_card(family, base_model, *token, data, global_step, paths, prompt, validation_grid)


def save_full_pipeline(code, text_encoders, tokenizers, unet, vae, weight_dtype, args):
    """The pipeline with the extended tokenizer(s) and standard text encoder(s) holding the learned rows, written to a
    temporary folder first. The frozen UNet and VAE are re-read from the source when training held them in
    reduced precision, so the saved files keep the original precision."""
    token_embeddings = [text_encoder.get_input_embeddings() for text_encoder in text_encoders]
    for text_encoder, tokenizer, token_embedding in zip(text_encoders, tokenizers, token_embeddings, strict=True):
        text_encoder.set_input_embeddings(token_embedding.merged())
        text_encoder.config.vocab_size = len(tokenizer)
    frozen = {"unet": unet, "vae": vae} if weight_dtype == torch.float32 else {}
    components = code.components(text_encoders, tokenizers)
    pipeline = code.pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path,
        **components,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **frozen,
    )
    # The saved scheduler says what this run trained with (prediction type, zero terminal SNR).
    pipeline.scheduler = inference_scheduler(pipeline.scheduler, args.prediction_type, args.rescale_betas_zero_snr)
    partial = os.path.join(args.output_dir, ".pipeline.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        pipeline.save_pretrained(partial, safe_serialization=not args.no_safe_serialization)
        for name in code.family.text_encoders:
            write_hub_style_text_encoder(os.path.join(partial, name))
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise WriteFailure(write_failure("the pipeline", args.output_dir, err)) from err
    publish_pipeline(partial, args.output_dir)
    for text_encoder, token_embedding in zip(text_encoders, token_embeddings, strict=True):
        text_encoder.set_input_embeddings(token_embedding)


def main(args):
    # ------------------------------------------------------------------------------------------------------ setup
    accelerator = make_accelerator(AcceleratorConfig.from_args(args), libraries=(diffusers,))
    image_paths = find_example_images(args.train_data_dir)
    ExampleMasks(MaskConfig.from_args(args), image_paths, args.resolution, args.center_crop).check()  # --masked_loss
    # Only the main process writes, and only into a folder that is absent, empty or a run's, never the model's own.
    # It takes the folder (and its lock) just before training, so that a run refused before then writes nothing.
    if accelerator.is_main_process:
        check_output_dir(args.output_dir, {"--pretrained_model_name_or_path": args.pretrained_model_name_or_path})
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
    # What differs between them is the family's: `code` loads and encodes its text (sdtrain/torch/family.py). SDXL
    # has two text encoders, each with its own tokenizer and its own copy of the placeholder's rows.
    family = model_family(source)
    code = family_code(family)
    # A size the model cannot train or render at is refused now, from the configs, not at the first validation.
    path = args.pretrained_model_name_or_path
    check_model_sizes(path, None, args.revision, args.cache_dir, args.resolution, args.validation_resolution)
    tokenizers = code.load_tokenizers(source, args.tokenizer_name)
    # Lin et al. 2023 (arXiv:2305.08891): rescaled betas reach zero SNR at the last timestep, as sampling starts.
    noise_scheduler = load_component(
        DDPMScheduler, source, "scheduler", rescale_betas_zero_snr=args.rescale_betas_zero_snr
    )
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    text_encoders = code.load_text_encoders(source, variant=args.variant)
    vae = load_component(AutoencoderKL, source, "vae", variant=args.variant)
    unet = load_component(UNet2DConditionModel, source, "unet", variant=args.variant)
    # Everything is frozen; the only trainable tensors are the new rows (one set per text encoder), each starting at
    # the initializer's embedding in that encoder.
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    learned_embeddings = []
    for text_encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        text_encoder.requires_grad_(False)
        placeholder_tokens, placeholder_ids, learned_embedding = add_learned_embedding(
            text_encoder, tokenizer, args.placeholder_token, args.initializer_token, args.num_vectors
        )
        learned_embeddings.append(learned_embedding)
        text_encoder.train()
    # The scale of each vocabulary, which no learned row that works comes near (check_embedding_scale).
    vocabulary_norms = [
        embedding.base.weight.detach().float().norm(dim=1).max().item() for embedding in learned_embeddings
    ]
    if args.gradient_checkpointing:
        # Gradients flow through the frozen UNet back to the text encoders; checkpointing saves their activations.
        unet.train()
        unet.enable_gradient_checkpointing()
        for text_encoder in text_encoders:
            text_encoder.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    # The frozen UNet and VAE run in the mixed-precision dtype; the text encoders and the new rows stay fp32. SDXL's
    # VAE overflows in fp16 and says so (force_upcast): it stays in fp32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae_dtype = code.vae_dtype(vae.config, weight_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=vae_dtype)
    logger.info(
        f"VAE in {vae_dtype}" + (" (its config asks for it: force_upcast)" if vae_dtype != weight_dtype else "")
    )
    if accelerator.device.type == "cuda":
        # cuDNN's fastest convolution kernels for fp16/bf16 work on NHWC ("channels last") tensors.
        unet.to(memory_format=torch.channels_last)
    if args.torch_compile:
        unet.compile()  # in place: the modules and their state-dict keys stay as they are
        for text_encoder in text_encoders:
            text_encoder.compile()
    register_checkpoint_hooks(accelerator, learned_embeddings, args)
    prediction_type = noise_scheduler.config.prediction_type
    loss_config = LossConfig(
        prediction_type=prediction_type,
        snr_gamma=args.snr_gamma,
        **recipe_fields(RecipeConfig.from_args(args), prediction_type, noise_scheduler.config.num_train_timesteps),
    )

    # ------------------------------------------------------------------------------------------------------- data
    placeholder_text = " ".join(placeholder_tokens)
    train_dataset = TextualInversionDataset(
        image_paths, tokenizers, placeholder_text, args, seed, family.added_conditioning
    )
    num_workers = default_num_workers(args.dataloader_num_workers, accelerator.device)
    if args.cache_latents:
        build_latent_cache(train_dataset, vae, accelerator, args, num_workers)
    # The run depends on the global batch, not on how many processes share it: batches and draws are made for it.
    global_batch_size = args.train_batch_size * accelerator.num_processes
    epoch_global_batches = functools.partial(shuffled_batches, len(train_dataset), global_batch_size, seed)
    sampler = GlobalBatchSampler(epoch_global_batches, args.train_batch_size, accelerator.num_processes)
    train_dataloader = batch_loader(train_dataset, sampler, num_workers, accelerator.device)

    # ---------------------------------------------------------------------------------- optimizer and schedule
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    learned_rows = [learned_embedding.learned for learned_embedding in learned_embeddings]
    optimizer = make_optimizer(args, learned_rows)
    *text_encoders, optimizer, train_dataloader = accelerator.prepare(*text_encoders, optimizer, train_dataloader)
    # global_step counts optimizer updates; --max_train_steps is authoritative and epochs are derived from it.
    batches_per_epoch = len(train_dataloader)
    layout = (
        f"{len(train_dataset)} examples, {args.train_batch_size} per device x {accelerator.num_processes} processes"
    )
    updates_per_epoch, max_train_steps, num_train_epochs = training_length(
        batches_per_epoch, args.gradient_accumulation_steps, args.max_train_steps, None, layout
    )
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
    # What this run trains, recorded in its checkpoints: a checkpoint resumes only a run of the same kind.
    run_identity = {
        "script": "textual_inversion.py",
        "placeholder_token": args.placeholder_token,
        "num_vectors": args.num_vectors,
    }
    run_metadata = checkpoint_metadata(
        run_identity, seed, total_batch_size, updates_per_epoch, accelerator.num_processes
    )

    # ----------------------------------------------------------------------------------------------------- resume
    global_step = resume(accelerator, resume_path, resume_metadata, run_identity, run_metadata)
    first_epoch = global_step // updates_per_epoch

    tracker_config = tracker_hyperparameters(vars(args))
    script = os.path.basename(__file__)
    output_lock = begin_training(
        accelerator, args.output_dir, script, [args.logging_dir, RUN_CONFIG], "textual_inversion", tracker_config
    )
    if accelerator.is_main_process:
        write_config(args.output_dir, args, seed=seed)
    embeds_suffix = "bin" if args.no_safe_serialization else "safetensors"
    validation_prompts = [args.validation_prompt] * args.num_validation_images if args.validation_prompt else []
    validation_models = (text_encoders, tokenizers, unet, vae, validation_prompts)
    logger.info("***** Running training *****")
    logger.info(
        f"  Images = {len(image_paths)} x {args.repeats} repeats, epochs = {num_train_epochs}, "
        f"updates per epoch = {updates_per_epoch}"
    )
    logger.info(
        f"  Placeholder {args.placeholder_token} -> {placeholder_tokens} (ids {placeholder_ids}), "
        f"initialised from {args.initializer_token!r}"
    )
    log_plan(accelerator, args.train_batch_size, args.gradient_accumulation_steps, max_train_steps, global_step, seed)

    # ------------------------------------------------------------------------------------------------- train loop
    generator = torch.Generator(device=accelerator.device)
    share = BatchShare.of_process(accelerator.process_index, args.train_batch_size, accelerator.num_processes)
    progress_bar = updates_progress_bar(accelerator, max_train_steps, global_step)
    window = LogWindow(accelerator, total_batch_size, global_step)
    last_batch = None  # (latents, input_ids, time_ids) of the last batch, to probe the new rows before writing them
    # Schedule-free AdamW steps one sequence of weights and evaluates another, its average: it trains in train mode
    # and is switched to eval mode (on every process) whenever the rows are checked, rendered or saved. The other
    # optimizers have no modes, and Accelerate makes these calls no-ops for them.
    optimizer.train()
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
            with accelerator.accumulate(*text_encoders):
                latents, encoder_hidden_states, added_cond_kwargs = encode_batch(
                    batch, vae, text_encoders, code, generator, share, weight_dtype
                )
                sample_weights = batch["sample_weights"].to(latents.device)
                loss = diffusion_loss(
                    unet,
                    noise_scheduler,
                    latents,
                    encoder_hidden_states,
                    generator,
                    loss_config,
                    sample_weights,
                    share,
                    added_cond_kwargs,
                    batch.get("mask"),
                )
                window.add_batch(loss, group_size)
                accelerator.backward(loss * (args.gradient_accumulation_steps / group_size))
                time_ids = None if added_cond_kwargs is None else added_cond_kwargs["time_ids"]
                last_batch = (latents, batch["input_ids"].to(latents.device), time_ids)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(learned_rows, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            window.add_update(grad_norm)
            progress_bar.update(1)
            stopping = stop_agreed(stop_request, accelerator, stop_group)  # a SIGTERM / SIGUSR1 / Ctrl-C on any process
            is_checkpoint_step = global_step % args.checkpointing_steps == 0 or stopping
            is_save_step = global_step % args.save_steps == 0 or is_checkpoint_step
            # Reading the loss back waits for the device: only at logging steps, and before anything is saved (the
            # read raises on a non-finite loss, so no saved embedding or checkpoint ever holds a diverged one).
            if global_step % args.logging_steps == 0 or is_save_step or global_step >= max_train_steps:
                window.log(global_step, epoch, lr_scheduler.get_last_lr()[0], progress_bar)
            is_validation_step = validation_prompts and global_step % args.validation_steps == 0
            if is_save_step or is_validation_step:
                optimizer.eval()  # what is saved or rendered is the model at this step; resume switches back exactly
            if is_save_step:
                check_embedding_scale([learned_array(rows) for rows in learned_rows], vocabulary_norms, global_step)
                tensors = [*(("the new rows", rows) for rows in learned_rows), *optimizer_tensors(optimizer)]
                probe = probe_loss(
                    accelerator, unet, text_encoders, code, noise_scheduler, *last_batch, loss_config, seed
                )
                check_finite(tensors, probe, "the embedding", global_step)
            if accelerator.is_main_process:
                if global_step % args.save_steps == 0:
                    for index, rows in enumerate(learned_rows):
                        name = f"{learned_embeds_name(index)}-steps-{global_step}.{embeds_suffix}"
                        path = os.path.join(args.output_dir, name)
                        save_embeddings({args.placeholder_token: rows}, path, not args.no_safe_serialization)
                if is_validation_step and global_step < max_train_steps:
                    validate(accelerator, code, *validation_models, args, seed, global_step, "validation", weight_dtype)
            if is_checkpoint_step:
                save_checkpoint(accelerator, args.output_dir, global_step, run_metadata, args.checkpoints_total_limit)
            if is_save_step or is_validation_step:
                optimizer.train()
            if stopping:
                stop_run(stop_request, accelerator, global_step)
            if global_step >= max_train_steps:
                break

    # ------------------------------------------------------------------------------------------------------- save
    stop_request.stop_on_ctrl_c(False)  # nothing left to finish: Ctrl-C interrupts the save as usual
    optimizer.eval()
    if last_batch is not None:  # what is about to be saved, checked as every checkpoint is
        check_embedding_scale([learned_array(rows) for rows in learned_rows], vocabulary_norms, global_step)
        tensors = [*(("the new rows", rows) for rows in learned_rows), *optimizer_tensors(optimizer)]
        probe = probe_loss(accelerator, unet, text_encoders, code, noise_scheduler, *last_batch, loss_config, seed)
        check_finite(tensors, probe, "the embedding", global_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            for path, keys in embedding_files(
                args.output_dir, args.placeholder_token, args.embedding_format, embeds_suffix, len(learned_rows)
            ):
                tensors = {key: learned_rows[index] for key, index in keys.items()}
                save_embeddings(tensors, path, not args.no_safe_serialization)
                logger.info(f"Saved {os.path.abspath(path)}")
        except Exception as err:  # a full disk, most often: the steps since the last checkpoint must not be lost
            raise final_save_failed(accelerator, args.output_dir, global_step, run_metadata, err) from err
        grid = None
        if validation_prompts:
            validate(accelerator, code, *validation_models, args, seed, global_step, "final", weight_dtype)
            grid = f"validation/final-step-{global_step:06d}.png"
        if args.save_as_full_pipeline or args.push_to_hub:
            unwrapped = [accelerator.unwrap_model(text_encoder) for text_encoder in text_encoders]
            try:
                save_full_pipeline(code, unwrapped, tokenizers, unet, vae, weight_dtype, args)
            except Exception as err:
                raise final_save_failed(accelerator, args.output_dir, global_step, run_metadata, err) from err
        write_model_card(args.output_dir, model_card(code.family, args, global_step, grid))
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
    end_training(accelerator, output_lock)


if __name__ == "__main__":
    run(functools.partial(main, ARGS), debug=ARGS.debug)

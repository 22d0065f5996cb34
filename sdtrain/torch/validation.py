"""Validation images: rendered from fixed seeds, saved as a labelled grid and logged to the trackers."""

import logging
import os

import numpy as np
import torch

from sdtrain.images import labelled_grid
from sdtrain.seeds import VALIDATION_SEED_KEY, derive_seed

logger = logging.getLogger(__name__)


def render_validation_images(pipeline, prompts, size, seed, weight_dtype):
    """One image per prompt, each from its own fixed seed, so grids compare across steps and across a resume."""
    device = pipeline.device
    mixed = weight_dtype != torch.float32
    # A VAE kept in fp32 under mixed precision (SDXL's, which overflows in fp16) must also decode in fp32, and autocast
    # would run its convolutions in the low precision: the latents are decoded after it.
    decode_apart = mixed and pipeline.vae.dtype == torch.float32
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(derive_seed(seed, VALIDATION_SEED_KEY, index))
        # Trained and frozen parts may differ in dtype under mixed precision; autocast reconciles them.
        with torch.autocast(device.type, dtype=weight_dtype, enabled=mixed):
            height, width = size
            output_type = "latent" if decode_apart else "pil"
            output = pipeline(
                prompt, num_inference_steps=20, generator=generator, height=height, width=width, output_type=output_type
            )
        if decode_apart:
            with torch.no_grad():
                latents = output.images.to(torch.float32) / pipeline.vae.config.scaling_factor
                decoded = pipeline.vae.decode(latents, return_dict=False)[0]
            images.append(pipeline.image_processor.postprocess(decoded, output_type="pil")[0])
        else:
            images.append(output.images[0])
    return images


def log_validation(pipeline, prompts, size, output_dir, accelerator, seed, global_step, tag, weight_dtype):
    """Render at size (height, width), save a PNG grid under output_dir/validation/, and log the images to the
    trackers."""
    pipeline.set_progress_bar_config(disable=True)
    images = render_validation_images(pipeline, prompts, size, seed, weight_dtype)
    grid = labelled_grid(images, prompts)
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid_path = os.path.join(folder, f"{tag}-step-{global_step:06d}.png")
    grid.save(grid_path)
    logger.info(f"Validation grid ({' | '.join(prompts)}): {grid_path}")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(i) for i in images]), global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb  # optional: only with --report_to wandb

            logged = [wandb.Image(image, caption=prompt) for image, prompt in zip(images, prompts, strict=True)]
            tracker.log({tag: logged}, step=global_step)
    return images

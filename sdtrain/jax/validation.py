"""Validation images of the Flax twins: a compiled sampler conditioned as the saved pipeline samples, one image per
prompt from its own fixed seed, and the labelled grid."""

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from PIL import Image

from sdtrain.batching import size_conditioning
from sdtrain.images import labelled_grid
from sdtrain.jax.models import load_validation_scheduler
from sdtrain.long_prompts import caption_token_ids
from sdtrain.seeds import VALIDATION_SEED_KEY, derive_seed

logger = logging.getLogger(__name__)


@struct.dataclass
class ValidationModels:
    """What renders validation images, all static: the UNet and VAE modules, and the sampling scheduler with its
    state. The params that change (UNet, VAE, text encoders) are passed to each render."""

    unet: Any = struct.field(pytree_node=False)
    vae: Any = struct.field(pytree_node=False)
    scheduler: Any = struct.field(pytree_node=False)
    scheduler_state: Any = struct.field(pytree_node=False)
    trailing: bool = struct.field(pytree_node=False)


def text_conditioning(code, text_encoders, tokenizers, size):
    """conditioning(params, prompt_ids) for make_renderer: the UNet's (encoder_hidden_states, added_cond_kwargs or
    None) for the pair (unconditional, conditional), from code.encode_text with params["text_encoders"] (one param tree
    per text encoder module in `text_encoders`). The unconditional branch is the empty prompt's encoding, or zeros for
    a pipeline that says force_zeros_for_empty_prompt (as SDXL base does), as diffusers' pipelines sample. The size
    conditioning at sampling: the rendered size (height, width), uncropped."""
    # The empty prompt in as many chunks as the prompts under --max_token_length (code.max_token_length), so the two
    # branches of guidance have one shape.
    empty_ids = caption_token_ids(tokenizers, [""], getattr(code, "max_token_length", None))
    height, width = size
    box = ((height, width), (0, 0), (height, width))
    time_ids = jnp.asarray([size_conditioning((width, height), box, False)], jnp.float32)

    def both(unconditional, conditional):
        return jnp.concatenate([unconditional, conditional])

    def conditioning(params, prompt_ids):
        encoder_hidden_states, pooled = code.encode_text(text_encoders, params["text_encoders"], prompt_ids)
        if code.family.force_zeros_for_empty_prompt:
            empty, empty_pooled = jax.tree.map(jnp.zeros_like, (encoder_hidden_states, pooled))
        else:
            empty, empty_pooled = code.encode_text(text_encoders, params["text_encoders"], empty_ids)
        added_cond_kwargs = jax.tree.map(
            both, code.added_conditioning(empty_pooled, time_ids), code.added_conditioning(pooled, time_ids)
        )
        return both(empty, encoder_hidden_states), added_cond_kwargs

    return conditioning


def make_renderer(models, size, conditioning, num_inference_steps=20, guidance_scale=7.5):
    """A compiled function (params, prompt_ids, rng) -> one image of `size` (height, width) as uint8 HWC: the
    pipeline's classifier-free guided sampling, as the PyTorch twin renders (20 steps, guidance 7.5, empty negative
    prompt). Compiled once per run, whatever the prompts. conditioning(params, prompt_ids): the UNet's
    (encoder_hidden_states, added_cond_kwargs or None) for the pair (unconditional, conditional), text_conditioning's.
    params: {"unet", "vae"} and what conditioning reads."""
    height, width = size
    scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    shape = (1, models.unet.config.in_channels, height // scale, width // scale)

    def render(params, prompt_ids, rng):
        encoder_hidden_states, added_cond_kwargs = conditioning(params, prompt_ids)
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
            model_pred = models.unet.apply(
                variables, model_input, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
            ).sample
            unconditional, conditional = jnp.split(model_pred, 2)
            # Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598).
            model_pred = unconditional + guidance_scale * (conditional - unconditional)
            return models.scheduler.step(state, model_pred, t, latents).to_tuple()

        latents, _ = jax.lax.fori_loop(0, num_inference_steps, denoise, (latents, state))
        latents = latents / models.vae.config.scaling_factor
        image = models.vae.apply({"params": params["vae"]}, latents, method=models.vae.decode).sample[0]
        return jnp.round(jnp.clip(image / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).astype(jnp.uint8)

    return jax.jit(render)


def validation_renderer(folder, code, unet, vae, text_encoders, tokenizers, size, prediction_type, zero_snr):
    """The compiled validation sampler (make_renderer) of these models at `size`, sampling with the scheduler the
    saved pipeline has (prediction_type: --prediction_type; zero_snr: --rescale_betas_zero_snr) and conditioned as it
    samples (text_conditioning)."""
    scheduler, scheduler_state, trailing = load_validation_scheduler(folder, prediction_type, zero_snr)
    models = ValidationModels(
        unet=unet, vae=vae, scheduler=scheduler, scheduler_state=scheduler_state, trailing=trailing
    )
    return make_renderer(models, size, text_conditioning(code, text_encoders, tokenizers, size))


def render_validation_images(render, params, tokenizers, prompts, seed, max_token_length=None):
    """One image per prompt, each from its own fixed seed, so grids compare across steps and across a resume; a prompt
    of more than 75 tokens is seen whole with max_token_length (diffusers' pipelines cut it at 77)."""
    images = []
    for index, prompt in enumerate(prompts):
        rng = jax.random.PRNGKey(derive_seed(seed, VALIDATION_SEED_KEY, index) % (2**31))
        images.append(
            Image.fromarray(np.asarray(render(params, caption_token_ids(tokenizers, [prompt], max_token_length), rng)))
        )
    return images


def save_validation_grid(images, prompts, output_dir, tag, global_step):
    """The images side by side, each with its prompt under it, in output_dir/validation/<tag>-step-<global_step>.png.
    Main process only. Returns the grid's path relative to output_dir."""
    grid = labelled_grid(images, prompts)
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    name = f"{tag}-step-{global_step:06d}.png"
    grid.save(os.path.join(folder, name))
    logger.info(f"Validation grid ({' | '.join(prompts)}): {os.path.join(folder, name)}")
    return f"validation/{name}"

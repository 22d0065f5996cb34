"""The held-out validation loss in JAX (sdtrain.validation_loss has the framework-free part): the held-out images
encoded once, before training, and scored every --validation_loss_steps updates with the params being trained and
their EMA. The PyTorch twin is sdtrain/torch/validation_loss.py; validation_loss_batch is the same math in both.

Every device scores the whole held-out set with replicated arrays: the result cannot depend on the process count, and
the held-out set is small next to training (the PyTorch twin shares the batches out instead)."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from sdtrain.batching import assign_buckets, size_conditioning
from sdtrain.jax.loop import evaluation_params
from sdtrain.long_prompts import caption_token_ids
from sdtrain.sizes import size_factors
from sdtrain.validation_loss import (
    ValidationLossLog,
    describe_record,
    eval_batches,
    held_out_rows,
    is_due,
    loss_noise,
    loss_record,
    loss_timesteps,
)

logger = logging.getLogger(__name__)
# held_out_rows is the framework-free module's, imported from here too, so a script imports one module for this.
__all__ = ["HeldOutLoss", "held_out_rows", "validation_loss_batch"]


# ----------------------------------------------------- BEGIN MATH -----------------------------------------------------


def validation_loss_batch(
    unet,
    noise_scheduler,
    scheduler_state,
    latents,
    encoder_hidden_states,
    timestep,
    noise,
    prediction_type,
    added_cond_kwargs=None,
):
    """The per-image mean squared error of the model's prediction at one fixed timestep and given noise: the plain
    loss in the model's prediction space, with no Min-SNR, debiasing or sample weights (so recipes compare)."""
    timesteps = jnp.full((latents.shape[0],), timestep, dtype=jnp.int32)
    # Forward diffusion: noisy_latents = sqrt(alpha_bar_t) * latents + sqrt(1 - alpha_bar_t) * noise.
    noisy_latents = noise_scheduler.add_noise(scheduler_state, latents, noise, timesteps)
    # The target of what the model predicts: the noise (epsilon) or the velocity v (Salimans & Ho 2022).
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(scheduler_state, latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r}")
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    squared = (model_pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2
    return squared.mean(axis=tuple(range(1, model_pred.ndim)))


# ------------------------------------------------------ END MATH ------------------------------------------------------


def held_out_example(dataset, image):
    """The held-out image's center crop, unflipped (CHW in [-1, 1]), its first caption and, for SDXL, its size
    conditioning: no random draw, so every evaluation scores the same example."""
    pixels, box, _ = dataset.transform(dataset.open_image(image), image, None, flip=False)
    caption = dataset.caption_choices(dataset.rows[image][dataset.args.caption_column], image)[0]
    time_ids = None
    if dataset.family.added_conditioning:
        time_ids = np.asarray(size_conditioning(dataset.image_sizes[image], box, False), np.float32)
    return pixels, caption, time_ids


class HeldOutLoss:
    """The held-out images, encoded once (the VAE's latent mean, the text encoders' output), and their validation
    loss. `dataset`: an ImageCaptionDataset of the held-out rows with center crops and no flips, its image_sizes set;
    `buckets`: the training buckets (None: square crops), each held-out image goes to the one it would train in.
    `models`: the script's frozen models (vae, text encoders, code, noise scheduler and their params), the UNet module,
    the VAE's config, the prediction type, the training buckets, and the script's adapted_weights (trained params ->
    UNet params, a LoRA merged in) and check_images. The dataset's args say the batch size and --bucket_no_upscale."""

    def __init__(self, config, dataset, models, seed):
        frozen, unet_module, vae_config, prediction_type, buckets, adapted_weights, check_images = models
        self.weights_of = lambda params: adapted_weights(params, frozen)  # (UNet params, text encoders' params)
        # A text encoder LoRA (--train_text_encoder) changes the captions' encoding: the held-out images are encoded
        # again at each evaluation, with the weights being scored (one jitted VAE + text encode); otherwise once.
        self.text_trains = frozen.lora is not None and frozen.lora.train_text_encoder
        dataset.image_sizes = check_images(dataset)
        batch_size = dataset.args.train_batch_size
        self.config, self.batch_size, self.seed, self.prediction_type = config, batch_size, seed, prediction_type
        self.timesteps = loss_timesteps(config.num_timesteps, frozen.noise_scheduler.config.num_train_timesteps)
        if buckets is not None:
            no_upscale = dataset.args.bucket_no_upscale
            model_factor = size_factors(vae_config, unet_module.config)[1]
            dataset.bucket_of_row, dataset.buckets = assign_buckets(
                dataset.image_sizes, buckets, no_upscale, model_factor
            )
        group_of_image = dataset.bucket_of_row if dataset.buckets is not None else [0] * len(dataset)
        self.batches = eval_batches(list(group_of_image), batch_size)
        examples = [held_out_example(dataset, image) for image in range(len(dataset))]
        code = frozen.code
        self.force_zeros = code.family.force_zeros_for_empty_prompt

        @jax.jit
        def encode_latents(vae_params, pixel_values):
            encoded = frozen.vae.apply(
                {"params": vae_params}, pixel_values, deterministic=True, method=frozen.vae.encode
            )
            return jnp.transpose(encoded.latent_dist.mean, (0, 3, 1, 2)) * frozen.vae.config.scaling_factor

        encode_text = jax.jit(functools.partial(code.encode_text, frozen.text_encoders))

        # Encoded at the first evaluation, not here: a resumed run with nothing left to train compiles nothing. The
        # latents once (the pixels are dropped then); the captions once, or at each evaluation with a text encoder
        # LoRA, with the weights being scored.
        def encode_held_out(text_encoder_params):
            if self.latents is None:
                self.latents = [
                    np.asarray(encode_latents(frozen.vae_params, np.stack([examples[i][0] for i in images])))
                    for images in self.batches
                ]
                examples[:] = [(None, *example[1:]) for example in examples]
                logger.info(f"Encoded {len(dataset)} held-out images for the validation loss")
            inputs = []
            for images, latents in zip(self.batches, self.latents, strict=True):
                captions = [examples[i][1] for i in images]
                ids = caption_token_ids(dataset.tokenizers, captions, dataset.args.max_token_length)  # as in training
                hidden, pooled = encode_text(text_encoder_params, ids)
                kept = np.asarray([float(caption != "") for caption in captions], np.float32)
                if self.force_zeros:  # an empty caption conditions on zeros, as in training
                    hidden = hidden * kept[:, None, None]
                    pooled = None if pooled is None else pooled * kept[:, None]
                added = None
                if pooled is not None:
                    added = code.added_conditioning(pooled, np.stack([examples[i][2] for i in images]))
                inputs.append((latents, np.asarray(hidden), added))
            return inputs

        self.inputs, self.latents, self.encode_held_out = None, None, encode_held_out

        # One timestep per call (a traced argument): one compiled UNet forward per batch shape, not K unrolled ones.
        def batch_loss(
            unet_params, scheduler_state, latents, encoder_hidden_states, added_cond_kwargs, noise, timestep
        ):
            def unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
                return unet_module.apply(
                    {"params": unet_params},
                    noisy_latents,
                    timesteps,
                    encoder_hidden_states,
                    added_cond_kwargs=added_cond_kwargs,
                    train=False,
                ).sample

            conditioning = (encoder_hidden_states, timestep, noise, prediction_type, added_cond_kwargs)
            return validation_loss_batch(unet, noise_scheduler, scheduler_state, latents, *conditioning)

        noise_scheduler, self.scheduler_state = frozen.noise_scheduler, frozen.scheduler_state
        self.batch_loss = jax.jit(batch_loss)
        self.log_file = None

    def per_image(self, weights):
        """[images, K] losses of the weights (UNet params, text encoders' params)."""
        unet_params, text_encoder_params = weights
        if self.inputs is None or self.text_trains:
            self.inputs = self.encode_held_out(text_encoder_params)
        losses = np.zeros((sum(len(images) for images in self.batches), len(self.timesteps)), np.float32)
        for images, (latents, *conditioning) in zip(self.batches, self.inputs, strict=True):
            for k, timestep in enumerate(self.timesteps):
                # NumPy noise from (seed, image, k): the PyTorch twin's exactly.
                noise = np.stack([loss_noise(self.seed, i, k, latents.shape[1:]) for i in images])
                inputs = (unet_params, self.scheduler_state, latents, *conditioning, noise, np.int32(timestep))
                losses[images, k] = np.asarray(self.batch_loss(*inputs))
        return losses

    def evaluate(self, global_step, max_train_steps, output_dir, state, optimizer):
        """At a due step (sdtrain.validation_loss.is_due): the loss of the train state's params (schedule-free: the
        evaluated average) and of their EMA (state.ema_params, with --use_ema), to the log and validation_loss.jsonl.
        Every process calls it after every update: the first call opens the file (process 0), cut to the steps before
        it, as a resumed run must."""
        if self.log_file is None and jax.process_index() == 0:
            self.log_file = ValidationLossLog(output_dir, global_step - 1)
        if not is_due(self.config, global_step, max_train_steps):
            return
        per_image = self.per_image(self.weights_of(evaluation_params(state, optimizer)))
        ema_params = getattr(state, "ema_params", None)
        per_image_ema = None if ema_params is None else self.per_image(self.weights_of(ema_params))
        record = loss_record(global_step, self.timesteps, per_image, per_image_ema)
        if jax.process_index() == 0:
            logger.info(describe_record(record))
        if self.log_file is not None and global_step > self.log_file.last_step:
            self.log_file.append(record)

"""The held-out validation loss in PyTorch (sdtrain.validation_loss has the framework-free part): the held-out images
encoded once, before training, and scored every --validation_loss_steps updates with the weights being trained and
their EMA. The JAX twin is sdtrain/jax/validation_loss.py; validation_loss_batch is the same math in both."""

import logging

import numpy as np
import torch

import sdtrain.torch.lora as lora
from sdtrain.batching import assign_buckets
from sdtrain.data_config import caption_choices
from sdtrain.sizes import size_factors
from sdtrain.torch.data import check_images, encode_once
from sdtrain.torch.long_prompts import token_ids
from sdtrain.validation_loss import (
    ValidationLossLog,
    describe_record,
    eval_batches,
    held_out_rows,
    is_due,
    loss_noise,
    loss_record,
    loss_timesteps,
    tracker_values,
)

logger = logging.getLogger(__name__)
# held_out_rows is the framework-free module's, imported from here too, so a script imports one module for this.
__all__ = ["HeldOutLoss", "held_out_rows", "validation_loss_batch"]


# ----------------------------------------------------- BEGIN MATH -----------------------------------------------------


def validation_loss_batch(
    unet, noise_scheduler, latents, encoder_hidden_states, timestep, noise, prediction_type, added_cond_kwargs=None
):
    """The per-image mean squared error of the model's prediction at one fixed timestep and given noise: the plain
    loss in the model's prediction space, with no Min-SNR, debiasing or sample weights (so recipes compare)."""
    timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
    # Forward diffusion: noisy_latents = sqrt(alpha_bar_t) * latents + sqrt(1 - alpha_bar_t) * noise.
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    # The target of what the model predicts: the noise (epsilon) or the velocity v (Salimans & Ho 2022).
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r}")
    model_pred = unet(
        noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False
    )[0]
    return ((model_pred.float() - target.float()) ** 2).mean(dim=list(range(1, model_pred.ndim)))


# ------------------------------------------------------ END MATH ------------------------------------------------------


def held_out_example(dataset, image):
    """The held-out image's center crop, unflipped ([-1, 1] pixels), its first caption's token ids and, for SDXL, its
    size conditioning: no random draw, so every evaluation scores the same example."""
    pixels, box, _ = dataset.transform(dataset.open_image(image), image, rng=None, flip=False)
    column = dataset.args.caption_column
    caption = caption_choices(dataset.caption_rows[image][column], image, column)[0]
    input_ids = token_ids(dataset.tokenizers, [caption], dataset.args.max_token_length)[0]  # chunked as in training
    time_ids = dataset.time_ids(image, box, False) if dataset.added_conditioning else None
    return pixels, input_ids, time_ids, caption != ""


class HeldOutLoss:
    """The held-out images, encoded once (the VAE's latent mean, the text encoders' output), and their validation
    loss. `dataset`: an ImageCaptionDataset of the held-out rows with center crops and no flips (its args say the
    batch size and --bucket_no_upscale); `models`: the frozen models, the UNet's config, the noise scheduler, the
    prediction type and the training buckets (None: square crops): each held-out image goes to the bucket it would
    train in."""

    def __init__(self, config, dataset, models, accelerator, seed):
        vae, unet_config, text_encoders, code, noise_scheduler, prediction_type, buckets = models
        batch_size = dataset.args.train_batch_size
        self.config, self.accelerator, self.batch_size, self.seed = config, accelerator, batch_size, seed
        self.noise_scheduler, self.prediction_type, self.code = noise_scheduler, prediction_type, code
        self.timesteps = loss_timesteps(config.num_timesteps, noise_scheduler.config.num_train_timesteps)
        dataset.image_sizes = check_images(dataset.verify_image, len(dataset), accelerator)
        if buckets is not None:
            no_upscale, model_factor = dataset.args.bucket_no_upscale, size_factors(vae.config, unet_config)[1]
            dataset.bucket_of_row, dataset.buckets = assign_buckets(
                dataset.image_sizes, buckets, no_upscale, model_factor
            )
        self.group_of_image, groups = dataset.shape_groups()
        self.examples = [held_out_example(dataset, image) for image in range(len(dataset))]
        self.latents = [None] * len(dataset)
        for images in groups:
            if not images:
                continue
            encoded = encode_once(
                accelerator,
                len(images),
                batch_size,
                lambda indices, images=images: torch.stack([self.examples[images[i]][0] for i in indices]),
                lambda pixels: (
                    vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
                ),
                f"Encoding {len(images)} held-out images",
            )
            for place, image in enumerate(images):
                self.latents[image] = encoded[place]
        self.examples = [(None, *example[1:]) for example in self.examples]  # the pixels are not needed again
        self.text_encoders = text_encoders
        # A text encoder LoRA (--train_text_encoder) changes the captions' encoding: encoded again at each evaluation,
        # with the weights being scored (the EMA's included); frozen text encoders: once.
        self.text_trains = any(p.requires_grad for encoder in text_encoders for p in encoder.parameters())
        self.text = None if self.text_trains else self.encode_captions()
        self.log_file = None

    def encode_captions(self):
        device = self.text_encoders[0].device
        return encode_once(
            self.accelerator,
            len(self.examples),
            self.batch_size,
            lambda indices: torch.stack([self.examples[i][1] for i in indices]),
            lambda input_ids: self.code.encode_text(self.text_encoders, input_ids.to(device)),
            "Encoding held-out captions",
        )

    def batch(self, images, device, dtype):
        latents = torch.stack([self.latents[i] for i in images]).to(device, torch.float32)
        hidden, pooled = self.text
        kept = torch.tensor([float(self.examples[i][3]) for i in images], device=device, dtype=dtype)
        encoder_hidden_states = hidden[images].to(device, dtype)
        if self.code.family.force_zeros_for_empty_prompt:  # an empty caption conditions on zeros, as in training
            encoder_hidden_states = encoder_hidden_states * kept[:, None, None]
        added_cond_kwargs = None
        if pooled is not None:
            pooled_text_embeds = pooled[images].to(device, dtype)
            if self.code.family.force_zeros_for_empty_prompt:
                pooled_text_embeds = pooled_text_embeds * kept[:, None]
            time_ids = torch.stack([self.examples[i][2] for i in images]).to(device, dtype)
            added_cond_kwargs = self.code.added_conditioning(pooled_text_embeds, time_ids)
        return latents, encoder_hidden_states, added_cond_kwargs

    def per_image(self, unet):
        """[images, K] losses of the UNet's current weights. Process p scores the fixed batches p, p + P, ...; the
        others' rows stay 0, so the summed result is exact and does not depend on the process count."""
        accelerator = self.accelerator
        losses = torch.zeros((len(self.latents), len(self.timesteps)), dtype=torch.float32, device=accelerator.device)
        batches = eval_batches(list(self.group_of_image), self.batch_size)
        dtype = next(unet.parameters()).dtype
        with torch.no_grad(), accelerator.autocast(), lora.evaluating([unet, *self.text_encoders]):  # no LoRA dropout
            if self.text_trains:
                self.text = self.encode_captions()
            for images in batches[accelerator.process_index :: accelerator.num_processes]:
                latents, encoder_hidden_states, added_cond_kwargs = self.batch(images, accelerator.device, dtype)
                for k, timestep in enumerate(self.timesteps):
                    noise = np.stack([loss_noise(self.seed, i, k, tuple(latents.shape[1:])) for i in images])
                    noise = torch.from_numpy(noise).to(accelerator.device)
                    conditioning = (encoder_hidden_states, timestep, noise, self.prediction_type, added_cond_kwargs)
                    losses[images, k] = validation_loss_batch(unet, self.noise_scheduler, latents, *conditioning)
        if accelerator.num_processes > 1:
            losses = accelerator.reduce(losses, reduction="sum")
        return losses.cpu().numpy()

    def evaluate(self, global_step, max_train_steps, output_dir, unet, optimizer, ema_unet=None, parameters=None):
        """At a due step (sdtrain.validation_loss.is_due): the loss of the trained weights (schedule-free: the
        evaluated average, optimizer.eval()) and of their EMA, to the trackers, the log and validation_loss.jsonl.
        Every process calls it after every update: the first call opens the file, cut to the steps before it (a
        resumed run's file equals an uninterrupted run's)."""
        if self.log_file is None and self.accelerator.is_main_process:
            self.log_file = ValidationLossLog(output_dir, global_step - 1)
        if not is_due(self.config, global_step, max_train_steps):
            return
        optimizer.eval()
        unet = self.accelerator.unwrap_model(unet)
        per_image, per_image_ema = self.per_image(unet), None
        if ema_unet is not None:
            ema_unet.store(parameters)
            ema_unet.copy_to(parameters)
            per_image_ema = self.per_image(unet)
            ema_unet.restore(parameters)
        optimizer.train()
        record = loss_record(global_step, self.timesteps, per_image, per_image_ema)
        logger.info(describe_record(record))
        if self.accelerator.is_main_process:
            self.accelerator.log(tracker_values(record), step=global_step)
            self.log_file.append(record)

"""Run by the PyTorch environment for the parity test: the loss of train_text_to_image.compute_loss on fixed
latents and captions, and the noise and timesteps its generator drew, saved to an .npz file.

    .venv/bin/python tests_flax/torch_loss.py PIPELINE PREDICTION_TYPE SNR_GAMMA|none OUT.npz
"""

import os
import sys
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

import train_text_to_image  # noqa: E402


def main(pipeline, prediction_type, snr_gamma, out):
    scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler", prediction_type=prediction_type)
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32))
    input_ids = tokenizer(
        ["a red circle", "a blue square", "a photo of a green circle", "a yellow square"],
        max_length=77,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids
    args = types.SimpleNamespace(
        noise_offset=0.0,
        input_perturbation=0.0,
        dream_training=False,
        snr_gamma=None if snr_gamma == "none" else float(snr_gamma),
    )
    with torch.no_grad():
        loss = train_text_to_image.compute_loss(
            unet,
            vae,
            text_encoder,
            scheduler,
            {"latents": latents, "input_ids": input_ids},
            torch.Generator().manual_seed(20),
            args,
        )
    # Replay the generator: with latents given, compute_loss draws the noise, then the timesteps. Seed 20 draws
    # timestep 13 among others, where Min-SNR changes the epsilon weight, so every case has teeth.
    generator = torch.Generator().manual_seed(20)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    np.savez(
        out,
        latents=latents.numpy(),
        input_ids=input_ids.numpy(),
        noise=noise.numpy(),
        timesteps=timesteps.numpy(),
        loss=loss.item(),
    )


if __name__ == "__main__":
    main(*sys.argv[1:])

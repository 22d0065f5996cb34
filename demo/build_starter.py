#!/usr/bin/env python
"""Build, offline and once, the demo's starter pipeline and data (a tool for `make demo`, not a training script).

    .venv/bin/python demo/build_starter.py --output_dir demo_output/starter

Writes, under --output_dir:
  pipeline/  a Stable Diffusion pipeline in the standard diffusers layout: the tests' byte-level CLIP tokenizer,
             a frozen random CLIP text encoder (distinct prompts give clearly distinct embeddings), an AutoencoderKL
             pretrained for a minute or two on shape drawings so that decoded latents are recognisable pictures,
             and a freshly initialised UNet for train_text_to_image.py to teach;
  shapes/    an imagefolder of colored shapes with captions ("a red circle", ...);
  concept/   five drawings of one concept for textual_inversion.py.
A finished build is reused (delete the folder to rebuild).
"""

import argparse
import json
import os
import shutil
import time

import numpy as np
import shapes
import torch
from tqdm.auto import tqdm

from devkit import tiny_sd

HERE = os.path.dirname(os.path.abspath(__file__))


DONE = "starter.json"  # written last: a folder with it is a finished build
# Whole-word tokens for the captions and for textual_inversion.py's prompt templates, so that a template with the
# placeholder fits the 8-token context instead of being cut off by byte-level pieces.
STARTER_WORDS = tiny_sd.VOCAB_WORDS + [
    "close",
    "up",
    "bright",
    "dark",
    "cropped",
    "rendering",
    "good",
    "my",
    "large",
    "one",
    "image",
    "snapshot",
    "detailed",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Build the demo's starter pipeline and data, offline.")
    parser.add_argument(
        "--output_dir", type=str, default="demo_output/starter", help="Where to write pipeline/, shapes/ and concept/."
    )
    parser.add_argument("--vae_steps", type=int, default=400, help="Optimizer steps of VAE pretraining.")
    parser.add_argument("--per_combination", type=int, default=20, help="Training drawings per color x shape.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for weights and drawings.")
    return parser.parse_args(argv)


def random_drawings(rng, count):
    """A batch of drawings of random color and shape, as a [-1, 1] tensor."""
    images = [shapes.draw(rng.choice(list(shapes.COLORS)), rng.choice(shapes.SHAPES), rng) for _ in range(count)]
    return torch.from_numpy(np.stack([np.asarray(i, np.float32) for i in images])).permute(0, 3, 1, 2) / 127.5 - 1.0


def pretrain_vae(steps, seed):
    """A small AutoencoderKL (4x downsampling: 64 px -> 16x16x4 latents) trained to reconstruct shape drawings."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=32,
        sample_size=64,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    progress = tqdm(range(steps), desc="VAE pretraining", unit="step", mininterval=1.0)
    for step in progress:
        images = random_drawings(rng, 16)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # Reconstruction plus a small KL term (as in SD's VAE) keeps the latents a well-scaled Gaussian.
        loss = torch.nn.functional.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == steps - 1:  # reading the loss waits for the step: not at every one
            progress.set_postfix(reconstruction_mse=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(random_drawings(rng, 64)).latent_dist.mean
    # Like SD's 0.18215: scale the latents to unit variance for the diffusion model.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def build_pipeline(path, args):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(args.seed)
    token_dir = path + ".tokenizer"
    vocab_size = tiny_sd.write_clip_tokenizer_files(token_dir, words=STARTER_WORDS)
    # Prompts here are a few words: an 8-token context keeps the UNet's cross-attention on the words that matter
    # instead of 70 padding positions (SD uses 77).
    tokenizer = CLIPTokenizer.from_pretrained(token_dir, model_max_length=8)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=8,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=64,
        )
    )
    # A random text encoder initialised the usual way (std 0.02) maps "a red circle" and "a blue circle" to nearly the
    # same states; unit-variance token embeddings make every word's state clearly its own.
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    vae = pretrain_vae(args.vae_steps, args.seed)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    tiny_sd.write_clip_tokenizer_files(os.path.join(path, "tokenizer"), words=STARTER_WORDS)
    from safetensors.torch import load_file, save_file

    weights = os.path.join(path, "text_encoder", "model.safetensors")
    save_file(
        {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in load_file(weights).items()},
        weights,
        metadata={"format": "pt"},
    )
    shutil.rmtree(token_dir)


def main(argv=None):
    args = parse_args(argv)
    if os.path.isfile(os.path.join(args.output_dir, DONE)):
        print(f"starter: reusing {args.output_dir}")
        return
    shutil.rmtree(args.output_dir, ignore_errors=True)
    start = time.time()
    build_pipeline(os.path.join(args.output_dir, "pipeline"), args)
    shapes.write_shapes_dataset(
        os.path.join(args.output_dir, "shapes"), per_combination=args.per_combination, seed=args.seed
    )
    shapes.write_concept_set(os.path.join(args.output_dir, "concept"), seed=args.seed + 1)
    with open(os.path.join(args.output_dir, DONE), "w") as f:
        json.dump({**vars(args), "seconds": round(time.time() - start)}, f, indent=2)
    print(f"starter: built {args.output_dir} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()

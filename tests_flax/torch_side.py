"""The PyTorch half of the parity test, run by the PyTorch environment (.venv) with the repository on PYTHONPATH:

    .venv/bin/python tests_flax/torch_side.py PIPELINE OUT_DIR

For every case of parity_cases.py it calls the scripts' own pure functions (train_text_to_image.diffusion_loss; for
textual inversion, the text encoder with the script's learned embedding rows, then textual_inversion.diffusion_loss)
on fixed latents and prompts, and saves to OUT_DIR/<case>.npz the inputs, the loss, every random draw in the order it
was made (the JAX half replays them), and for textual inversion the gradient of the loss for the new rows.
"""

import os
import sys

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from parity_cases import CASES, INITIALIZER, NUM_VECTORS, PLACEHOLDER, PROMPTS
from transformers import CLIPTextModel, CLIPTokenizer

import textual_inversion
import train_text_to_image
from sdtrain import torch_training


class RecordedDraws:
    """Wraps torch.randn, torch.rand and torch.randint, keeping a copy of every tensor they return."""

    def __init__(self):
        self.draws = []

    def __enter__(self):
        self.originals = torch.randn, torch.rand, torch.randint

        def recording(function):
            def draw(*args, **kwargs):
                result = function(*args, **kwargs)
                self.draws.append(result.detach().clone())
                return result

            return draw

        torch.randn, torch.rand, torch.randint = (recording(function) for function in self.originals)
        return self

    def __exit__(self, *exc):
        torch.randn, torch.rand, torch.randint = self.originals


def main(pipeline, out_dir):
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").eval()
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32))
    os.makedirs(out_dir, exist_ok=True)
    for name, fields in CASES.items():
        fields = dict(fields)
        scheduler = DDPMScheduler.from_pretrained(
            pipeline,
            subfolder="scheduler",
            prediction_type=fields["prediction_type"],
            rescale_betas_zero_snr=fields.pop("zero_snr", False),
        )
        text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").eval()
        if name.startswith("t2i"):
            script, learned, case_tokenizer, prompts = train_text_to_image, None, tokenizer, PROMPTS
        else:
            script, case_tokenizer = textual_inversion, CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
            text_encoder.requires_grad_(False)
            token = (PLACEHOLDER, INITIALIZER, NUM_VECTORS)
            tokens, _, learned_embedding = textual_inversion.add_learned_embedding(text_encoder, case_tokenizer, *token)
            # In a prompt the placeholder stands for all its vectors, as in the script's dataset.
            prompts = [prompt.replace(PLACEHOLDER, " ".join(tokens)) for prompt in PROMPTS]
            learned = learned_embedding.learned
            with torch.no_grad():  # moved away from the initializer, so each new row is distinct
                learned.add_(0.1 * torch.from_numpy(np.random.default_rng(1).standard_normal(learned.shape)).float())
        input_ids = torch_training.tokenize(case_tokenizer, prompts, range(len(prompts)))
        weights = fields.pop("sample_weights", None)
        sample_weights = None if weights is None else torch.tensor(weights)
        config = script.LossConfig(**fields)
        with torch.set_grad_enabled(learned is not None):
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            # Seed 20 draws timestep 13 among others, where Min-SNR changes the epsilon weight: every case has teeth.
            with RecordedDraws() as recorded:
                loss = script.diffusion_loss(
                    unet,
                    scheduler,
                    latents,
                    encoder_hidden_states,
                    torch.Generator().manual_seed(20),
                    config,
                    sample_weights,
                )
        saved = {"latents": latents.numpy(), "input_ids": input_ids.numpy(), "loss": loss.item()}
        saved["alphas_cumprod"] = scheduler.alphas_cumprod.numpy()
        saved.update({f"draw_{i}": draw.numpy() for i, draw in enumerate(recorded.draws)})
        if learned is not None:
            loss.backward()
            saved.update(learned=learned.detach().numpy(), learned_grad=learned.grad.numpy())
        np.savez(os.path.join(out_dir, f"{name}.npz"), **saved)


if __name__ == "__main__":
    main(*sys.argv[1:])

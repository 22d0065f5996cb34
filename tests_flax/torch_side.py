"""The PyTorch half of the parity test, run by the PyTorch environment (.venv) with the repository on PYTHONPATH:

    .venv/bin/python tests_flax/torch_side.py PIPELINE SDXL_PIPELINE OUT_DIR

For every case of parity_cases.py it calls the scripts' own pure functions (train_text_to_image.diffusion_loss; for
textual inversion, the text encoder with the script's learned embedding rows, then textual_inversion.diffusion_loss)
on fixed latents and prompts, and saves to OUT_DIR/<case>.npz the inputs, the loss, every random draw in the order it
was made (the JAX half replays them), and for textual inversion the gradient of the loss for the new rows. The SDXL
case conditions the tiny SDXL pipeline's UNet through the SDXL family's encode_text (sdtrain.torch.family) and
added_cond_kwargs; the SDXL textual-inversion cases run on SDXL_PIPELINE through textual_inversion.text_conditioning.
"""

import os
import sys

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from parity_cases import (
    CASES,
    INITIALIZER,
    LORA_ALPHA,
    LORA_CASES,
    LORA_RANK,
    NUM_VECTORS,
    PLACEHOLDER,
    PROMPTS,
    SDXL_CAPTION_KEPT,
    SDXL_CASE,
    SDXL_TEXTUAL_INVERSION,
    SDXL_TI_TIME_IDS,
    SDXL_TIME_IDS,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import textual_inversion
import train_text_to_image
from sdtrain.families import SD, SDXL
from sdtrain.torch import text as torch_text
from sdtrain.torch.family import family_code


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


def fixed_latents():
    return torch.from_numpy(np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32))


def sdxl_case(pipeline, out_dir):
    """The SDXL case: the script's encode_text of both encoders, zeros for a dropped caption (as encode_batch does),
    size conditioning, and diffusion_loss with added_cond_kwargs."""
    name, fields = SDXL_CASE
    tokenizers = [CLIPTokenizer.from_pretrained(pipeline, subfolder=n) for n in ("tokenizer", "tokenizer_2")]
    text_encoders = [
        CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").eval(),
        CLIPTextModelWithProjection.from_pretrained(pipeline, subfolder="text_encoder_2").eval(),
    ]
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(
        pipeline, subfolder="scheduler", prediction_type=fields["prediction_type"]
    )
    input_ids = torch.stack([torch_text.tokenize(t, PROMPTS, range(len(PROMPTS))) for t in tokenizers], dim=1)
    kept, time_ids = torch.tensor(SDXL_CAPTION_KEPT), torch.tensor(SDXL_TIME_IDS, dtype=torch.float32)
    with torch.no_grad():
        encoder_hidden_states, pooled_text_embeds = family_code(SDXL).encode_text(text_encoders, input_ids)
        encoder_hidden_states = encoder_hidden_states * kept[:, None, None]
        added_cond_kwargs = {"text_embeds": pooled_text_embeds * kept[:, None], "time_ids": time_ids}
        with RecordedDraws() as recorded:
            loss = train_text_to_image.diffusion_loss(
                unet,
                scheduler,
                fixed_latents(),
                encoder_hidden_states,
                torch.Generator().manual_seed(20),
                train_text_to_image.LossConfig(**fields),
                added_cond_kwargs=added_cond_kwargs,
            )
    saved = {"latents": fixed_latents().numpy(), "input_ids": input_ids.numpy(), "loss": loss.item()}
    saved.update({f"draw_{i}": draw.numpy() for i, draw in enumerate(recorded.draws)})
    np.savez(os.path.join(out_dir, f"{name}.npz"), **saved)


def learned_rows(text_encoder, tokenizer, seed):
    """The script's new rows for the placeholder in this encoder, moved away from the initializer so each is distinct;
    the prompts with the placeholder standing for all its vectors, as in the script's dataset."""
    text_encoder.requires_grad_(False)
    token = (PLACEHOLDER, INITIALIZER, NUM_VECTORS)
    tokens, _, learned_embedding = textual_inversion.add_learned_embedding(text_encoder, tokenizer, *token)
    learned = learned_embedding.learned
    with torch.no_grad():
        learned.add_(0.1 * torch.from_numpy(np.random.default_rng(seed).standard_normal(learned.shape)).float())
    return learned, [prompt.replace(PLACEHOLDER, " ".join(tokens)) for prompt in PROMPTS]


def recorded_loss(script, unet, scheduler, latents, encoder_hidden_states, config, **options):
    """script.diffusion_loss with the parity generator, and the record of every draw it made."""
    with RecordedDraws() as recorded:
        # Seed 20 draws timestep 13 among others, where Min-SNR changes the epsilon weight: every case has teeth.
        generator = torch.Generator().manual_seed(20)
        loss = script.diffusion_loss(unet, scheduler, latents, encoder_hidden_states, generator, config, **options)
    return loss, recorded


def save_case(out_dir, name, inputs, loss, scheduler, recorded, rows):
    """The case's inputs, loss and draws; with `rows` ({name: new rows}), each one's value and gradient."""
    saved = {**inputs, "loss": loss.item(), "alphas_cumprod": scheduler.alphas_cumprod.numpy()}
    saved.update({f"draw_{i}": draw.numpy() for i, draw in enumerate(recorded.draws)})
    if rows:
        loss.backward()
        for key, learned in rows.items():
            saved.update({key: learned.detach().numpy(), f"{key}_grad": learned.grad.numpy()})
    np.savez(os.path.join(out_dir, f"{name}.npz"), **saved)


def sdxl_textual_inversion_cases(pipeline, out_dir, latents):
    """SDXL textual inversion: the new rows of both encoders condition the UNet (penultimate states, the pooled
    embedding) beside fixed size conditioning; the loss and the gradient for each encoder's rows."""
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").eval()
    for name, fields in SDXL_TEXTUAL_INVERSION.items():
        scheduler = DDPMScheduler.from_pretrained(
            pipeline, subfolder="scheduler", prediction_type=fields["prediction_type"]
        )
        text_encoders = [
            CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").eval(),
            CLIPTextModelWithProjection.from_pretrained(pipeline, subfolder="text_encoder_2").eval(),
        ]
        tokenizers = [CLIPTokenizer.from_pretrained(pipeline, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
        rows, ids = {}, []
        for index, (text_encoder, tokenizer) in enumerate(zip(text_encoders, tokenizers, strict=True)):
            rows["learned" + ("_2" if index else "")], prompts = learned_rows(text_encoder, tokenizer, seed=1 + index)
            ids.append(torch_text.tokenize(tokenizer, prompts, range(len(prompts))))
        input_ids, time_ids = torch.stack(ids, dim=1), torch.tensor(SDXL_TI_TIME_IDS, dtype=torch.float32)
        encoder_hidden_states, added_cond_kwargs = textual_inversion.text_conditioning(
            text_encoders, family_code(SDXL), input_ids, time_ids, latents.dtype
        )
        config = textual_inversion.LossConfig(**fields)
        loss, recorded = recorded_loss(
            textual_inversion,
            unet,
            scheduler,
            latents,
            encoder_hidden_states,
            config,
            added_cond_kwargs=added_cond_kwargs,
        )
        inputs = {"latents": latents.numpy(), "input_ids": input_ids.numpy(), "time_ids": time_ids.numpy()}
        save_case(out_dir, name, inputs, loss, scheduler, recorded, rows)


def lora_case(name, fields, pipeline, family, out_dir, latents):
    """A LoRA of LORA_RANK / LORA_ALPHA set up by peft, as the PyTorch script does, on the UNet (every module of
    UNET_LORA_MODULES) and the text encoders (TEXT_ENCODER_LORA_MODULES), with A and B drawn from a fixed seed; the
    text encoded with the adapter on, then the script's diffusion_loss: the loss, and every A and B with its gradient,
    keyed by diffusers_key (A under "<key>", its gradient under "grad:<key>")."""
    import peft

    from sdtrain.lora import TEXT_ENCODER_LORA_MODULES, UNET_LORA_MODULES, diffusers_key

    classes = [CLIPTextModel, CLIPTextModelWithProjection]
    text_encoders = [
        classes[index].from_pretrained(pipeline, subfolder=component).eval()
        for index, component in enumerate(family.text_encoders)
    ]
    tokenizers = [CLIPTokenizer.from_pretrained(pipeline, subfolder=n) for n in family.tokenizers]
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(
        pipeline, subfolder="scheduler", prediction_type=fields["prediction_type"]
    )
    rng = np.random.default_rng(31)
    matrices = {}
    models = [("unet", unet, UNET_LORA_MODULES)]
    models += [
        (component, model, TEXT_ENCODER_LORA_MODULES)
        for component, model in zip(family.text_encoders, text_encoders, strict=True)
    ]
    for component, model, modules in models:
        model.requires_grad_(False)
        config = peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(modules), init_lora_weights=False
        )
        peft.inject_adapter_in_model(config, model)
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                if component != "unet" and not module_name.startswith("text_model."):
                    module_name = "text_model." + module_name  # the saved files' name; transformers 5 drops it
                for matrix, layer in (("A", module.lora_A["default"]), ("B", module.lora_B["default"])):
                    with torch.no_grad():
                        value = 0.1 * rng.standard_normal(tuple(layer.weight.shape))
                        layer.weight.copy_(torch.from_numpy(value.astype(np.float32)))
                    layer.weight.requires_grad_(True)
                    matrices[diffusers_key(component, module_name, matrix)] = layer.weight
    input_ids = torch.stack([torch_text.tokenize(t, PROMPTS, range(len(PROMPTS))) for t in tokenizers], dim=1)
    code = family_code(family)
    encoder_hidden_states, pooled = code.encode_text(text_encoders, input_ids)
    added_cond_kwargs, inputs = None, {"latents": latents.numpy(), "input_ids": input_ids.numpy()}
    if family is SDXL:
        kept, time_ids = torch.tensor(SDXL_CAPTION_KEPT), torch.tensor(SDXL_TIME_IDS, dtype=torch.float32)
        encoder_hidden_states = encoder_hidden_states * kept[:, None, None]
        added_cond_kwargs = code.added_conditioning(pooled * kept[:, None], time_ids)
    config = train_text_to_image.LossConfig(**fields)
    loss, recorded = recorded_loss(
        train_text_to_image,
        unet,
        scheduler,
        latents,
        encoder_hidden_states,
        config,
        added_cond_kwargs=added_cond_kwargs,
    )
    loss.backward()
    saved = {**inputs, "loss": loss.item()}
    saved.update({f"draw_{i}": draw.numpy() for i, draw in enumerate(recorded.draws)})
    for key, weight in matrices.items():
        saved[key] = weight.detach().numpy()
        # None: a layer whose output the conditioning does not read (SDXL's first encoder's last layer).
        saved[f"grad:{key}"] = np.zeros(weight.shape, np.float32) if weight.grad is None else weight.grad.numpy()
    np.savez(os.path.join(out_dir, f"{name}.npz"), **saved)


def main(pipeline, sdxl_pipeline, out_dir):
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").eval()
    latents = fixed_latents()
    os.makedirs(out_dir, exist_ok=True)
    sdxl_case(sdxl_pipeline, out_dir)
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
            learned, prompts = learned_rows(text_encoder, case_tokenizer, seed=1)
        input_ids = torch_text.tokenize(case_tokenizer, prompts, range(len(prompts)))
        weights = fields.pop("sample_weights", None)
        sample_weights = None if weights is None else torch.tensor(weights)
        mask = fields.pop("mask", None)
        options = {"sample_weights": sample_weights, "mask": None if mask is None else torch.from_numpy(mask)}
        config = script.LossConfig(**fields)
        with torch.set_grad_enabled(learned is not None):
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            loss, recorded = recorded_loss(script, unet, scheduler, latents, encoder_hidden_states, config, **options)
        inputs = {"latents": latents.numpy(), "input_ids": input_ids.numpy()}
        save_case(out_dir, name, inputs, loss, scheduler, recorded, None if learned is None else {"learned": learned})
    sdxl_textual_inversion_cases(sdxl_pipeline, out_dir, latents)
    for name, fields in LORA_CASES.items():
        family = SDXL if name.startswith("lora_sdxl") else SD
        lora_case(name, fields, sdxl_pipeline if family is SDXL else pipeline, family, out_dir, latents)
    long_prompt_cases(pipeline, sdxl_pipeline, out_dir)
    validation_loss_cases(pipeline, out_dir)


def long_prompt_cases(pipeline, sdxl_pipeline, out_dir):
    """--max_token_length: LONG_PROMPTS' chunked ids and their encoding by each family's text encoders, to
    long_prompts-<family>.npz (hidden states, and SDXL's pooled embedding)."""
    from parity_cases import LONG_PROMPT_TOKENS, LONG_PROMPTS

    from sdtrain.torch.long_prompts import encode_text_chunks, token_ids

    for family, folder in [(SD, pipeline), (SDXL, sdxl_pipeline)]:
        classes = [CLIPTextModel, CLIPTextModelWithProjection]
        names = zip(classes, family.text_encoders, strict=False)
        encoders = [cls.from_pretrained(folder, subfolder=name).eval() for cls, name in names]
        tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=name) for name in family.tokenizers]
        input_ids = token_ids(tokenizers, LONG_PROMPTS, LONG_PROMPT_TOKENS)
        with torch.no_grad():
            hidden, pooled = encode_text_chunks(family_code(family), encoders, input_ids, 77)
        saved = {"input_ids": input_ids.numpy(), "hidden": hidden.numpy()}
        saved.update({} if pooled is None else {"pooled": pooled.numpy()})
        np.savez(os.path.join(out_dir, f"long_prompts-{family.name}.npz"), **saved)


def validation_loss_cases(pipeline, out_dir):
    """The held-out validation loss: sdtrain.torch.validation_loss.validation_loss_batch per image and timestep, with
    the framework-free noise and timesteps; saved as per_image [image, timestep] with its inputs."""
    from parity_cases import VALIDATION_LOSS_CASES, VALIDATION_LOSS_SEED, VALIDATION_LOSS_TIMESTEPS

    from sdtrain.torch.validation_loss import validation_loss_batch
    from sdtrain.validation_loss import loss_noise, loss_timesteps

    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet").eval()
    latents, input_ids = fixed_latents(), torch_text.tokenize(tokenizer, PROMPTS, range(len(PROMPTS)))
    for name, prediction in VALIDATION_LOSS_CASES.items():
        scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler", prediction_type=prediction)
        timesteps = loss_timesteps(VALIDATION_LOSS_TIMESTEPS, scheduler.config.num_train_timesteps)
        per_timestep = []
        with torch.no_grad():
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            for k, timestep in enumerate(timesteps):
                noise = [loss_noise(VALIDATION_LOSS_SEED, i, k, tuple(latents.shape[1:])) for i in range(len(latents))]
                noise = torch.from_numpy(np.stack(noise))
                losses = validation_loss_batch(
                    unet, scheduler, latents, encoder_hidden_states, timestep, noise, prediction
                )
                per_timestep.append(losses.numpy())
        saved = {"latents": latents.numpy(), "input_ids": input_ids.numpy(), "per_image": np.stack(per_timestep, 1)}
        np.savez(os.path.join(out_dir, f"{name}.npz"), **saved)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""The model card (README.md) a run writes beside what it saved: the Hub's metadata header, whose license and family
tags come from the model family (sdtrain.families.Family), and how to load the result. Plain values in, text out, so
the PyTorch scripts and their Flax twins write the same card."""

import os

from sdtrain.lora import TEXT_ENCODER_LORA_MODULES, ui_lora_path

GENERAL_TAGS = ("text-to-image", "diffusers")


def card_header(family, base_model, extra_tags=()):
    """The YAML front matter the Hub reads: license, base model, tags, library."""
    tags = [*family.tags, *GENERAL_TAGS, *extra_tags]
    return [
        "---",
        f"license: {family.license}",
        f"base_model: {base_model}",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "library_name: diffusers",
        "---",
    ]


def fine_tuned_card(family, script, base_model, data, repo, prompt, settings, validation_grid=None):
    """The card of a fine-tuned pipeline: what was trained on what, how to sample it from `repo` (the hub id or the
    output folder), and `settings` (name -> value) as a table."""
    lines = [
        *card_header(family, base_model),
        "",
        f"# {os.path.basename(os.path.abspath(repo))}",
        "",
        f"UNet of `{base_model}` fine-tuned with {script} on `{data}`.",
        "",
        "```python",
        f"from diffusers import {family.pipeline_class}",
        "",
        f'pipe = {family.pipeline_class}.from_pretrained("{repo}")',
        f'image = pipe("{prompt}").images[0]',
        "```",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in settings.items()],
    ]
    return lines + (["", f"![validation]({validation_grid})"] if validation_grid else [])


def lora_card(family, script, base_model, data, repo, prompt, config, output_dir, settings, validation_grid=None):
    """The card of a LoRA (config: an sdtrain.lora.LoraConfig): that it is one, its rank and alpha and what it adapts,
    the base model it loads onto, how to load it in diffusers from `repo` (the hub id or the output folder) and in the
    UIs (the kohya-layout file in output_dir), and `settings` (name -> value) as a table."""
    adapts = "the UNet's " + ", ".join(config.unet_modules)
    if config.train_text_encoder:
        encoders = "text encoder's" if family.num_text_encoders == 1 else "text encoders'"
        adapts += f" and the {encoders} " + ", ".join(TEXT_ENCODER_LORA_MODULES)
    settings = {"LoRA rank": config.rank, "LoRA alpha": f"{config.alpha:g}", "LoRA dropout": config.dropout, **settings}
    lines = [
        *card_header(family, base_model, ["lora"]),
        "",
        f"# {os.path.basename(os.path.abspath(repo))}",
        "",
        f"LoRA of `{base_model}` trained with {script} on `{data}`: rank {config.rank}, alpha {config.alpha:g} (the "
        f"update is scaled by alpha / rank = {config.scale:g}), adapting {adapts}. The base model's weights are "
        "unchanged: load it, then the LoRA.",
        "",
        "```python",
        f"from diffusers import {family.pipeline_class}",
        "",
        f'pipe = {family.pipeline_class}.from_pretrained("{base_model}")',
        f'pipe.load_lora_weights("{repo}")',
        f'image = pipe("{prompt}").images[0]',
        "```",
        "",
        f"AUTOMATIC1111 / Forge, ComfyUI and InvokeAI: put `{os.path.basename(ui_lora_path(output_dir))}` (the kohya "
        f"layout, its alpha included) in the UI's LoRA folder and use it with `{base_model}`.",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in settings.items()],
    ]
    return lines + (["", f"![validation]({validation_grid})"] if validation_grid else [])


def textual_inversion_card(
    family, base_model, placeholder_token, num_vectors, data, global_step, embedding_paths, prompt, validation_grid=None
):
    """The card of a learned embedding: how to load it into the base pipeline (embedding_paths: one file per text
    encoder, in the family's order) and use the placeholder."""
    if family.num_text_encoders == 1:
        load = [f'pipe.load_textual_inversion("{embedding_paths[0]}")']
    else:
        # One file per text encoder: each gets the placeholder's tokens and its own rows.
        load = [
            f'pipe.load_textual_inversion("{path}", token="{placeholder_token}", text_encoder=pipe.{text_encoder}, '
            f"tokenizer=pipe.{tokenizer})"
            for path, text_encoder, tokenizer in zip(
                embedding_paths, family.text_encoders, family.tokenizers, strict=True
            )
        ]
    lines = [
        *card_header(family, base_model, ["textual_inversion"]),
        "",
        f"# Textual inversion: {placeholder_token}",
        "",
        f"Embedding of `{placeholder_token}` ({num_vectors} vector(s)) learned on `{base_model}` "
        f"from the images in `{data}`, {global_step} optimizer updates.",
        "",
        "```python",
        f"from diffusers import {family.pipeline_class}",
        "",
        f'pipe = {family.pipeline_class}.from_pretrained("{base_model}")',
        *load,
        f'image = pipe("{prompt}").images[0]',
        "```",
    ]
    return lines + (["", f"![validation]({validation_grid})"] if validation_grid else [])


def write_model_card(output_dir, lines):
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

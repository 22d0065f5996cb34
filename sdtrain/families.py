"""Which model family a pipeline belongs to, read from its model_index.json before any weights load: the scripts
train Stable Diffusion 1.x / 2.x ("sd") and Stable Diffusion XL ("sdxl"), and name any other family they are given
instead of failing later on a component it does not have."""

import json
import os

from sdtrain.cli import UserError

# Pipelines whose class name starts with one of these are families the scripts do not train (the model that denoises
# is a transformer, or the pipeline has another text conditioning).
OTHER_FAMILIES = {
    "StableDiffusion3": "Stable Diffusion 3",
    "Flux": "Flux",
    "PixArt": "PixArt",
    "StableCascade": "Stable Cascade",
    "Kandinsky": "Kandinsky",
    "Wuerstchen": "Wuerstchen",
    "AuraFlow": "AuraFlow",
    "HunyuanDiT": "Hunyuan-DiT",
    "Lumina": "Lumina",
    "Sana": "Sana",
    "Kolors": "Kolors",
    "CogView": "CogView",
    "QwenImage": "Qwen-Image",
}
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x / 2.x", "sdxl": "Stable Diffusion XL"}


def present_components(model_index):
    """The components a model_index.json lists with a class (a component saved as null is absent)."""
    return {
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, (list, tuple)) and value and value[-1] is not None
    }


def pipeline_family(model_index, source):
    """ "sd" or "sdxl" for a pipeline's model_index.json (a dict); a ValueError naming `source` and what it is
    otherwise."""
    class_name = str(model_index.get("_class_name", ""))
    for prefix, family in OTHER_FAMILIES.items():
        if class_name.startswith(prefix):
            raise UserError(
                f"{source} is a {family} pipeline ({class_name}): these scripts train Stable Diffusion 1.x / 2.x "
                "and SDXL pipelines (a UNet conditioned on CLIP text encoders)"
            )
    components = present_components(model_index)
    missing = {"unet", "vae", "text_encoder", "tokenizer"} - components
    if "text_encoder_2" in components and missing == {"text_encoder", "tokenizer"}:
        raise UserError(
            f"{source} is an SDXL refiner ({class_name}, only the second text encoder): train the SDXL base pipeline"
        )
    if missing:
        raise UserError(
            f"{source} ({class_name or 'no _class_name'}) has no {', '.join(sorted(missing))}: these scripts train "
            "Stable Diffusion 1.x / 2.x and SDXL pipelines in the diffusers layout"
        )
    return "sdxl" if {"text_encoder_2", "tokenizer_2"} <= components else "sd"


def local_model_index(path):
    """What a local pipeline folder saved without model_index.json holds: each subfolder as a component."""
    return {name: ["", "folder"] for name in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, name))}


def folder_family(folder, source):
    """pipeline_family() of a local pipeline folder."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return pipeline_family(local_model_index(folder), source)
    with open(path) as f:
        return pipeline_family(json.load(f), source)


def component_problem(folder, subfolder, weight_names=(), variant=None):
    """What a local pipeline folder's component lacks, in words: its folder, its config, or (for a model: weight_names,
    the files its loader reads, e.g. ("model.safetensors", "pytorch_model.bin")) its weights; None when all are
    there, and then the loader's own error is the one to show."""
    path = os.path.join(folder, subfolder)
    if not os.path.isdir(path):
        return f"there is no {subfolder}/ folder in {folder}"
    names = os.listdir(path)
    if not any(name.endswith(".json") for name in names):
        return f"there is no config (.json) in {path}"
    suffixes = (f".{variant}.safetensors", f".{variant}.bin") if variant else (".safetensors", ".bin")
    if weight_names and not any(name.endswith(suffixes) or (variant and f".{variant}-" in name) for name in names):
        wanted = " or ".join(weight_names)
        return f"there are no weights in {path} ({wanted}{f', variant {variant}' if variant else ''})"
    return None

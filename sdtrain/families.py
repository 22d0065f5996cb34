"""Model families: what differs between Stable Diffusion 1.x / 2.x ("sd") and Stable Diffusion XL ("sdxl"),
described once, without a framework, and chosen once per run from the pipeline's model_index.json before any weights
load. Any other family is named and refused instead of failing later on a component it does not have.

The contract: a script asks `pipeline_family(model_index, source)` (or `folder_family`) for a `Family` and never
tests for SD or SDXL itself. The framework adapters (sdtrain/torch/family.py, sdtrain/jax/family.py) give each family
the code that needs a framework (loading its text encoders, encode_text, its added conditioning) behind the same
names; docs/development.md says how a new family plugs in."""

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family, as the scripts need to know it. Per-pipeline settings (force_zeros_for_empty_prompt) are filled
    in by pipeline_family from the pipeline's own model_index.json."""

    name: str  # "sd" or "sdxl": the key of its code in the adapters' FAMILY_CODE
    title: str  # in messages and model cards
    tokenizers: tuple  # the pipeline's tokenizer components, one per text encoder, in order
    text_encoders: tuple  # the pipeline's text encoder components, in order
    pipeline_class: str  # diffusers' pipeline class (its Flax twin is "Flax" + this)
    # SDXL's added conditioning (Podell et al. 2023, arXiv:2307.01952, sec. 2.2): the pooled text embedding and the
    # size and crop time ids enter the UNet's added embedding.
    added_conditioning: bool
    # SDXL pipelines sample the unconditional branch, and so an empty caption, as zeros rather than as the encoded empty
    # prompt, unless their model_index.json says force_zeros_for_empty_prompt: false.
    force_zeros_for_empty_prompt: bool
    # SDXL's VAE overflows in fp16 and says so in its config (force_upcast): it then runs in fp32. SD 1.x / 2.x VAEs
    # carry the same key but run in the mixed-precision dtype, as diffusers' SD scripts run them.
    honours_vae_force_upcast: bool
    license: str  # the model card's license: the base model's
    tags: tuple  # the model card's family tags (the writer adds text-to-image, diffusers)
    # kohya's name for the base model in a LoRA file's metadata (ss_base_model_version), by the UNet's
    # cross_attention_dim (the text encoder's width); the first is the default for other widths.
    kohya_base_models: tuple

    @property
    def num_text_encoders(self):
        return len(self.text_encoders)


SD = Family(
    name="sd",
    title="Stable Diffusion 1.x / 2.x",
    tokenizers=("tokenizer",),
    text_encoders=("text_encoder",),
    pipeline_class="StableDiffusionPipeline",
    added_conditioning=False,
    force_zeros_for_empty_prompt=False,
    honours_vae_force_upcast=False,
    license="creativeml-openrail-m",
    tags=("stable-diffusion",),
    kohya_base_models=((768, "sd_v1"), (1024, "sd_v2")),  # CLIP ViT-L (1.x), OpenCLIP ViT-H (2.x)
)
SDXL = Family(
    name="sdxl",
    title="Stable Diffusion XL",
    tokenizers=("tokenizer", "tokenizer_2"),
    text_encoders=("text_encoder", "text_encoder_2"),
    pipeline_class="StableDiffusionXLPipeline",
    added_conditioning=True,
    force_zeros_for_empty_prompt=True,
    honours_vae_force_upcast=True,
    license="openrail++",
    tags=("stable-diffusion-xl",),
    kohya_base_models=((2048, "sdxl_base_v1-0"),),
)


def present_components(model_index):
    """The components a model_index.json lists with a class (a component saved as null is absent)."""
    return {
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, (list, tuple)) and value and value[-1] is not None
    }


def pipeline_family(model_index, source):
    """The Family (SD or SDXL) of a pipeline's model_index.json (a dict), with the pipeline's own settings; a
    UserError naming `source` and what it is otherwise."""
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
    second = {"text_encoder_2", "tokenizer_2"}
    if not (components & second or class_name.startswith("StableDiffusionXL")):
        return SD
    if second - components:
        # An SDXL UNet trained as SD would fail at its first step on the added conditioning it is not given.
        raise UserError(
            f"{source} is an SDXL pipeline ({class_name or 'no _class_name'}) without its "
            f"{' and '.join(sorted(second - components))}: SDXL needs both text encoders and their tokenizers"
        )
    zeros = model_index.get("force_zeros_for_empty_prompt", SDXL.force_zeros_for_empty_prompt)
    return dataclasses.replace(SDXL, force_zeros_for_empty_prompt=bool(zeros))


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

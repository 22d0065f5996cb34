"""Run the UIs' own model loaders on our files, offline, and print what they make of them as one JSON line.

Run by the JAX environment (.venv-flax), which holds ComfyUI's `comfy` package and InvokeAI's model probe
(requirements_ui_loaders.txt, installed without their declared dependencies):

    .venv-flax/bin/python devkit/ui_loaders.py checkpoint FILE.safetensors
    .venv-flax/bin/python devkit/ui_loaders.py embedding FILE.safetensors --width 768
    .venv-flax/bin/python devkit/ui_loaders.py embedding FILE.safetensors --sdxl
    .venv-flax/bin/python devkit/ui_loaders.py lora LORA.safetensors --checkpoint BASE.safetensors \
        --pipeline BASE_FOLDER --patched OUT

checkpoint: ComfyUI's load_checkpoint_guess_config (the model family it detects, and whether every tensor of the file
is what its loaded UNet, VAE and text encoder hold, read back through its own save path) and InvokeAI's model probe
(type, format, base, variant, prediction type). embedding: ComfyUI's load_embed and its tokenizer's expansion of
"embedding:NAME" (for SDXL, per text encoder), and InvokeAI's probe. lora: ComfyUI's LoRA path on a kohya-layout file
over the base model's single file (the keys its loader leaves unmapped, the weights it patches), InvokeAI's probe and
its LoRA loader and patcher over the base model's diffusers folder; the weights each patched go to OUT, keyed by
diffusers module names. The tests (tests/test_ui_loaders.py) assert on the printed result.
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
import types

# ComfyUI reads its settings from COMFYUI_* variables (and ./config.yaml, so run this from a folder without one).
os.environ.setdefault("COMFYUI_CPU", "true")
# On CPU ComfyUI would still store the text encoder in fp16; fp32 keeps an fp32 file's tensors exact.
os.environ.setdefault("COMFYUI_FP32_TEXT_ENC", "true")


class AbsentModule(types.ModuleType):
    """A module the loaders import but never use on our files: any attribute is a placeholder class, and calling it
    fails, so a code path that did use it would show up as an error."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is stubbed out in this test environment")

        return type(name, (), {"__init__": unavailable})


class AbsentPackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torchvision: PyPI's builds for this torch are CUDA builds that fail to import beside the CPU torch, and only
    ComfyUI's Stable Cascade code and InvokeAI's image utilities use it. onnxruntime, onnx: InvokeAI names them in
    types and its ONNX model class only. cv2 (InvokeAI's image utilities) and compel (its prompt weighting, a base
    class of its textual inversion manager): imported on the way to its model loaders, unused by a LoRA's loading."""

    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = AbsentModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        module.__version__ = "0+absent"


def stub_absent_packages(names=("torchvision", "onnxruntime", "onnx", "cv2", "compel")):
    missing = set()
    for name in names:
        try:
            __import__(name)
        except Exception:
            for loaded in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
                del sys.modules[loaded]
            missing.add(name)
    if missing:
        sys.meta_path.insert(0, AbsentPackages(missing))


def invokeai_config(path):
    # InvokeAI's app imports its model loaders at start-up. Probed cold, its LoRA configs import
    # invokeai.backend.patches in an order set by string hashing, which for some PYTHONHASHSEED values is a circular
    # import that the probe reports as "not a LoRA" (seen in CI: 2 seeds of 8 here). Importing the loader first, as
    # the app does, makes every seed classify the same.
    import invokeai.backend.model_manager.load.model_loaders.lora  # noqa: F401
    from invokeai.backend.model_manager.configs.factory import ModelConfigFactory

    # The hash is only InvokeAI's database key; skipping it leaves the classification as it is.
    return ModelConfigFactory.from_model_on_disk(path, override_fields={"hash": "skip"}, allow_unknown=False)


def invokeai_probe(path):
    result = invokeai_config(path)
    config = result.config
    if config is None:
        return {"config": None, "reasons": {name: str(reason)[:200] for name, reason in result.details.items()}}
    found = {"config": type(config).__name__, "type": config.type.value, "format": config.format.value}
    found["base"] = config.base.value
    for field in ["variant", "prediction_type"]:
        value = getattr(config, field, None)
        found[field] = getattr(value, "value", value)
    return found


def comfy_checkpoint(path):
    import comfy.sd
    import torch
    from safetensors.torch import load_file

    with torch.no_grad():  # ComfyUI's CLIP constructor copies into parameters in place
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    # ComfyUI's own save path turns what its modules hold back into original-layout keys.
    held = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    written = load_file(path)
    not_loaded = sorted(key for key in written if key not in held)
    differ = sorted(
        key for key in written if key in held and not torch.equal(held[key].to(written[key].dtype), written[key])
    )
    return {
        "model_config": type(model.model.model_config).__name__,
        "model_type": model.model.model_type.name,
        "tensors": len(written),
        "not_loaded": not_loaded[:20],
        "differ": differ[:20],
    }


def comfy_prompt_vectors(tokenizer, folder, name, width, tokens_key, embed_key):
    """ComfyUI's rows for embedding NAME (load_embed, with the file key its text encoder asks for) and whether its
    tokenizer (output `tokens_key`) expands "embedding:NAME" in a prompt to exactly those vectors."""
    import comfy.sd1_clip
    import torch

    rows = comfy.sd1_clip.load_embed(name, folder, width, embed_key)
    tokens = tokenizer.tokenize_with_weights(f"a photo of embedding:{name}")[tokens_key][0]
    vectors = [token for token, _ in tokens if isinstance(token, torch.Tensor)]
    return rows, {
        "rows": list(rows.shape),
        "vectors_in_prompt": len(vectors),
        "vectors_match": len(vectors) == len(rows)
        and all(torch.equal(v, r) for v, r in zip(vectors, rows, strict=True)),
    }


def comfy_embedding(path, width):
    import comfy.sd1_clip
    import comfy.sd2_clip

    folder, file = os.path.split(path)
    name = os.path.splitext(file)[0]
    # The text encoder the width belongs to: CLIP ViT-L (SD 1.x, 768) or OpenCLIP ViT-H (SD 2.x, 1024).
    tokenizer, key = (comfy.sd1_clip.SD1Tokenizer, "l") if width == 768 else (comfy.sd2_clip.SD2Tokenizer, "h")
    _, found = comfy_prompt_vectors(tokenizer(embedding_directory=folder), folder, name, width, key, "clip_" + key)
    return found


# SDXL's text encoders in ComfyUI: (its tokenizer's output key, the embedding file's key, the width).
COMFY_SDXL_TEXT_ENCODERS = [("l", "clip_l", 768), ("g", "clip_g", 1280)]


def comfy_sdxl_embedding(path):
    """Per half of an SDXL embedding file ({clip_l, clip_g}): what comfy_embedding reports, and whether the rows
    ComfyUI loads for that text encoder are the file's rows under its key (not the other half's)."""
    import comfy.sdxl_clip
    import torch
    from safetensors.torch import load_file

    folder, file = os.path.split(path)
    name = os.path.splitext(file)[0]
    tokenizer = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=folder)
    written = load_file(path)
    report = {}
    for tokens_key, embed_key, width in COMFY_SDXL_TEXT_ENCODERS:
        rows, found = comfy_prompt_vectors(tokenizer, folder, name, width, tokens_key, embed_key)
        report[embed_key] = {
            **found,
            "rows_are_the_files": embed_key in written and torch.equal(rows, written[embed_key]),
        }
    return report


class LoggedWarnings(logging.Handler):
    """The warnings ComfyUI logs while it runs: how its LoRA loader says a key went unused ("lora key not loaded",
    "NOT LOADED", "could not patch")."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)


# ComfyUI's text encoders by attribute of its CLIP model, and the diffusers component each is: SD 1.x's ViT-L, SD 2.x's
# ViT-H, SDXL's ViT-L and bigG.
COMFY_TEXT_ENCODERS = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}


def diffusers_names(unet_config):
    """ComfyUI's names of the model's weights (its UNet's under diffusion_model., its text encoders' under clip_l. /
    clip_h. / clip_g.) -> diffusers' (unet. / text_encoder. / text_encoder_2.), from its own diffusers-to-original
    UNet map, reversed."""
    import comfy.utils

    unet = {
        f"diffusion_model.{ours}": f"unet.{theirs}"
        for theirs, ours in comfy.utils.unet_to_diffusers(unet_config).items()
    }

    def name(key):
        if key in unet:
            return unet[key]
        head, _, rest = key.partition(".transformer.")
        if head in COMFY_TEXT_ENCODERS and rest:
            return f"{COMFY_TEXT_ENCODERS[head]}.{rest}"
        raise KeyError(f"no diffusers name for ComfyUI's weight {key}")

    return name


def comfy_lora(path, checkpoint, patched_path):
    """ComfyUI's LoRA path, as its LoraLoader node runs it at strength 1 and its samplers then load the models: the
    checkpoint, load_lora_for_models (the key map its models offer, model_lora_keys_unet / model_lora_keys_clip, and
    load_lora on the file), load_models_gpu (which patches the weights). Writes the weight of every module it
    patched, keyed by diffusers name, to patched_path."""
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import torch
    from safetensors.torch import load_file, save_file

    with torch.no_grad():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, output_clip=True)
    lora = load_file(path)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    # load_lora's rule: a module's keys (.lora_up.weight, .lora_down.weight, .alpha) are used when the key map names it.
    modules = {key.removesuffix(".weight").rsplit(".", 1)[0] for key in lora}
    unmapped = sorted(key for key in lora if key.removesuffix(".weight").rsplit(".", 1)[0] not in key_map)
    with LoggedWarnings() as warnings, torch.no_grad():
        model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        comfy.model_management.load_models_gpu([model_lora, clip_lora.patcher])
    name = diffusers_names(model.model.model_config.unet_config)
    patched = {}
    for patcher in [model_lora, clip_lora.patcher]:
        held = patcher.model.state_dict()
        patched.update({name(key): held[key].detach().float().contiguous() for key in patcher.patches})
    save_file(patched, patched_path)
    return {
        "model_config": type(model.model.model_config).__name__,
        "file_modules": len(modules),
        "patched_modules": len(patched),
        "unet_modules": sum(key.startswith("unet.") for key in patched),
        "text_encoder_modules": sum(not key.startswith("unet.") for key in patched),
        "unmapped": unmapped[:20],
        "warnings": warnings.messages[:20],
    }


# The LoRA key prefix InvokeAI patches each diffusers component with (its denoise and prompt invocations), SD and SDXL.
INVOKEAI_LORA_PREFIXES = {
    "sd": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}


def invokeai_lora(path, pipeline_dir, patched_path):
    """InvokeAI's LoRA path: the config its probe gives the file, its LoRA loader (which converts SDXL's keys to
    diffusers' names), and its LayerPatcher on the base pipeline's diffusers UNet and transformers text encoders, with
    the prefix its invocations use for each, patching weights in place (as on a GPU). Writes the weight of every
    module it patched, keyed by diffusers name, to patched_path."""
    import torch
    from diffusers import UNet2DConditionModel
    from invokeai.app.services.config.config_default import get_config
    from invokeai.backend.model_manager.load.model_loaders.lora import LoRALoader
    from invokeai.backend.patches.layer_patcher import LayerPatcher
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = invokeai_config(path).config
    loader = LoRALoader(get_config(), logging.getLogger("invokeai"), None)
    loader._get_model_path(config)  # where the loader notes the base, before it loads
    patch = loader._load_model(config)
    family = "sdxl" if os.path.isdir(os.path.join(pipeline_dir, "text_encoder_2")) else "sd"
    models = {"unet": UNet2DConditionModel.from_pretrained(os.path.join(pipeline_dir, "unet"))}
    models["text_encoder"] = CLIPTextModel.from_pretrained(os.path.join(pipeline_dir, "text_encoder"))
    if family == "sdxl":
        models["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            os.path.join(pipeline_dir, "text_encoder_2")
        )
    flattened = not any("." in key for key in patch.layers)
    unmatched = []
    patched = {}
    for component, prefix in INVOKEAI_LORA_PREFIXES[family].items():
        model = models[component]
        modules = {}
        for key in patch.layers:
            if key.startswith(prefix):
                try:
                    modules[key] = LayerPatcher._get_submodule(model, key[len(prefix) :], flattened)[0]
                except AttributeError:
                    unmatched.append(key)
        with LayerPatcher.apply_smart_model_patches(
            model=model, patches=[(patch, 1.0)], prefix=prefix, dtype=torch.float32, force_direct_patching=True
        ):
            for module in modules.values():
                weight = model.get_submodule(module).weight
                patched[f"{component}.{module}.weight"] = weight.detach().float().clone().contiguous()
    prefixes = tuple(INVOKEAI_LORA_PREFIXES[family].values())
    save_file(patched, patched_path)
    return {
        "layers": len(patch.layers),
        "patched_modules": len(patched),
        "no_prefix": sorted(key for key in patch.layers if not key.startswith(prefixes))[:20],
        "unmatched": unmatched[:20],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["checkpoint", "embedding", "lora"], help="What the file is.")
    parser.add_argument("path", help="The .safetensors file.")
    parser.add_argument("--width", type=int, default=768, help="embedding: the text encoder's width (768 or 1024).")
    parser.add_argument(
        "--sdxl", action="store_true", help="embedding: an SDXL file ({clip_l, clip_g}), one half per text encoder."
    )
    parser.add_argument("--checkpoint", help="lora: the base model's single file, which ComfyUI loads.")
    parser.add_argument("--pipeline", help="lora: the base model's diffusers folder, whose models InvokeAI patches.")
    parser.add_argument(
        "--patched", help="lora: a folder for the weights each UI patched (comfyui.safetensors, invokeai.safetensors)."
    )
    args = parser.parse_args(argv)
    if args.kind == "lora" and not (args.checkpoint and args.pipeline and args.patched):
        parser.error("lora needs --checkpoint, --pipeline and --patched")
    path = os.path.abspath(args.path)
    import torch  # noqa: F401  (before the stubs: only what fails to import is replaced)

    stub_absent_packages()
    if args.kind == "checkpoint":
        report = {"comfyui": comfy_checkpoint(path), "invokeai": invokeai_probe(path)}
    elif args.kind == "lora":
        patched = os.path.abspath(args.patched)
        os.makedirs(patched, exist_ok=True)
        report = {
            "comfyui": comfy_lora(path, os.path.abspath(args.checkpoint), os.path.join(patched, "comfyui.safetensors")),
            "invokeai": invokeai_probe(path),
            "invokeai_patch": invokeai_lora(
                path, os.path.abspath(args.pipeline), os.path.join(patched, "invokeai.safetensors")
            ),
        }
    elif args.sdxl:
        report = {"comfyui": comfy_sdxl_embedding(path), "invokeai": invokeai_probe(path)}
    else:
        report = {"comfyui": comfy_embedding(path, args.width), "invokeai": invokeai_probe(path)}
    print("UI_LOADERS " + json.dumps(report))


if __name__ == "__main__":
    main()

"""LoRA files without training, and what diffusers makes of them, for developing and checking the UI loader tests.

    python -m devkit.lora_files PIPELINE OUTPUT_DIR --rank 4 --lora_alpha 8

writes a LoRA of a saved SD or SDXL pipeline into OUTPUT_DIR through sdtrain.lora.write_lora_files, as a LoRA run of
train_text_to_image.py does (both files: diffusers' and the kohya layout for the UIs), with peft's modules on the UNet
and every text encoder and random A and B (a trained B is nonzero; a fresh one is zero and would hide a wrong merge).

fused_weights (PyTorch environment) is the reference the UIs' merge is held to: diffusers' load_lora_weights then
fuse_lora on the base pipeline, read back for every module the LoRA adapts.
"""

import argparse
import json
import os


def pipeline_class(pipeline_dir):
    """diffusers' pipeline class for a saved SD or SDXL pipeline (SDXL: a second text encoder)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    has_second = os.path.isdir(os.path.join(pipeline_dir, "text_encoder_2"))
    return StableDiffusionXLPipeline if has_second else StableDiffusionPipeline


def text_encoder_names(pipeline_dir):
    return [name for name in ("text_encoder", "text_encoder_2") if os.path.isdir(os.path.join(pipeline_dir, name))]


def random_lora_state(pipeline_dir, config, seed=0):
    """peft's LoRA modules (config: sdtrain.lora.LoraConfig) on the pipeline's UNet and, with train_text_encoder,
    its text encoders, with A and B drawn at random; their tensors as float32 NumPy arrays keyed by diffusers_key."""
    import peft
    import torch

    from sdtrain.lora import TEXT_ENCODER_LORA_MODULES, diffusers_key

    pipe = pipeline_class(pipeline_dir).from_pretrained(pipeline_dir)
    targets = {"unet": config.unet_modules}
    if config.train_text_encoder:
        targets.update({name: TEXT_ENCODER_LORA_MODULES for name in text_encoder_names(pipeline_dir)})
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for component, modules in targets.items():
        model = getattr(pipe, component)
        lora = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(modules))
        model = peft.inject_adapter_in_model(lora, model)
        for key, tensor in peft.get_peft_model_state_dict(model).items():
            module, matrix = key.removesuffix(".weight").rsplit(".lora_", 1)
            # Small enough that W + (alpha / rank) B A stays near W, large enough to move every weight.
            array = (0.1 * torch.randn(tensor.shape, generator=generator)).numpy()
            state[diffusers_key(component, module, matrix)] = array
    return state


def fused_weights(pipeline_dir, lora_dir, modules):
    """(base, fused): the weight (float32 NumPy) of each of `modules` ("unet.<module>", "text_encoder.<module>", ...)
    in the base pipeline, and diffusers' merge of the LoRA in lora_dir into it: `pipe.load_lora_weights(lora_dir)`
    then `pipe.fuse_lora()` on the UNet and every text encoder, at scale 1."""
    pipe = pipeline_class(pipeline_dir).from_pretrained(pipeline_dir)  # float32, as saved

    def layer(name):
        component, module = name.split(".", 1)
        model = getattr(pipe, component)
        if component != "unet" and not hasattr(model, "text_model"):
            module = module.removeprefix(
                "text_model."
            )  # transformers 5's CLIPTextModel (see sdtrain.lora.diffusers_key)
        found = model.get_submodule(module)
        # peft keeps its wrapper after fusing; the merged weight is its base layer's.
        return getattr(found, "base_layer", found)

    base = {name: layer(name).weight.detach().numpy().copy() for name in modules}
    pipe.load_lora_weights(lora_dir)
    pipe.fuse_lora(components=["unet", *text_encoder_names(pipeline_dir)])
    return base, {name: layer(name).weight.detach().numpy().copy() for name in modules}


def main(argv=None):
    from sdtrain.families import SD, SDXL
    from sdtrain.lora import DEFAULT_LORA_LAYERS, LoraConfig, kohya_base_model, write_lora_files

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="A saved SD or SDXL pipeline folder.")
    parser.add_argument("output_dir", help="Where the two LoRA files go.")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lora_alpha", type=float, default=8.0)
    parser.add_argument("--lora_layers", default=DEFAULT_LORA_LAYERS)
    parser.add_argument("--no_text_encoder", action="store_true", help="A UNet-only LoRA.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = LoraConfig(
        rank=args.rank,
        alpha=args.lora_alpha,
        dropout=0.0,
        unet_modules=tuple(args.lora_layers.split(",")),
        train_text_encoder=not args.no_text_encoder,
    )
    text_encoders = text_encoder_names(args.pipeline)
    with open(os.path.join(args.pipeline, "unet", "config.json")) as f:
        cross_attention_dim = json.load(f)["cross_attention_dim"]
    family = SDXL if len(text_encoders) == 2 else SD
    state = random_lora_state(args.pipeline, config, args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    size = write_lora_files(
        args.output_dir, state, config, text_encoders, kohya_base_model(family, cross_attention_dim)
    )
    print(f"{len(state)} tensors, {size:.2f} MiB in {args.output_dir}")


if __name__ == "__main__":
    main()

"""--save_single_file: a diffusers pipeline folder as one .safetensors in the original Stable Diffusion key layout
(SD 1.x / 2.x: CompVis' and Stability's LDM code; SDXL: Stability's generative-models "SGM" code), the file A1111,
ComfyUI and InvokeAI load. Reads the saved folder, so it serves PyTorch and JAX alike; the weights are NumPy arrays
(bfloat16 as its bits, converted with the rounding torch uses), so no framework is needed."""

import dataclasses
import json
import logging
import os

import numpy as np
import safetensors

from sdtrain.cli import UserError, WriteFailure
from sdtrain.run_folder import flush_file, fsync_folder, write_failure

logger = logging.getLogger(__name__)


SINGLE_FILE_DTYPES = ["fp16", "bf16", "fp32"]


def add_single_file_arguments(group):
    group.add_argument(
        "--save_single_file",
        action="store_true",
        help="Also write output_dir/<its name>.safetensors in the original SD layout (A1111/Forge, ComfyUI, InvokeAI).",
    )
    group.add_argument(
        "--single_file_dtype",
        type=str,
        default="fp16",
        choices=SINGLE_FILE_DTYPES,
        help="Precision of the --save_single_file weights (fp16 halves the file; the UIs run fp16 anyway).",
    )


# The safetensors dtypes a pipeline's weights come in, as NumPy reads them; BF16 is read as its 16 bits (NumPy has no
# bfloat16) and widened to float32 exactly, since a bfloat16 is the upper half of a float32.
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64}


def bfloat16_to_float32(bits):
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bfloat16(array):
    """The bfloat16 bits of a float32 array, rounded to nearest even as torch rounds (c10's round_to_nearest_even),
    NaN as torch's 0x7FC0, so the file is byte-identical to one torch would write."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding_bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    rounded = ((bits + rounding_bias) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded)


SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")


SD_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


# Inside a ResNet block the original names its layers by position in a Sequential.
LDM_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


LDM_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}


LDM_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# OpenCLIP (SD 2.x's ViT-H, SDXL's second text encoder, bigG) names for the layers of a transformers CLIP encoder layer.
OPEN_CLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


# The text encoders, in the pipeline's order, that single_file_layout and original_layout_state read.
TEXT_ENCODERS = ["text_encoder", "text_encoder_2"]


# Where each layout keeps its text encoders (in pipeline order), in transformers' CLIP names under a ".transformer."
# prefix, or OpenCLIP's names under a ".model." one.
TEXT_ENCODER_PREFIXES = {
    "sd1": ["cond_stage_model.transformer."],
    "sd2": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}


# SDXL base's added embedding reads six size numbers (original size, crop corner, target size); the refiner five
# (original size, crop corner, aesthetic score).
SDXL_TIME_NUMBERS, SDXL_REFINER_TIME_NUMBERS = 6, 5


def sdxl_problems(unet_config, text_configs):
    """What keeps an SDXL-style UNet ("text_time" added embedding) and its text encoders from SDXL base's layout: CLIP
    ViT-L and OpenCLIP bigG side by side, and the pooled bigG embedding plus six size numbers in the added embedding."""
    refiner = "an SDXL refiner (one OpenCLIP text encoder, aesthetic-score conditioning): its layout is not written"
    if len(text_configs) != 2:
        return [f"{len(text_configs)} text encoder(s), " + (refiner if len(text_configs) == 1 else "SDXL has two")]
    pooled, per_number = text_configs[1].get("projection_dim"), unet_config.get("addition_time_embed_dim")
    numbers = (unet_config.get("projection_class_embeddings_input_dim", 0) - (pooled or 0)) / (per_number or 1)
    if numbers == SDXL_REFINER_TIME_NUMBERS:
        return [refiner]
    if numbers != SDXL_TIME_NUMBERS:
        return [
            f"UNet projection_class_embeddings_input_dim={unet_config.get('projection_class_embeddings_input_dim')!r}"
            f" (SDXL: text_encoder_2's projection_dim {pooled} + 6 x addition_time_embed_dim {per_number})"
        ]
    if (
        text_configs[0].get("hidden_act", "quick_gelu") != "quick_gelu"
        or text_configs[1].get("hidden_act") == "quick_gelu"
    ):
        return ["text encoders' activations (SDXL: CLIP ViT-L's quick_gelu, then OpenCLIP bigG's gelu)"]
    return []


def single_file_layout(unet_config, vae_config, text_configs):
    """The layout, "sd1" (CLIP ViT-L text encoder), "sd2" (OpenCLIP) or "sdxl" (SDXL base: both, and the added size
    embedding), of models the original Stable Diffusion code defines; a ValueError naming what differs otherwise (an
    SDXL refiner, LCM, upscaler or unCLIP UNet, another VAE or text encoder), since no UI would load a file with an
    invented layout. text_configs: the pipeline's text encoder configs, in order."""
    problems = []
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    layers = unet_config.get("layers_per_block")
    if not isinstance(layers, int):
        problems.append(f"UNet layers_per_block {layers!r} (one number in SD)")
    for key in ["addition_embed_type", "class_embed_type", "encoder_hid_dim", "time_cond_proj_dim"]:
        if unet_config.get(key) is not None and not (sdxl and key == "addition_embed_type"):
            problems.append(f"UNet {key}={unet_config[key]!r} (SD has none, SDXL only addition_embed_type='text_time')")
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"UNet mid_block_type {unet_config['mid_block_type']!r}")
    # SDXL stacks several transformer layers per attention block; the names inside stay those of SD's one.
    if not sdxl and unet_config.get("transformer_layers_per_block", 1) != 1:
        problems.append(f"UNet transformer_layers_per_block {unet_config['transformer_layers_per_block']!r}")
    down, up = list(unet_config.get("down_block_types", [])), list(unet_config.get("up_block_types", []))
    if any(kind not in SD_DOWN_BLOCKS for kind in down) or any(kind not in SD_UP_BLOCKS for kind in up):
        problems.append(f"UNet blocks {down} / {up} (SD has only {SD_DOWN_BLOCKS} / {SD_UP_BLOCKS})")
    elif [kind.startswith("CrossAttn") for kind in down] != [kind.startswith("CrossAttn") for kind in reversed(up)]:
        problems.append(f"UNet up blocks {up} do not mirror the down blocks {down}")
    vae_blocks = set(vae_config.get("down_block_types", [])) | set(vae_config.get("up_block_types", []))
    if vae_blocks != {"DownEncoderBlock2D", "UpDecoderBlock2D"} or not vae_config.get("mid_block_add_attention", True):
        problems.append(f"VAE blocks {sorted(vae_blocks)}")
    for name, text_config in zip(TEXT_ENCODERS, text_configs, strict=False):
        if text_config.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
            problems.append(f"{name} model_type {text_config.get('model_type')!r} (SD uses CLIP)")
    if sdxl:
        problems += sdxl_problems(unet_config, text_configs)
    elif len(text_configs) != 1:
        problems.append(f"{len(text_configs)} text encoders without SDXL's added embedding (SD 1.x / 2.x have one)")
    if problems:
        raise UserError(
            "--save_single_file: no original Stable Diffusion single-file layout for this model: " + "; ".join(problems)
        )
    if sdxl:
        return "sdxl"
    # The one architectural difference between the two text encoders: OpenCLIP ViT-H uses GELU, OpenAI's CLIP ViT-L
    # its "quick" approximation.
    return "sd1" if text_configs[0].get("hidden_act", "quick_gelu") == "quick_gelu" else "sd2"


def ldm_unet_prefixes(unet_config):
    """(diffusers prefix, original prefix, renames inside) for every block of an SD UNet. The original numbers its
    input blocks and output blocks in one running sequence each: conv_in, then per level its ResNet(+attention)
    layers and its downsampler; per up level, layers+1 ResNet(+attention) layers, the last with the upsampler."""
    layers = unet_config["layers_per_block"]
    prefixes = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        # SDXL's added embedding (pooled text and size numbers), a Sequential(Sequential(Linear, SiLU, Linear)) there.
        ("add_embedding.linear_1.", "label_emb.0.0.", {}),
        ("add_embedding.linear_2.", "label_emb.0.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", LDM_RESNET_NAMES),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", LDM_RESNET_NAMES),
    ]
    for level in range(len(unet_config["down_block_types"])):
        for layer in range(layers):
            index = 1 + level * (layers + 1) + layer
            prefixes.append((f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{index}.0.", LDM_RESNET_NAMES))
            prefixes.append((f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{index}.1.", {}))
        index = (level + 1) * (layers + 1)
        prefixes.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", {}))
    for level, kind in enumerate(unet_config["up_block_types"]):
        for layer in range(layers + 1):
            index = level * (layers + 1) + layer
            prefixes.append((f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{index}.0.", LDM_RESNET_NAMES))
            prefixes.append((f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{index}.1.", {}))
        # The upsampler follows the ResNet, and the attention where the level has one.
        position = 2 if kind.startswith("CrossAttn") else 1
        index = (level + 1) * (layers + 1) - 1
        prefixes.append((f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{index}.{position}.", {}))
    return prefixes


def ldm_vae_prefixes(vae_config):
    """(diffusers prefix, original prefix, renames inside) for every block of the SD VAE. The original numbers the
    decoder's levels from the bottom (the encoder's order), diffusers from the top."""
    levels, layers = len(vae_config["block_out_channels"]), vae_config["layers_per_block"]
    prefixes = [(name, name, {}) for name in ["encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in."]]
    prefixes += [(name, name, {}) for name in ["decoder.conv_out.", "quant_conv.", "post_quant_conv."]]
    for part in ["encoder", "decoder"]:
        prefixes += [
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", LDM_VAE_RESNET_NAMES),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", LDM_VAE_ATTENTION_NAMES),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", LDM_VAE_RESNET_NAMES),
        ]
    for level in range(levels):
        for layer in range(layers):
            prefixes.append(
                (
                    f"encoder.down_blocks.{level}.resnets.{layer}.",
                    f"encoder.down.{level}.block.{layer}.",
                    LDM_VAE_RESNET_NAMES,
                )
            )
        prefixes.append((f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample.", {}))
        up = levels - 1 - level
        for layer in range(layers + 1):
            prefixes.append(
                (f"decoder.up_blocks.{level}.resnets.{layer}.", f"decoder.up.{up}.block.{layer}.", LDM_VAE_RESNET_NAMES)
            )
        prefixes.append((f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{up}.upsample.", {}))
    return prefixes


def rename_by_prefix(state, prefixes, what):
    """state with every key's prefix replaced by its original one (longest prefix wins) and the name inside the
    block renamed; a key no prefix covers is an error, so a layout change never silently drops a weight."""
    ordered = sorted(prefixes, key=lambda entry: -len(entry[0]))
    renamed = {}
    for key, tensor in state.items():
        match = next((entry for entry in ordered if key.startswith(entry[0])), None)
        if match is None:
            raise ValueError(f"{what} weight {key} has no name in the original Stable Diffusion layout")
        old, new, inner = match
        rest = key[len(old) :]
        for name, original in inner.items():
            if rest.startswith(name + "."):
                rest = original + rest[len(name) :]
                break
        renamed[new + rest] = tensor
    return renamed


def open_clip_state(state):
    """transformers CLIP text-model weights in OpenCLIP's names (SD 2.x, SDXL's second encoder). OpenCLIP keeps the
    query, key and value projections in one in_proj matrix, stacked in that order, and its text projection as the
    matrix the pooled state is multiplied by on the right: the transpose of transformers' linear weight."""
    converted = {}
    for key, tensor in state.items():
        name = key.removeprefix("text_model.")
        if name.startswith("encoder.layers."):
            index, layer_name = name.removeprefix("encoder.layers.").split(".", 1)
            prefix = f"transformer.resblocks.{index}."
            if layer_name.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                if layer_name.startswith("self_attn.q_proj."):
                    kind = layer_name.rsplit(".", 1)[1]
                    parts = [state[f"text_model.encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    converted[prefix + f"attn.in_proj_{kind}"] = np.concatenate(parts)
                continue
            for old, new in OPEN_CLIP_LAYER_NAMES.items():
                if layer_name.startswith(old + "."):
                    layer_name = new + layer_name[len(old) :]
                    break
            else:
                raise ValueError(f"text encoder weight {key} has no name in the OpenCLIP layout")
            converted[prefix + layer_name] = tensor
        elif name == "embeddings.token_embedding.weight":
            converted["token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            converted["positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            converted["ln_final." + name.removeprefix("final_layer_norm.")] = tensor
        elif name == "text_projection.weight":
            converted["text_projection"] = np.ascontiguousarray(tensor.T)
        elif name != "embeddings.position_ids":
            raise ValueError(f"text encoder weight {key} has no name in the OpenCLIP layout")
    return converted


def component_configs(pipeline_dir):
    """The UNet and VAE configs of a pipeline folder, and its text encoders' configs in order."""

    def config(name):
        with open(os.path.join(pipeline_dir, name, "config.json")) as f:
            return json.load(f)

    text_configs = [
        config(name) for name in TEXT_ENCODERS if os.path.exists(os.path.join(pipeline_dir, name, "config.json"))
    ]
    return config("unet"), config("vae"), text_configs


def read_safetensors(path):
    """The tensors of one .safetensors file as NumPy arrays (bfloat16 widened to float32), each read on its own, so
    the file is never held twice."""
    state = {}
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: weight {key} has dtype {entry['dtype']}, not one a pipeline is saved in")
            dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
            start, end = entry["data_offsets"]
            f.seek(8 + header_size + start)
            array = np.fromfile(f, dtype=dtype, count=(end - start) // dtype.itemsize).reshape(entry["shape"])
            state[key] = bfloat16_to_float32(array) if entry["dtype"] == "BF16" else array
    return state


def read_component_weights(folder):
    """A diffusers/transformers component's weights, from its one safetensors file or its shards."""
    names = [name for name in sorted(os.listdir(folder)) if name.endswith(".safetensors")]
    if not names:
        raise ValueError(f"{folder} has no .safetensors weights to write into the single file")
    state = {}
    for name in names:
        state.update(read_safetensors(os.path.join(folder, name)))
    return state


def text_encoder_state(folder, prefix):
    """A text encoder's weights in the original layout under `prefix`: transformers' CLIP names for a ".transformer."
    prefix, OpenCLIP's for a ".model." one."""
    text = {}
    for key, tensor in read_component_weights(folder).items():
        # transformers 5 may save without the "text_model." prefix that the original layout keeps.
        text[key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key] = tensor
    if prefix.endswith(".model."):
        text = open_clip_state(text)
    else:
        text = {key: tensor for key, tensor in text.items() if not key.endswith("position_ids")}
    return {prefix + key: tensor for key, tensor in text.items()}


def original_layout_state(pipeline_dir):
    """(layout, state) of a saved diffusers pipeline, in the original Stable Diffusion keys that A1111/Forge,
    ComfyUI and InvokeAI load: model.diffusion_model.* (UNet), first_stage_model.* (VAE) and the text encoders where
    TEXT_ENCODER_PREFIXES puts them (cond_stage_model.* for SD 1.x / 2.x, conditioner.embedders.0/1.* for SDXL)."""
    unet_config, vae_config, text_configs = component_configs(pipeline_dir)
    layout = single_file_layout(unet_config, vae_config, text_configs)
    unet = rename_by_prefix(
        read_component_weights(os.path.join(pipeline_dir, "unet")), ldm_unet_prefixes(unet_config), "UNet"
    )
    vae = rename_by_prefix(
        read_component_weights(os.path.join(pipeline_dir, "vae")), ldm_vae_prefixes(vae_config), "VAE"
    )
    # The original VAE's attention projections are 1x1 convolutions, diffusers' are linear layers: same numbers.
    for key, tensor in vae.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            vae[key] = tensor.reshape(*tensor.shape, 1, 1)
    state = {"model.diffusion_model." + key: tensor for key, tensor in unet.items()}
    state.update({"first_stage_model." + key: tensor for key, tensor in vae.items()})
    for name, prefix in zip(TEXT_ENCODERS, TEXT_ENCODER_PREFIXES[layout], strict=False):
        state.update(text_encoder_state(os.path.join(pipeline_dir, name), prefix))
    return layout, state


def write_single_file(state, path, dtype, metadata):
    """state as one .safetensors file in `dtype` ("fp16", "bf16" or "fp32"), with `metadata` in its header; written
    beside `path` and renamed over it, so it appears only when complete. Converts state in place: each read tensor is
    freed as its converted copy replaces it, so the process never holds the model twice (an fp32 SDXL is ~7 GB)."""
    for key, tensor in state.items():
        if dtype == "bf16":
            state[key] = float32_to_bfloat16(tensor)
        else:
            with np.errstate(over="ignore"):  # a weight beyond fp16's range becomes inf, silently, as in torch
                state[key] = np.ascontiguousarray(tensor, dtype=np.float16 if dtype == "fp16" else np.float32)
    # The dtype names torch's writer gives safetensors, so the header is the one torch would write.
    name = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]
    specs = {
        key: safetensors.TensorSpec(dtype=name, shape=array.shape, data_ptr=array.ctypes.data, data_len=array.nbytes)
        for key, array in state.items()
    }
    partial = path + ".partial"
    try:
        safetensors.serialize_file(specs, partial, metadata={"format": "pt", **metadata})
        flush_file(partial)
        os.replace(partial, path)
    except OSError as err:
        if os.path.exists(partial):
            os.remove(partial)
        raise WriteFailure(write_failure("the single-file checkpoint", os.path.dirname(path), err)) from err
    fsync_folder(os.path.dirname(path))


def single_file_metadata(layout, prediction_type, zero_terminal_snr, resolution, base_model, global_step, title):
    """The SAI model spec header (github.com/Stability-AI/ModelSpec) that UIs read to tell SD 1.x, SD 2.x-512,
    SD 2.x-768-v and SDXL base apart, plus how the model was trained."""
    v_prediction = prediction_type == "v_prediction"
    if layout == "sd1":
        architecture, implementation = "stable-diffusion-v1", "https://github.com/CompVis/stable-diffusion"
    elif layout == "sdxl":
        architecture, implementation = (
            "stable-diffusion-xl-v1-base",
            "https://github.com/Stability-AI/generative-models",
        )
    else:
        architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        implementation = "https://github.com/Stability-AI/stablediffusion"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "training.base_model": base_model,
        "training.global_step": str(global_step),
        "training.prediction_type": prediction_type,
        "training.zero_terminal_snr": str(bool(zero_terminal_snr)).lower(),
    }


@dataclasses.dataclass(frozen=True)
class SingleFileConfig:
    """Where and in what precision --save_single_file writes, and what the file records of the training."""

    output_dir: str
    dtype: str  # --single_file_dtype
    zero_terminal_snr: bool  # --rescale_betas_zero_snr
    resolution: int
    base_model: str  # --pretrained_model_name_or_path

    @classmethod
    def from_args(cls, args):
        return cls(
            args.output_dir,
            args.single_file_dtype,
            args.rescale_betas_zero_snr,
            args.resolution,
            args.pretrained_model_name_or_path,
        )


def save_single_file(config, prediction_type, global_step):
    """config.output_dir/<its name>.safetensors in config.dtype, from the pipeline just saved there."""
    title = os.path.basename(os.path.abspath(config.output_dir))
    path = os.path.join(config.output_dir, title + ".safetensors")
    layout, state = original_layout_state(config.output_dir)
    metadata = single_file_metadata(
        layout, prediction_type, config.zero_terminal_snr, config.resolution, config.base_model, global_step, title
    )
    write_single_file(state, path, config.dtype, metadata)
    logger.info(f"Saved the single-file checkpoint ({layout}, {config.dtype}) to {os.path.abspath(path)}")

"""LoRA (Hu et al. 2021, arXiv:2106.09685): what the LoRA flags mean and the two files a LoRA run writes, without a
framework, so that the PyTorch script (peft) and its Flax twin (an A/B pytree) train and save the same thing.

A LoRA module adds (alpha / rank) * B @ A to a frozen weight W (out x in), with A of shape (rank, in) and B of shape
(out, rank); B starts at zero, so training starts from the base model.

The files, in --output_dir:
- `pytorch_lora_weights.safetensors` (DIFFUSERS_LORA_FILE): diffusers' layout, the one `pipe.load_lora_weights(dir)`
  reads: `unet.<module>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.` / `text_encoder_2.`), with the
  adapter's rank, alpha and modules in the file's metadata, so a loader applies alpha / rank, not 1.
- `<output_dir's name>.safetensors` (ui_lora_path): the kohya layout that AUTOMATIC1111/Forge, ComfyUI and InvokeAI
  load: `lora_unet_<module, dots as underscores>.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` (the real
  alpha: the loaders scale by alpha / rank), text encoders as `lora_te_` (SD) or `lora_te1_` / `lora_te2_` (SDXL).
  The UNet keeps diffusers' module names (`down_blocks_1_attentions_0_...`), which all three map for SD and SDXL.
"""

import dataclasses
import json
import logging
import os

import numpy as np
import safetensors.numpy

from sdtrain.cli import WriteFailure
from sdtrain.run_folder import flush_file, fsync_folder, write_failure

logger = logging.getLogger(__name__)

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"

# The UNet's linear layers a LoRA may adapt, by diffusers module name: the attention projections of every
# Transformer2DModel block (self- and cross-attention) and its feed-forward layers. Convolutions (SD 1.x's 1x1
# proj_in / proj_out, the ResNet blocks) are left out: not every loader maps a convolutional LoRA.
UNET_LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
DEFAULT_LORA_LAYERS = "to_k,to_q,to_v,to_out.0"  # diffusers' LoRA scripts' choice: the attention projections
# The CLIP text encoders' attention projections: what diffusers' scripts adapt with --train_text_encoder.
TEXT_ENCODER_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_lora_arguments(group):
    group.add_argument(
        "--rank",
        type=int,
        default=None,
        help="Train a LoRA of this rank (4-128 is usual) instead of fine-tuning the whole UNet (default: no LoRA).",
    )
    group.add_argument(
        "--lora_alpha",
        type=float,
        default=None,
        help="LoRA alpha: the update is scaled by alpha / rank (default: the rank, a scale of 1).",
    )
    group.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch's input.")
    group.add_argument(
        "--lora_layers",
        type=str,
        default=DEFAULT_LORA_LAYERS,
        help=f"Comma-separated UNet modules to adapt, from: {', '.join(UNET_LORA_MODULES)}.",
    )
    group.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="With --rank: also train a LoRA in the text encoder(s) (both for SDXL): "
        + ", ".join(TEXT_ENCODER_LORA_MODULES)
        + ".",
    )


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float
    unet_modules: tuple  # names from UNET_LORA_MODULES
    train_text_encoder: bool

    @property
    def scale(self):
        return self.alpha / self.rank

    @classmethod
    def from_args(cls, args):
        """The run's LoRA, or None for a full fine-tune (no --rank)."""
        if args.rank is None:
            return None
        return cls(
            rank=args.rank,
            alpha=float(args.rank if args.lora_alpha is None else args.lora_alpha),
            dropout=args.lora_dropout,
            unet_modules=tuple(name.strip() for name in args.lora_layers.split(",") if name.strip()),
            train_text_encoder=args.train_text_encoder,
        )


def lora_identity(config):
    """What a checkpoint records of its run's LoRA, and what a run resuming it must match (run_folder's identity check):
    None for the whole UNet, else the flags that give the adapter's shape and scale."""
    if config is None:
        return None
    return {
        "rank": config.rank,
        "lora_alpha": config.alpha,
        "lora_layers": ",".join(sorted(config.unet_modules)),
        "train_text_encoder": config.train_text_encoder,
    }


def lora_problem(args):
    """What is wrong with the LoRA flags, in a sentence naming the flag, or None. Checked in parse_args, before any
    model loads."""
    if args.rank is None:
        for flag, value, default in [
            ("--lora_alpha", args.lora_alpha, None),
            ("--lora_dropout", args.lora_dropout, 0.0),
            ("--lora_layers", args.lora_layers, DEFAULT_LORA_LAYERS),
            ("--train_text_encoder", args.train_text_encoder, False),
        ]:
            if value != default:
                return f"{flag} sets up a LoRA: give --rank too (without it the whole UNet is fine-tuned)"
        return None
    if args.rank < 1:
        return f"--rank must be 1 or more (got {args.rank})"
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        return f"--lora_alpha must be positive (got {args.lora_alpha})"
    if not 0 <= args.lora_dropout < 1:
        return f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})"
    names = [name.strip() for name in args.lora_layers.split(",") if name.strip()]
    if not names:
        return "--lora_layers names no module"
    for name in names:
        if name not in UNET_LORA_MODULES:
            known = ", ".join(UNET_LORA_MODULES)
            return f"--lora_layers: unknown module {name!r}; the UNet modules a LoRA adapts are {known}"
    if len(set(names)) != len(names):
        return f"--lora_layers names a module twice: {args.lora_layers}"
    if args.save_single_file:
        return "--save_single_file writes a whole model; a LoRA run always writes <output_dir name>.safetensors (UIs)"
    if args.train_text_encoder and args.cache_text_embeddings:
        return "--cache_text_embeddings with --train_text_encoder: the text encoders train, so their outputs change"
    return None


# ---------------------------------------------------------------------------------------------------- the files
def ui_lora_path(output_dir):
    """The UIs' file: named after the output folder, as the UIs list a LoRA by its file name."""
    output_dir = os.path.abspath(output_dir)
    return os.path.join(output_dir, os.path.basename(output_dir) + ".safetensors")


def diffusers_key(component, module, matrix):
    """The key of one LoRA matrix ("A" or "B") in DIFFUSERS_LORA_FILE: component is the pipeline's component name
    (unet, text_encoder, text_encoder_2) and module the adapted module's name within it.

    A text encoder's module is keyed under `text_model.`, the name CLIP's modules have in transformers 4 and Flax, and
    the one ComfyUI and A1111 map (lora_te_text_model_encoder_layers_*): transformers 5's CLIPTextModel dropped that
    level (its CLIPTextModelWithProjection keeps it), and diffusers' load_lora_weights reads the key either way."""
    if component != "unet" and not module.startswith("text_model."):
        module = "text_model." + module
    return f"{component}.{module}.lora_{matrix}.weight"


def adapter_metadata(config, component):
    """What diffusers' save_lora_weights records for one component's adapter (peft's LoraConfig fields), which
    load_lora_weights reads back to scale by alpha / rank. The empty rank and alpha patterns are there because diffusers
    before 0.40 reads rank_pattern whenever the file has metadata."""
    modules = config.unet_modules if component == "unet" else TEXT_ENCODER_LORA_MODULES
    return {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "target_modules": sorted(modules),
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def kohya_prefixes(text_encoders):
    """The kohya key prefix of each component: the UNet's, and the text encoders' (one: lora_te_; two: lora_te1_,
    lora_te2_), from the family's text encoder component names."""
    prefixes = {"unet": "lora_unet_"}
    if len(text_encoders) == 1:
        prefixes[text_encoders[0]] = "lora_te_"
    else:
        prefixes.update({name: f"lora_te{index}_" for index, name in enumerate(text_encoders, 1)})
    return prefixes


def kohya_state(adapter_state, alpha, text_encoders):
    """DIFFUSERS_LORA_FILE's tensors (NumPy arrays, by diffusers_key) in the kohya layout, with one `.alpha` per
    module holding the run's alpha."""
    prefixes = kohya_prefixes(text_encoders)
    state = {}
    for key, array in adapter_state.items():
        component, rest = key.split(".", 1)
        module, matrix = rest.removesuffix(".weight").rsplit(".lora_", 1)
        if component not in prefixes or matrix not in ("A", "B"):
            raise ValueError(f"not a LoRA key of this family: {key}")
        name = prefixes[component] + module.replace(".", "_")
        state[f"{name}.lora_{'down' if matrix == 'A' else 'up'}.weight"] = array
        state[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32)
    return state


def kohya_metadata(base_model, config, title):
    """The training metadata kohya's scripts write and the UIs show (A1111's and ComfyUI's LoRA info): what the file
    is, its rank and alpha, the base model (kohya_base_model: "sd_v1", "sd_v2" or "sdxl_base_v1-0")."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_base_model_version": base_model,
        "ss_output_name": title,
        "ss_training_comment": "trained with sdtrain (train_text_to_image.py --rank)",
    }


def kohya_base_model(family, cross_attention_dim):
    """kohya's name for the base model (sdtrain.families.Family.kohya_base_models)."""
    return dict(family.kohya_base_models).get(cross_attention_dim, family.kohya_base_models[0][1])


def write_lora_files(output_dir, adapter_state, config, text_encoders, base_model):
    """Both files, from the adapter's tensors as float32 NumPy arrays keyed by diffusers_key. Each is written to a
    temporary name, flushed and renamed into place, so a crash leaves the earlier file or none, never half of one."""
    metadata = {"format": "pt"}
    components = sorted({key.split(".", 1)[0] for key in adapter_state})
    metadata["lora_adapter_metadata"] = json.dumps(
        {
            f"{component}.{field}": value
            for component in components
            for field, value in adapter_metadata(config, component).items()
        },
        sort_keys=True,
    )
    state = {key: np.ascontiguousarray(array, dtype=np.float32) for key, array in adapter_state.items()}
    ui_path = ui_lora_path(output_dir)
    title = os.path.splitext(os.path.basename(ui_path))[0]
    files = [
        (os.path.join(output_dir, DIFFUSERS_LORA_FILE), state, metadata),
        (
            ui_path,
            kohya_state(state, config.alpha, text_encoders),
            {"format": "pt", **kohya_metadata(base_model, config, title)},
        ),
    ]
    for path, tensors, file_metadata in files:
        partial = path + ".partial"
        try:
            safetensors.numpy.save_file(tensors, partial, metadata=file_metadata)
            flush_file(partial)
            os.replace(partial, path)
        except OSError as err:
            if os.path.exists(partial):
                os.remove(partial)
            raise WriteFailure(write_failure(f"the LoRA file {os.path.basename(path)}", output_dir, err)) from err
    fsync_folder(output_dir)
    size = sum(array.nbytes for array in state.values()) / 2**20
    return size


def save_lora(output_dir, adapter_state, config, family, cross_attention_dim):
    """A LoRA run's final save, in both frameworks: write_lora_files for the family (its text encoders, its kohya base
    model name) from the adapter's tensors (float32 NumPy arrays by diffusers_key), and say where they went."""
    base_model = kohya_base_model(family, cross_attention_dim)
    size = write_lora_files(output_dir, adapter_state, config, family.text_encoders, base_model)
    logger.info(
        f"Saved the LoRA ({size:.2f} MiB) to {os.path.abspath(output_dir)}: {DIFFUSERS_LORA_FILE} for diffusers, "
        f"{os.path.basename(ui_lora_path(output_dir))} for the UIs"
    )

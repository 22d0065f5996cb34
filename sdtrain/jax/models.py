"""The Flax models and schedulers of a PyTorch diffusers pipeline folder: where the folder is (a hub repository's
needed files), each component loaded from its safetensors weights with an error that names it, block
rematerialisation, and the training and sampling schedulers."""

import inspect
import json
import logging
import os

import diffusers
import diffusers.models.unets.unet_2d_condition_flax as unet_module
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.torch
from diffusers import FlaxDDPMScheduler
from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax as diffusers_to_flax
from huggingface_hub import snapshot_download
from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection
from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax as transformers_to_flax

from sdtrain.cli import UserError
from sdtrain.families import component_problem

logger = logging.getLogger(__name__)


def resolve_pipeline_folder(name_or_path, revision=None, variant=None, cache_dir=None):
    """A local folder holding the pipeline: the path itself, or the needed files of a hub repository (configs,
    tokenizer and the safetensors weights of the chosen variant; nothing else is downloaded)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    suffix = f".{variant}" if variant else ""
    return snapshot_download(
        name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        allow_patterns=[
            "model_index.json",
            "scheduler/*",
            "tokenizer/*",
            "tokenizer_2/*",  # SDXL's second tokenizer and text encoder
            "*/config.json",
            f"text_encoder/model{suffix}.safetensors",
            f"text_encoder_2/model{suffix}.safetensors",
            f"unet/diffusion_pytorch_model{suffix}.safetensors",
            f"vae/diffusion_pytorch_model{suffix}.safetensors",
        ],
    )


def resolve_vae_folder(pipeline_folder, vae_name_or_path=None, cache_dir=None):
    """(folder, subfolder) of the VAE to train with and save: the pipeline's, or vae_name_or_path
    (--pretrained_vae_model_name_or_path: a local VAE folder, or the config and safetensors weights of a hub
    repository)."""
    if not vae_name_or_path:
        return pipeline_folder, "vae"
    if os.path.isdir(vae_name_or_path):
        return vae_name_or_path, ""
    allow_patterns = ["config.json", "diffusion_pytorch_model*.safetensors"]
    return snapshot_download(vae_name_or_path, cache_dir=cache_dir, allow_patterns=allow_patterns), ""


def component_name(folder, subfolder):
    return f"{folder}: its {subfolder}" if subfolder else f"the model {folder}"


def read_flax_config(read, folder, subfolder):
    """read(folder, subfolder=subfolder), the component's config; a UserError naming the component and what it lacks
    when there is none (diffusers' and transformers' errors name the pipeline, not the component; transformers'
    CLIPTextConfig even reads a missing subfolder as its default config)."""
    problem = component_problem(folder, subfolder) if subfolder and os.path.isdir(folder) else None
    if problem:
        raise UserError(f"{component_name(folder, subfolder)} cannot be loaded: {problem}")
    try:
        return read(folder, subfolder=subfolder)
    except (OSError, ValueError) as err:
        problem = component_problem(folder, subfolder) if subfolder and os.path.isdir(folder) else None
        detail = problem or f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        raise UserError(f"{component_name(folder, subfolder)} cannot be loaded: {detail}") from err


def missing_weights(folder, subfolder, name):
    where = os.path.join(folder, subfolder)
    return UserError(
        f"{component_name(folder, subfolder)} cannot be loaded: there is no {name} in {where} "
        "(the Flax scripts read PyTorch pipelines saved with safetensors weights)"
    )


def load_flax_model(cls, folder, subfolder, variant, dtype, **overrides):
    """A diffusers Flax model and its params from the PyTorch safetensors weights of a standard pipeline folder."""
    config = read_flax_config(cls.load_config, folder, subfolder)
    if cls.__name__ == "FlaxUNet2DConditionModel" and config.get("norm_num_groups", 32) != 32:
        # diffusers' Flax UNet always normalises over 32 groups: any other value would silently compute another model.
        raise UserError(
            f"{os.path.join(folder, subfolder)}: norm_num_groups={config['norm_num_groups']}, "
            "but the Flax UNet supports only 32"
        )
    model = cls.from_config(config, dtype=dtype, **overrides)
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    path = os.path.join(folder, subfolder, name)
    if not os.path.isfile(path):
        raise missing_weights(folder, subfolder, name)
    state = {k: v.float() for k, v in safetensors.torch.load_file(path).items()}

    class ShapesOnly:
        # The converter initialises random params only to learn their names and shapes; eval_shape gives both
        # without running the model (tens of seconds saved on CPU).
        def init_weights(self, rng):
            return jax.eval_shape(model.init_weights, rng)

    params = diffusers_to_flax(state, ShapesOnly())
    return model, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def load_flax_text_encoder(folder, variant, dtype, subfolder="text_encoder"):
    """transformers' Flax CLIP text model and its params from the PyTorch safetensors weights of a pipeline folder:
    FlaxCLIPTextModel, or for SDXL's text_encoder_2 (CLIPTextModelWithProjection in its config) the model whose first
    output is the projected pooled embedding, FlaxCLIPTextModelWithProjection."""
    config = read_flax_config(CLIPTextConfig.from_pretrained, folder, subfolder)
    with_projection = "CLIPTextModelWithProjection" in (config.architectures or [])
    cls = FlaxCLIPTextModelWithProjection if with_projection else FlaxCLIPTextModel
    model = cls(config, dtype=dtype, _do_init=False)
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    path = os.path.join(folder, subfolder, name)
    if not os.path.isfile(path):
        raise missing_weights(folder, subfolder, name)
    state = {k: v.float() for k, v in safetensors.torch.load_file(path).items()}
    if not any(k.startswith("text_model.") for k in state):  # transformers 5 drops the prefix when saving
        state = {"text_model." + k: v for k, v in state.items()}

    class ShapesOnly:  # what the converter reads of the model, without initialising random params
        base_model_prefix = model.base_model_prefix
        params = model.params_shape_tree

    params = transformers_to_flax(state, ShapesOnly())
    model._is_initialized = True
    model.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return model


def enable_block_rematerialisation():
    """Gradient checkpointing for the Flax UNet: wrap each of its block classes in nn.remat, so a block's activations
    are recomputed in the backward pass instead of stored. The model code is unchanged; only the names the UNet
    module looks its blocks up by are rebound, before the UNet is built."""
    for name in [
        "FlaxCrossAttnDownBlock2D",
        "FlaxDownBlock2D",
        "FlaxCrossAttnUpBlock2D",
        "FlaxUpBlock2D",
        "FlaxUNetMidBlock2DCrossAttn",
    ]:
        block = getattr(unet_module, name)
        if not getattr(block, "_rematerialised", False):
            wrapped = nn.remat(block)
            wrapped._rematerialised = True
            setattr(unet_module, name, wrapped)


def rescale_zero_terminal_snr(betas):
    """Betas whose schedule ends at zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1): sqrt(alpha_bar) is
    shifted so its last value is 0 and scaled so its first value is unchanged. diffusers' FlaxDDPMScheduler has no
    such option, so the rescaled betas are handed to it as trained_betas."""
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def load_noise_scheduler(folder, rescale_betas_zero_snr=False):
    """The training noise scheduler and its state; with --rescale_betas_zero_snr, on the rescaled schedule."""
    noise_scheduler, scheduler_state = FlaxDDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(np.asarray(scheduler_state.common.betas))
        noise_scheduler = FlaxDDPMScheduler.from_config(noise_scheduler.config, trained_betas=betas.tolist())
        scheduler_state = noise_scheduler.create_state()
    return noise_scheduler, scheduler_state


def inference_scheduler_config(config, prediction_type=None, rescale_betas_zero_snr=False):
    """The saved scheduler's config for what this run trained: its prediction type (--prediction_type; None keeps the
    config's), and with --rescale_betas_zero_snr the rescaled schedule sampled from its last timestep ("trailing", Lin
    et al. 2023 sec. 3.3). A scheduler class that cannot rescale (PNDM, LMS) is replaced by DDIM, which the paper
    samples with."""
    config = dict(config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    if rescale_betas_zero_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if (
            "rescale_betas_zero_snr"
            not in inspect.signature(getattr(diffusers, config["_class_name"]).__init__).parameters
        ):
            logger.info(f"--rescale_betas_zero_snr: {config['_class_name']} cannot rescale, saving a DDIMScheduler")
            # Latents are not confined to [-1, 1]: DDIM's default clipping of its x0 estimate would distort them.
            config.update(_class_name="DDIMScheduler", clip_sample=False)
    return config


def load_validation_scheduler(folder, prediction_type=None, rescale_betas_zero_snr=False):
    """The Flax twin of the scheduler the saved pipeline samples with (inference_scheduler_config), its state, and
    whether it samples from the last timestep ("trailing", which Flax schedulers cannot set themselves)."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = inference_scheduler_config(json.load(f), prediction_type, rescale_betas_zero_snr)
    cls = getattr(diffusers, "Flax" + config["_class_name"], None)
    if cls is None:
        logger.info(f"Validation renders with FlaxDDIMScheduler: diffusers has no Flax {config['_class_name']}")
        cls = diffusers.FlaxDDIMScheduler
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    scheduler = cls.from_config(config)
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(np.asarray(scheduler.create_state().common.betas))
        scheduler = cls.from_config(config, trained_betas=betas.tolist())
    return scheduler, scheduler.create_state(), config.get("timestep_spacing") == "trailing"

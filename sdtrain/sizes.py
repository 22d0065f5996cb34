"""The image sizes a model can train and render at, checked before any weights load: --resolution,
--validation_resolution and --aspect_ratio_buckets against the VAE's scale factor and the UNet's downsampling, read
from the components' config.json. A size that cannot work (--resolution 50) used to train and then fail at the first
validation, with nothing saved. Framework-free."""

import json
import math
import os

from sdtrain.cli import UserError
from sdtrain.families import component_problem

# diffusers' Stable Diffusion pipelines refuse a height or width that is not a multiple of 8, whatever the VAE.
PIPELINE_MULTIPLE = 8


def read_component_config(source, subfolder, revision=None, cache_dir=None, flag="--pretrained_model_name_or_path"):
    """A component's config.json as a dict, alone (no weights): from a local folder, or downloaded from the hub."""
    if os.path.isdir(source):
        path = os.path.join(source, subfolder, "config.json")
        if not os.path.isfile(path):
            problem = component_problem(source, subfolder) if subfolder else None
            component = subfolder or "model"
            raise UserError(f"{flag} {source}: cannot read its {component}: {problem or f'there is no {path}'}")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(
                source, "config.json", subfolder=subfolder or None, revision=revision, cache_dir=cache_dir
            )
        except OSError as err:  # the hub's errors (no such repository, file or revision; offline) are OSErrors
            component = f"its {subfolder} config" if subfolder else "its config"
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"{flag} {source}: cannot read {component} from the Hub: {detail}") from err
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_size_configs(pipeline, vae=None, revision=None, cache_dir=None):
    """(VAE config, UNet config) of the pipeline, the VAE's from `vae` when given."""
    if vae:
        vae_config = read_component_config(vae, "", cache_dir=cache_dir, flag="--pretrained_vae_model_name_or_path")
    else:
        vae_config = read_component_config(pipeline, "vae", revision, cache_dir)
    return vae_config, read_component_config(pipeline, "unet", revision, cache_dir)


def size_factors(vae_config, unet_config):
    """(VAE scale factor, model factor): the VAE shrinks images by 2 per block after its first, and the UNet halves
    latents per down block after its first, so a latent side must be a multiple of the latter ratio for the up blocks
    to meet the skip connections exactly."""
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return vae_factor, vae_factor * 2 ** (len(unet_config["down_block_types"]) - 1)


def nearest_multiples(side, multiple):
    lower = side // multiple * multiple
    return [size for size in (lower, lower + multiple) if size > 0]


def named_sizes(resolution, validation_size, buckets):
    """(flag, value as typed, sides) of every size a run uses: images (--resolution, --validation_resolution as
    (height, width)) and buckets (--aspect_ratio_buckets)."""
    images = [("--resolution", str(resolution), [resolution])]
    if validation_size is not None:
        images.append(("--validation_resolution", "{},{}".format(*validation_size), list(validation_size)))
    return images, [("--aspect_ratio_buckets", "{},{}".format(*bucket), list(bucket)) for bucket in buckets or []]


def check_sizes(sizes, multiple, reason):
    """A UserError naming the flag, its value, the multiple it needs (`reason` says why) and the nearest valid sizes,
    for the first of `sizes` (see named_sizes) with a side that is not a multiple of `multiple`."""
    for flag, shown, sides in sizes:
        for side in sides:
            if side % multiple:
                nearest = " or ".join(str(size) for size in nearest_multiples(side, multiple))
                raise UserError(
                    f"{flag} {shown}: {side} is not a multiple of {multiple}, which {reason}; "
                    f"the nearest valid size is {nearest}"
                )


def check_model_sizes(pipeline, vae, revision, cache_dir, resolution, validation_size, buckets=None, whole_model=False):
    """check_sizes() of every size a run uses, for this model, from its configs (before any weights load). An image
    side must be a multiple of the VAE's scale factor (and of 8, the pipelines' rule) for the latents to match it;
    with whole_model (the Flax UNet, which cannot upsample to an odd-sized skip connection), and for every bucket, also
    of the UNet's downsampling."""
    vae_factor, model_factor = size_factors(*read_size_configs(pipeline, vae, revision, cache_dir))
    whole = f"this model needs (VAE scale factor {vae_factor} x UNet downsampling {model_factor // vae_factor})"
    images, buckets = named_sizes(resolution, validation_size, buckets)
    if whole_model:
        check_sizes(images, math.lcm(PIPELINE_MULTIPLE, model_factor), whole)
    else:
        reason = f"this model's VAE (scale factor {vae_factor}) and the diffusers pipelines need"
        check_sizes(images, math.lcm(PIPELINE_MULTIPLE, vae_factor), reason)
    check_sizes(buckets, math.lcm(PIPELINE_MULTIPLE, model_factor), whole)

"""The trained Flax UNet saved as the PyTorch diffusers pipeline users load: converted, the frozen components copied
byte for byte, and published atomically."""

import ast
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.models import modeling_pytorch_flax_utils
from diffusers.models.modeling_pytorch_flax_utils import load_flax_weights_in_pytorch_model

from sdtrain.cli import WriteFailure
from sdtrain.jax.models import inference_scheduler_config
from sdtrain.run_folder import publish_pipeline, write_failure

# diffusers' converter logs the PyTorch weights it did not set with this message.
NEWLY_INITIALIZED = re.compile(r"newly\s+initialized: (\[.*?\])", re.DOTALL)


class AddEmbeddingCopiedAfter(logging.Filter):
    """Drops the converter's "newly initialized" warning when it names only add_embedding weights, which
    pytorch_unet copies in itself; a warning naming any other weight is kept."""

    def filter(self, record):
        found = NEWLY_INITIALIZED.search(record.getMessage())
        return not (found and all(name.startswith("add_embedding.") for name in ast.literal_eval(found.group(1))))


def pytorch_unet(unet_params, folder):
    """The trained Flax UNet params as diffusers' PyTorch UNet2DConditionModel of the source's config. diffusers'
    converter renames every "_1" of a key to ".1" except under time_embedding, so SDXL's add_embedding.linear_1 and
    linear_2 would be left at random values (with a warning, silenced here): they are copied here (Dense kernels are
    transposed weights)."""
    params = dict(jax.tree_util.tree_map(np.array, jax.device_get(unet_params)))
    add_embedding = params.pop("add_embedding", None)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    converter_logger = logging.getLogger(modeling_pytorch_flax_utils.__name__)
    only_add_embedding = AddEmbeddingCopiedAfter()
    converter_logger.addFilter(only_add_embedding)
    try:
        unet = load_flax_weights_in_pytorch_model(unet, params)
    finally:
        converter_logger.removeFilter(only_add_embedding)
    if add_embedding is not None:
        with torch.no_grad():
            for name, dense in add_embedding.items():
                getattr(unet.add_embedding, name).weight.copy_(torch.from_numpy(dense["kernel"].T.copy()))
                getattr(unet.add_embedding, name).bias.copy_(torch.from_numpy(dense["bias"]))
    return unet


def save_pipeline(unet_params, folder, family, vae_folder, output_dir, prediction_type=None, zero_snr=False):
    """The full pipeline as PyTorch diffusers with safetensors weights in output_dir: the trained UNet converted from
    Flax, the frozen parts (the family's text encoders and tokenizers, the scheduler, and the VAE of vae_folder, a
    (folder, subfolder) pair) copied byte for byte. The scheduler says what the run trained (prediction_type,
    zero_snr: --rescale_betas_zero_snr). Written to a temporary folder first, so a crash never leaves a half-written
    model over a good one."""
    partial = os.path.join(output_dir, ".pipeline.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for component in ["scheduler", *family.tokenizers, *family.text_encoders]:
        shutil.copytree(os.path.join(folder, component), os.path.join(partial, component))
    shutil.copytree(os.path.join(*vae_folder), os.path.join(partial, "vae"))
    # The model now predicts this target on this schedule: the saved scheduler must say so, or inference silently
    # goes wrong.
    scheduler_config = os.path.join(partial, "scheduler", "scheduler_config.json")
    with open(scheduler_config) as f:
        config = inference_scheduler_config(json.load(f), prediction_type, zero_snr)
    with open(scheduler_config, "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "model_index.json")) as f:
        model_index = json.load(f)
    if "safety_checker" in model_index:
        # The source's safety checker is not downloaded (nothing the user did not name); the saved pipeline has none.
        model_index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    model_index["scheduler"] = ["diffusers", config["_class_name"]]  # the class pipelines load it as
    with open(os.path.join(partial, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=2)
    unet = pytorch_unet(unet_params, folder)
    try:
        unet.to(torch.float32).save_pretrained(os.path.join(partial, "unet"), safe_serialization=True)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise WriteFailure(write_failure("the pipeline", output_dir, err)) from err
    publish_pipeline(partial, output_dir)

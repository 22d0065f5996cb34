"""Loading a pipeline's components, each failure naming the component and the path, its family from
model_index.json, and the scheduler a saved or rendering pipeline samples with."""

import dataclasses
import inspect
import logging
import os

from diffusers import DDIMScheduler, DiffusionPipeline

from sdtrain.cli import UserError
from sdtrain.families import component_problem, folder_family, pipeline_family

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a pipeline's components come from: a hub id or local folder at a revision, and the flag that named it
    (errors point the user to it)."""

    path: str
    revision: str | None = None
    cache_dir: str | None = None
    flag: str = "--pretrained_model_name_or_path"

    @classmethod
    def from_args(cls, args):
        return cls(args.pretrained_model_name_or_path, args.revision, args.cache_dir)


def model_family(source):
    """The source pipeline's Family (sdtrain.families), from its model_index.json, read before any weights; a UserError
    naming any other family."""
    path = source.path
    if os.path.isdir(path):
        return folder_family(path, f"{source.flag} {path}")
    model_index = DiffusionPipeline.load_config(path, revision=source.revision, cache_dir=source.cache_dir)
    return pipeline_family(model_index, f"{source.flag} {path}")


def load_component(cls, source, subfolder, **kwargs):
    """One part of the source pipeline, at its revision unless kwargs name another."""
    kwargs = {"revision": source.revision, "cache_dir": source.cache_dir, **kwargs}
    return load_model(cls, source.path, subfolder, source.flag, **kwargs)


def load_model(cls, path, subfolder, flag, **kwargs):
    """cls.from_pretrained(path, subfolder=subfolder). diffusers' and transformers' errors name the pipeline, not
    the component: a UserError names the flag, the component and, for a local folder, what it lacks."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder or None, **kwargs)
    except (OSError, ValueError) as err:
        problem = None
        if os.path.isdir(path):
            weight_names = ()
            if hasattr(cls, "state_dict"):  # a model (not a tokenizer or a scheduler): it has weights to find
                diffusers_model = cls.__module__.startswith("diffusers")
                stem = "diffusion_pytorch_model" if diffusers_model else "model"
                weight_names = (
                    f"{stem}.safetensors",
                    "diffusion_pytorch_model.bin" if diffusers_model else "pytorch_model.bin",
                )
            problem = component_problem(path, subfolder, weight_names, kwargs.get("variant"))
        component = f"its {subfolder}" if subfolder else "the model"
        detail = problem or f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise UserError(f"{flag} {path}: cannot load {component} ({cls.__name__}): {detail}") from err


def inference_scheduler(scheduler, prediction_type, rescale_betas_zero_snr):
    """The pipeline's scheduler set up for what this run trained: its prediction type (None: the scheduler's own),
    and with rescale_betas_zero_snr the rescaled schedule sampled from its last timestep ("trailing", Lin et al. 2023
    sec. 3.3). A scheduler class that cannot rescale (PNDM, LMS) is replaced by DDIM, which the paper samples with."""
    overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
    if not rescale_betas_zero_snr:
        return scheduler.from_config(scheduler.config, **overrides) if overrides else scheduler
    overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if "rescale_betas_zero_snr" in inspect.signature(type(scheduler).__init__).parameters:
        return type(scheduler).from_config(scheduler.config, **overrides)
    logger.info(f"--rescale_betas_zero_snr: {type(scheduler).__name__} cannot rescale, saving a DDIMScheduler")
    # Latents are not confined to [-1, 1]: DDIM's default clipping of its x0 estimate would distort them.
    return DDIMScheduler.from_config(scheduler.config, **overrides, clip_sample=False)

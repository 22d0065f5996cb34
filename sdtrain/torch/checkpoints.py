"""Checkpoints through Accelerate, written crash-safely and resumed from; the finiteness check before anything is
written; the rescue checkpoint when the final save fails."""

import functools
import logging
import os
import shutil

import torch
from accelerate.utils import DistributedType
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from sdtrain.cli import UserError, WriteFailure
from sdtrain.run_folder import (
    check_resume_identity,
    final_save_error,
    list_checkpoints,
    publish_checkpoint,
    refuse_diverged,
    warn_if_batch_layout_changed,
    write_checkpoint_metadata,
    write_failure,
)

logger = logging.getLogger(__name__)


def check_finite(named_tensors, loss, what, global_step):
    """Before anything is written: every tensor about to be written is finite, and so is the loss the new weights
    give on the last batch (weights can stay finite while a model's outputs do not). Otherwise stop, naming the step
    and the tensors; only then is anything written, so no file ever holds a diverged model."""
    bad = [name for name, tensor in named_tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    refuse_diverged(bad, loss, what, global_step)


def optimizer_tensors(optimizer):
    """The optimizer's state tensors, named by parameter index and key."""
    for index, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if torch.is_tensor(value):
                yield f"optimizer state {index}.{key}", value


def save_checkpoint(accelerator, output_dir, global_step, run_metadata, total_limit=None):
    """Write checkpoint-N crash-safely: into a hidden temporary folder, flushed to disk, then renamed into place (a
    checkpoint is visible only when complete); then keep the newest `total_limit` (--checkpoints_total_limit).
    Called by every process. Under DeepSpeed and FSDP, save_state is collective (each rank writes its own shards into
    the folder, which must be shared by all machines) and the checkpoint is published only if every rank succeeded;
    otherwise the main process writes it alone."""
    collective = accelerator.state.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if not (accelerator.is_main_process or collective):
        return
    final_path = os.path.join(output_dir, f"checkpoint-{global_step}")
    partial_path = os.path.join(output_dir, f".checkpoint-{global_step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial_path, ignore_errors=True)
    failure = None
    if collective:
        accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial_path)
        if accelerator.is_main_process:
            write_checkpoint_metadata(partial_path, {**run_metadata, "global_step": global_step})
    except (OSError, RuntimeError) as err:
        failure = err
    if collective:
        failed = torch.tensor(float(failure is not None), device=accelerator.device)
        if accelerator.reduce(failed, reduction="sum").item() and failure is None:
            failure = RuntimeError("another process could not write its part")
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(partial_path, ignore_errors=True)
        raise WriteFailure(write_failure(f"checkpoint-{global_step}", output_dir, failure)) from failure
    if accelerator.is_main_process:
        publish_checkpoint(partial_path, final_path)
        logger.info(f"Saved {final_path} ({folder_size_mib(final_path):.2f} MiB)")
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                logger.info(f"Deleting {path} (--checkpoints_total_limit {total_limit})")
                shutil.rmtree(path)
    if collective:
        accelerator.wait_for_everyone()


def final_save_failed(accelerator, output_dir, global_step, run_metadata, err):
    """final_save_error for the PyTorch scripts: checkpoint-<final step> through Accelerate. Main process only; the
    model must hold the trained weights, as in every checkpoint (EMA weights restored)."""
    if accelerator.state.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        # Their checkpoints are written by every process together, and the others are past this point.
        return final_save_error(output_dir, global_step, err, None, "DeepSpeed and FSDP write it with every process")
    write = functools.partial(save_checkpoint, accelerator, output_dir, global_step, run_metadata)
    return final_save_error(output_dir, global_step, err, write)


def resume(accelerator, resume_path, resume_metadata, run_identity, run_metadata):
    """The global step to start from: 0 without a checkpoint (resume_path None), else the checkpoint's, after loading
    it through Accelerate (and the scripts' checkpoint hooks) into the prepared models, optimizer and schedule. A
    checkpoint of another kind of run (run_identity) or one that cannot load is a UserError."""
    if resume_path is None:
        return 0
    accelerator.print(f"Resuming from {resume_path}")
    check_resume_identity(resume_path, resume_metadata, run_identity)
    try:
        accelerator.load_state(resume_path)
    except UserError:
        raise  # the checkpoint hooks' own, naming what does not fit
    except Exception as err:
        raise UserError(f"{resume_path} could not be loaded ({type(err).__name__}: {err})") from err
    warn_if_batch_layout_changed(resume_metadata, run_metadata)
    return resume_metadata["global_step"]


def register_unet_folder_hooks(accelerator, ema_unet, foreach_ema, offload_ema):
    """Checkpoints hold loadable unet/ (and unet_ema/: ema_unet, an EMAModel or None) folders instead of anonymous
    state dicts; foreach_ema and offload_ema as --foreach_ema and --offload_ema set them for the run."""

    def save_model_hook(models, weights, output_dir):
        # Under DeepSpeed and FSDP every rank runs this hook, and their engines save the weights and leave `weights`
        # empty; the loadable folders are the main process's to write.
        if accelerator.is_main_process:
            if ema_unet is not None:
                ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "unet"))
        weights.clear()  # already saved above: Accelerate would write a second, anonymous copy

    def load_model_hook(models, input_dir):
        if ema_unet is not None:
            loaded = EMAModel.from_pretrained(
                os.path.join(input_dir, "unet_ema"), UNet2DConditionModel, foreach=foreach_ema
            )
            ema_unet.load_state_dict(loaded.state_dict())
            if not offload_ema:
                ema_unet.to(accelerator.device)
        while models:
            model = models.pop()
            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def folder_size_mib(folder):
    """What a checkpoint takes on disk."""
    return (
        sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names) / 2**20
    )

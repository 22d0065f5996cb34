"""A PyTorch run's start: the Accelerator and logging, and, once the models and data are ready, the output folder
taken, the trackers started and the plan logged."""

import dataclasses
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.utils import is_xformers_available

from sdtrain.cli import UserError
from sdtrain.run_folder import check_process_group, take_output_dir

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AcceleratorConfig:
    """What make_accelerator reads, built once from the flags."""

    output_dir: str
    logging_dir: str  # relative to output_dir
    gradient_accumulation_steps: int
    mixed_precision: str | None  # None: the accelerate config's
    report_to: str  # a tracker, "all" or "none"
    allow_tf32: bool
    xformers: bool  # --enable_xformers_memory_efficient_attention

    @classmethod
    def from_args(cls, args):
        return cls(
            output_dir=args.output_dir,
            logging_dir=args.logging_dir,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            report_to=args.report_to,
            allow_tf32=args.allow_tf32,
            xformers=args.enable_xformers_memory_efficient_attention,
        )


def make_accelerator(config, libraries=()):
    """The run's Accelerator, with logging set up so that only the main process speaks (the `libraries`' own logging,
    e.g. diffusers and datasets, quieted on the others); refuses xformers where it is missing and a process group
    the launcher set up inconsistently."""
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, config.logging_dir)
        ),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    # The shared package (sdtrain) logs through the standard library: only the main process speaks, as the scripts do.
    logging.getLogger("sdtrain").setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
    for library in libraries:
        if accelerator.is_local_main_process:
            library.utils.logging.set_verbosity_warning()
        else:
            library.utils.logging.set_verbosity_error()
    if config.xformers and not is_xformers_available():
        raise UserError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers (GPU only)")
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_process_group(accelerator.num_processes, os.environ, "accelerate")
    return accelerator


def begin_training(accelerator, output_dir, script, disposable, project_name, tracker_config):
    """On the main process, take the output folder (and its lock, returned; None elsewhere) for `script`, with the
    `disposable` entries (the tracker logs) allowed in it, and start the trackers with tracker_config (the flags)."""
    if not accelerator.is_main_process:
        return None
    output_lock = take_output_dir(output_dir, script, disposable=disposable)
    accelerator.init_trackers(project_name, config=tracker_config)
    return output_lock


def log_plan(accelerator, batch_size, gradient_accumulation_steps, max_train_steps, global_step, seed):
    """The training banner's lines every run shares: the batch, the updates, where they start."""
    total_batch_size = batch_size * accelerator.num_processes * gradient_accumulation_steps
    logger.info(
        f"  Batch per device = {batch_size}, processes = {accelerator.num_processes}, "
        f"accumulation = {gradient_accumulation_steps}, total batch = {total_batch_size}"
    )
    logger.info(f"  Optimizer updates = {max_train_steps}, starting at {global_step}, seed = {seed}")
    if global_step >= max_train_steps:
        logger.info(
            f"Checkpoint step {global_step} is at or past --max_train_steps {max_train_steps}: nothing to train."
        )


def end_training(accelerator, output_lock):
    """End the trackers and, on the main process, release the output folder's lock."""
    accelerator.end_training()
    if output_lock is not None:
        output_lock.release()

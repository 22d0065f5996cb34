"""The training loop's bookkeeping: how long the run is, each epoch's batches (resumed mid-epoch), the loss and
gradient-norm log window, and stopping together on a signal."""

import logging
import math
import sys
import time

import torch
from tqdm.auto import tqdm

from sdtrain.cli import UserError
from sdtrain.logs import format_logs
from sdtrain.preemption import preemption_message, stop_exit_code

logger = logging.getLogger(__name__)


def training_length(batches_per_epoch, gradient_accumulation_steps, max_train_steps, num_train_epochs, layout):
    """(updates per epoch, optimizer updates, epochs): --max_train_steps is authoritative when given, and the epochs
    are derived from it. layout: the dataset's size and how it is batched, in words, for the error that an
    accumulation group longer than an epoch gets."""
    if gradient_accumulation_steps > batches_per_epoch:
        raise UserError(
            f"--gradient_accumulation_steps {gradient_accumulation_steps} is more than the {batches_per_epoch} "
            f"batches of an epoch ({layout}): use at most {batches_per_epoch}, or a smaller batch"
        )
    updates_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    max_train_steps = max_train_steps or num_train_epochs * updates_per_epoch
    return updates_per_epoch, max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def updates_progress_bar(accelerator, max_train_steps, global_step):
    """The optimizer updates' progress bar, on the local main process only, starting where a resumed run is."""
    return tqdm(
        range(max_train_steps),
        initial=min(global_step, max_train_steps),
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )


def epoch_batches(accelerator, dataloader, sampler, epoch, global_step, updates_per_epoch, gradient_accumulation_steps):
    """The epoch's batches as (batch index, batch), from the GlobalBatchSampler `sampler` of the prepared dataloader.
    Resumed mid-epoch, it skips exactly the batches the interrupted run had consumed (every earlier update in the
    epoch used a full accumulation group)."""
    sampler.epoch = epoch
    skip = (global_step - epoch * updates_per_epoch) * gradient_accumulation_steps
    batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
    return enumerate(batches, start=skip)


def accumulation_group_size(batch_index, gradient_accumulation_steps, batches_per_epoch):
    """How many batches the accumulation group of batch_index has: the epoch's last group may be short, and its
    update averages the batches it has."""
    group_start = batch_index - batch_index % gradient_accumulation_steps
    return min(gradient_accumulation_steps, batches_per_epoch - group_start)


class LogWindow:
    """Loss and gradient norm summed on the device between logging steps. Reading them back waits for the device, so
    it happens once per --logging_steps updates (and before each checkpoint), not at every update."""

    def __init__(self, accelerator, images_per_update, global_step):
        self.accelerator, self.images_per_update = accelerator, images_per_update
        self.loss = torch.zeros((), device=accelerator.device)
        self.grad_norm = torch.zeros((), device=accelerator.device)
        self.reset(global_step)

    def reset(self, global_step):
        self.loss.zero_()
        self.grad_norm.zero_()
        self.first_step, self.updates, self.clipped, self.started = global_step + 1, 0, False, time.perf_counter()

    def add_batch(self, loss, gradient_accumulation_steps):
        self.loss += loss.detach() / gradient_accumulation_steps

    def add_update(self, grad_norm):
        self.updates += 1
        if grad_norm is not None:
            self.grad_norm += grad_norm
            self.clipped = True

    def read(self, global_step, epoch, lr):
        """Averages over the window as a logs dict, then a new window. A non-finite loss stops the run, naming the
        steps."""
        loss = self.accelerator.reduce(self.loss, reduction="mean").item() / self.updates
        if not math.isfinite(loss):
            steps = f"at step {global_step}" if self.updates == 1 else f"in steps {self.first_step}-{global_step}"
            raise FloatingPointError(
                f"loss is {loss} {steps} (epoch {epoch}): stopping; no checkpoint was written for these steps"
            )
        elapsed = time.perf_counter() - self.started
        logs = {"loss": loss, "lr": lr}
        if self.clipped:
            logs["grad_norm"] = self.grad_norm.item() / self.updates
        logs["step_time"] = elapsed / self.updates
        logs["images_per_second"] = self.updates * self.images_per_update / elapsed
        if self.accelerator.device.type == "cuda":
            logs["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        self.reset(global_step)
        return logs

    def log(self, global_step, epoch, lr, progress):
        """read(), logged to the trackers, the log and the progress bar."""
        logs = self.read(global_step, epoch, lr)
        self.accelerator.log(logs, step=global_step)
        logger.info(format_logs(global_step, logs))
        progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")


def stop_agreed(stop_request, accelerator, group):
    """Whether any process received a stop signal, the same answer on every process at the same update: one
    all-reduce of a CPU integer over gloo per update, which never waits for the GPU."""
    requested = torch.tensor([int(stop_request.signal_name is not None)])
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(requested.item())


def stop_run(stop_request, accelerator, global_step):
    """After the checkpoint of a stop request: every process exits with the code that tells a scheduler to relaunch
    (or that the run was interrupted)."""
    accelerator.wait_for_everyone()
    logger.warning(preemption_message(stop_request, global_step))
    accelerator.end_training()
    sys.exit(stop_exit_code(stop_request))

"""The training loop's bookkeeping: the loss and gradient-norm log window, and stopping together on a signal."""

import math
import time

import torch


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


def stop_agreed(stop_request, accelerator, group):
    """Whether any process received a stop signal, the same answer on every process at the same update: one
    all-reduce of a CPU integer over gloo per update, which never waits for the GPU."""
    requested = torch.tensor([int(stop_request.signal_name is not None)])
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(requested.item())

"""The Flax twins' training loop around the step: joining the run's processes, the log window, stopping together, and
the weights an evaluation reads."""

import math
import time

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils


def start_distributed(
    jax_distributed=False, coordinator_address=None, num_processes=None, process_id=None, heartbeat_timeout_seconds=100
):
    """Join the run's other processes, before JAX touches a device: at the coordinator and with the process count and
    index given, or found by JAX itself on TPU pods and the clusters it knows (jax_distributed alone)."""
    if not (jax_distributed or coordinator_address):
        return
    # CPU processes exchange arrays over gloo (JAX's CPU backend has no collectives of its own); GPUs and TPUs
    # ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )


def evaluation_params(state, optimizer):
    """The weights to check, render and save: the trained params, or with schedule-free AdamW (optimizer
    "schedule_free_adamw") the average it evaluates (its params are the point gradients are taken at). Checkpoints
    keep the training state as it is."""
    if optimizer != "schedule_free_adamw":
        return state.params
    inner = state.opt_state.inner_opt_state  # MultiSteps -> (clipping, schedule-free) or schedule-free alone
    schedule_free = inner if hasattr(inner, "z") else inner[-1]
    return optax.contrib.schedule_free_eval_params(schedule_free, state.params)


class LogWindow:
    """Metrics of the updates since the last logging step, left on the device: reading them back waits for it, so
    that happens once per --logging_steps updates (and before anything is saved), not at every update."""

    def __init__(self, images_per_update, global_step):
        self.images_per_update = images_per_update
        self.reset(global_step)

    def reset(self, global_step):
        self.metrics, self.first_step, self.started = [], global_step + 1, time.perf_counter()

    def add_update(self, metrics):
        self.metrics.append(metrics)

    def read(self, global_step, epoch, lr):
        """Averages over the window as a logs dict, then a new window. A non-finite loss stops the run, naming the
        steps."""
        metrics = jax.device_get(self.metrics)
        updates = len(metrics)
        loss = float(np.mean([m["loss"] for m in metrics]))
        if not math.isfinite(loss):
            steps = f"at step {global_step}" if updates == 1 else f"in steps {self.first_step}-{global_step}"
            raise FloatingPointError(
                f"loss is {loss} {steps} (epoch {epoch}): stopping; no checkpoint was written for these steps"
            )
        elapsed = time.perf_counter() - self.started
        logs = {"loss": loss, "lr": lr, "grad_norm": float(np.mean([m["grad_norm"] for m in metrics]))}
        logs["step_time"] = elapsed / updates
        logs["images_per_second"] = updates * self.images_per_update / elapsed
        self.reset(global_step)
        return logs


def stop_agreed(stop_request):
    """Whether any process received a stop signal, the same answer on every process at the same update."""
    requested = int(stop_request.signal_name is not None)
    if jax.process_count() > 1:
        requested = int(np.max(multihost_utils.process_allgather(np.array(requested))))
    return bool(requested)

"""Orbax checkpoints of the Flax twins' train state, written crash-safely by every process and restored exactly, and
the checks that keep a diverged model out of every file."""

import functools
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sdtrain.cli import UserError, WriteFailure
from sdtrain.run_folder import (
    final_save_error,
    list_checkpoints,
    publish_checkpoint,
    refuse_diverged,
    write_checkpoint_metadata,
    write_failure,
)

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state"  # inside checkpoint-N: the Orbax checkpoint of the step, params and optimizer state


def check_finite(tree, loss, what, global_step):
    """Before anything is written: every array about to be written is finite, and so is the loss the new params give
    on the last batch (params can stay finite while a model's outputs do not). Otherwise stop, naming the step and
    the arrays; only then is anything written, so no file ever holds a diverged model."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    floating = [(path, leaf) for path, leaf in leaves if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)]
    bad = [jax.tree_util.keystr(path) for path, leaf in floating if not bool(jnp.isfinite(leaf).all())]
    refuse_diverged(bad, loss, what, global_step)


def final_save_failed(state, output_dir, global_step, run_metadata, err):
    """final_save_error for the Flax scripts: checkpoint-<final step> of the train state. Main process only, so only
    a one-process run can write it (Orbax writes with every process, and the others are past this point)."""
    if jax.process_count() > 1:
        return final_save_error(output_dir, global_step, err, None, "Orbax writes it with every process")
    write = functools.partial(save_checkpoint, state, output_dir, global_step, run_metadata)
    return final_save_error(output_dir, global_step, err, write)


def save_checkpoint(state, output_dir, global_step, run_metadata, total_limit=None):
    """Write checkpoint-N crash-safely: into a hidden temporary folder, flushed to disk, then renamed into place (a
    checkpoint is visible only when complete); then keep the newest `total_limit` (--checkpoints_total_limit).
    Called by every process: Orbax, JAX's multi-host checkpointer, writes the train state (the step, the params and
    the optimizer state; each array once, by the processes that hold it) and returns when every process is done;
    process 0 writes the metadata and publishes the folder. With several hosts, output_dir must be shared by all."""
    is_main_process = jax.process_index() == 0
    final_path = os.path.abspath(os.path.join(output_dir, f"checkpoint-{global_step}"))
    partial_path = os.path.abspath(os.path.join(output_dir, f".checkpoint-{global_step}.partial"))
    if is_main_process:
        shutil.rmtree(partial_path, ignore_errors=True)
    multihost_utils.sync_global_devices(f"checkpoint-{global_step}: cleared")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(partial_path, TRAIN_STATE), state)
            checkpointer.wait_until_finished()
        if is_main_process:
            write_checkpoint_metadata(partial_path, {**run_metadata, "global_step": global_step})
    except (OSError, ValueError) as err:  # Orbax reports a write that failed (a full disk) as a ValueError
        if is_main_process:
            shutil.rmtree(partial_path, ignore_errors=True)
        raise WriteFailure(write_failure(f"checkpoint-{global_step}", output_dir, err)) from err
    if is_main_process:
        publish_checkpoint(partial_path, final_path)
        logger.info(f"Saved {final_path}")
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                logger.info(f"Deleting {path} (--checkpoints_total_limit {total_limit})")
                shutil.rmtree(path)
    multihost_utils.sync_global_devices(f"checkpoint-{global_step}: published")


def restore_train_state(state, checkpoint_path, sharding):
    """`state` with the step, params and optimizer state saved in a checkpoint, as arrays placed by `sharding` (each
    process reads what its devices hold)."""
    path = os.path.abspath(os.path.join(checkpoint_path, TRAIN_STATE))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), state)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except Exception as err:
        raise UserError(f"{path} could not be loaded ({type(err).__name__}: {err})") from err


def tree_mib(tree):
    """The size of a pytree's arrays in MiB: what a checkpoint of it holds."""
    return sum(np.dtype(jnp.result_type(leaf)).itemsize * np.size(leaf) for leaf in jax.tree.leaves(tree)) / 2**20

"""Batches for the Flax twins: each process's share of the global batches the core samplers (sdtrain.batching) lay
out."""

import jax
import numpy as np


def process_batches(example_at, epoch, global_batches, skip_batches):
    """This process's share of each of the epoch's global batches (lists of (row, weight)) from skip_batches on, with
    the weights as "sample_weights"; example_at((epoch, row)) gives one example (a dict of arrays)."""
    local = len(global_batches[0]) // jax.process_count()
    for global_batch in global_batches[skip_batches:]:
        share = global_batch[jax.process_index() * local : (jax.process_index() + 1) * local]
        examples = [example_at((epoch, row)) for row, _ in share]
        batch = {name: np.stack([example[name] for example in examples]) for name in examples[0]}
        batch["sample_weights"] = np.array([weight for _, weight in share], np.float32)
        yield batch

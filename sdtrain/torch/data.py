"""Data loading: every image checked before training, caches encoded once and shared by all processes, each
process's share of the global batches, batches collated, and how many loader workers a device gets by default."""

import logging
import time

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from sdtrain.cli import UserError
from sdtrain.images import inspect_images
from sdtrain.preemption import ignore_interrupts

logger = logging.getLogger(__name__)


def encode_once(accelerator, num_items, batch_size, prepare, encode, description, num_workers=0):
    """encode(prepare(indices)) over items 0..num_items-1, once, for --cache_latents / --cache_text_embeddings. Each
    process encodes every num_processes-th batch and all of them receive the whole result as one CPU tensor: the only
    copy of the cache (dataloader workers share it, they do not copy it). An encode that returns a tuple gives a tuple
    of caches, None where it returns None (SD's pooled text embedding)."""
    per_round = batch_size * accelerator.num_processes
    starts = range(0, num_items, per_round)
    first = accelerator.process_index * batch_size
    # Padded with the last item, so every process contributes a batch of the same shape to the gather.
    batches = [[min(i, num_items - 1) for i in range(s + first, s + first + batch_size)] for s in starts]
    loader = torch.utils.data.DataLoader(
        range(num_items),
        batch_sampler=batches,
        collate_fn=prepare,
        num_workers=num_workers,
        worker_init_fn=ignore_interrupts,
    )
    progress = tqdm(loader, desc=description, disable=not accelerator.is_local_main_process)
    caches, several = None, False
    for start, prepared in zip(starts, progress, strict=True):
        with torch.no_grad():
            outputs = encode(prepared)
            several = isinstance(outputs, tuple)
            parts = outputs if several else (outputs,)
            encoded = [None if part is None else accelerator.gather(part.contiguous()).cpu() for part in parts]
        if caches is None:
            caches = [
                None if part is None else torch.empty((num_items, *part.shape[1:]), dtype=part.dtype)
                for part in encoded
            ]
        stop = min(start + per_round, num_items)
        for cache, part in zip(caches, encoded, strict=True):
            if cache is not None:
                cache[start:stop] = part[: stop - start]
    return tuple(caches) if several else caches[0]


def collate(examples):
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def batch_loader(dataset, sampler, num_workers, device):
    """The DataLoader of the dataset's examples in the batches `sampler` (a GlobalBatchSampler) deals, stacked, with
    num_workers worker processes kept across epochs, and pinned memory on GPU."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_interrupts,  # Ctrl-C stops the main process's loop, not its workers
    )


def default_num_workers(requested, device):
    """`requested` (--dataloader_num_workers) when given, or 4 workers on GPU (decoding and augmenting overlap the
    step) and none on CPU."""
    if requested is not None:
        return requested
    return 4 if device.type == "cuda" else 0


def check_images(verify_image, num_images, accelerator):
    """Every image must decode before anything else happens (a bad file found hours in would stop every resume
    too): verify_image(i) for i in range(num_images), each process its share. The failures are gathered, so all
    processes stop together. Returns every image's (width, height), which the buckets need."""
    indices = list(range(accelerator.process_index, num_images, accelerator.num_processes))
    started = time.perf_counter()
    sizes, problems = inspect_images(verify_image, indices)
    found = list(zip(indices, sizes, strict=True))
    if accelerator.num_processes > 1:
        problems, found = gather_object(problems), gather_object(found)
    if problems:
        listed = "\n  ".join(sorted(problems)[:10])
        raise UserError(f"{len(problems)} of {num_images} images cannot be read; fix or remove them:\n  {listed}")
    logger.info(f"Checked {num_images} images in {time.perf_counter() - started:.1f} s")
    return [size for _, size in sorted(found)]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields each epoch's global batches (lists of (row, weight) from epoch_global_batches(epoch)) as per-process
    batches of (epoch, row, weight) keys, process 0's share first. Accelerate deals batch k to process k %
    num_processes, so each process gets its share of every global batch: the run sees the same global batches however
    many processes share them. The training loop sets `.epoch` itself; there is deliberately no set_epoch(), which
    Accelerate would call with its own iteration counter."""

    def __init__(self, epoch_global_batches, batch_size, num_processes):
        self.epoch_global_batches, self.batch_size, self.num_processes = epoch_global_batches, batch_size, num_processes
        self.drop_last, self.epoch = False, 0  # read by Accelerate's batch sharding
        self.num_batches = len(epoch_global_batches(0)) * num_processes  # the same every epoch

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        for batch in self.epoch_global_batches(self.epoch):
            for process in range(self.num_processes):
                share = batch[process * self.batch_size : (process + 1) * self.batch_size]
                yield [(self.epoch, row, weight) for row, weight in share]

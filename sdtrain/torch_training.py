"""The PyTorch scripts' machinery around the recipe: tokenizing and encoding once, the loss and gradient-norm log
window, stopping together, finiteness checks, checkpoints through Accelerate, validation grids and the saved text
encoder. torch, accelerate and diffusers are imported where they are used, so the package imports without them."""

import functools
import inspect
import json
import logging
import math
import os
import shutil
import time

import numpy as np
from tqdm.auto import tqdm

from sdtrain.cli import UserError, WriteFailure
from sdtrain.families import component_problem, local_model_index, pipeline_family
from sdtrain.images import inspect_images, labelled_grid
from sdtrain.preemption import ignore_interrupts
from sdtrain.run_folder import (
    final_save_error,
    list_checkpoints,
    publish_checkpoint,
    write_checkpoint_metadata,
    write_failure,
)
from sdtrain.seeds import VALIDATION_SEED_KEY, derive_seed

logger = logging.getLogger(__name__)


def tokenize(tokenizer, captions, indices):
    """Token ids of captions[i] for i in indices, padded (or cut) to the text encoder's context length."""
    selected = [captions[i] for i in indices]
    padding = dict(max_length=tokenizer.model_max_length, padding="max_length", truncation=True)
    return tokenizer(selected, return_tensors="pt", **padding).input_ids


def encode_once(accelerator, num_items, batch_size, prepare, encode, description, num_workers=0):
    """encode(prepare(indices)) over items 0..num_items-1, once, for --cache_latents / --cache_text_embeddings. Each
    process encodes every num_processes-th batch and all of them receive the whole result as one CPU tensor: the only
    copy of the cache (dataloader workers share it, they do not copy it). An encode that returns a tuple of tensors
    gives a tuple of caches."""
    import torch

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
            encoded = [accelerator.gather(part.contiguous()).cpu() for part in (outputs if several else (outputs,))]
        if caches is None:
            caches = [torch.empty((num_items, *part.shape[1:]), dtype=part.dtype) for part in encoded]
        stop = min(start + per_round, num_items)
        for cache, part in zip(caches, encoded, strict=True):
            cache[start:stop] = part[: stop - start]
    return tuple(caches) if several else caches[0]


def collate(examples):
    import torch

    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def default_num_workers(args, accelerator):
    """--dataloader_num_workers, or 4 workers on GPU (decoding and augmenting overlap the step) and none on CPU."""
    if args.dataloader_num_workers is not None:
        return args.dataloader_num_workers
    return 4 if accelerator.device.type == "cuda" else 0


class LogWindow:
    """Loss and gradient norm summed on the device between logging steps. Reading them back waits for the device, so
    it happens once per --logging_steps updates (and before each checkpoint), not at every update."""

    def __init__(self, accelerator, images_per_update, global_step):
        import torch

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
        import torch

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
    import torch

    requested = torch.tensor([int(stop_request.signal_name is not None)])
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(requested.item())


def check_finite(named_tensors, loss, what, global_step):
    """Before anything is written: every tensor about to be written is finite, and so is the loss the new weights
    give on the last batch (weights can stay finite while a model's outputs do not). Otherwise stop, naming the step
    and the tensors; only then is anything written, so no file ever holds a diverged model."""
    import torch

    bad = [name for name, tensor in named_tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad or not math.isfinite(loss):
        culprits = f"non-finite values in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}" if bad else ""
        culprits = culprits or f"a loss of {loss} on the last batch"
        raise FloatingPointError(
            f"{what} diverged at step {global_step} ({culprits}): stopping, nothing was written for this step. "
            "Lower --learning_rate, or clip gradients with --max_grad_norm"
        )


def optimizer_tensors(optimizer):
    """The optimizer's state tensors, named by parameter index and key."""
    import torch

    for index, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            if torch.is_tensor(value):
                yield f"optimizer state {index}.{key}", value


def model_family(args):
    """ "sd" or "sdxl": the --pretrained_model_name_or_path pipeline's family, from its model_index.json (read before
    any weights); a ValueError naming any other family."""
    path = args.pretrained_model_name_or_path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        model_index = local_model_index(path)
    else:
        from diffusers import DiffusionPipeline

        model_index = DiffusionPipeline.load_config(path, revision=args.revision, cache_dir=args.cache_dir)
    return pipeline_family(model_index, f"--pretrained_model_name_or_path {path}")


def load_component(cls, args, subfolder, **kwargs):
    """One part of the --pretrained_model_name_or_path pipeline, at --revision unless kwargs name another."""
    kwargs = {"revision": args.revision, "cache_dir": args.cache_dir, **kwargs}
    return load_model(cls, args.pretrained_model_name_or_path, subfolder, "--pretrained_model_name_or_path", **kwargs)


def load_model(cls, source, subfolder, flag, **kwargs):
    """cls.from_pretrained(source, subfolder=subfolder). diffusers' and transformers' errors name the pipeline, not
    the component: a UserError names the flag, the component and, for a local folder, what it lacks."""
    try:
        return cls.from_pretrained(source, subfolder=subfolder or None, **kwargs)
    except (OSError, ValueError) as err:
        problem = None
        if os.path.isdir(source):
            weight_names = ()
            if hasattr(cls, "state_dict"):  # a model (not a tokenizer or a scheduler): it has weights to find
                diffusers_model = cls.__module__.startswith("diffusers")
                stem = "diffusion_pytorch_model" if diffusers_model else "model"
                weight_names = (
                    f"{stem}.safetensors",
                    "diffusion_pytorch_model.bin" if diffusers_model else "pytorch_model.bin",
                )
            problem = component_problem(source, subfolder, weight_names, kwargs.get("variant"))
        component = f"its {subfolder}" if subfolder else "the model"
        detail = problem or f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise UserError(f"{flag} {source}: cannot load {component} ({cls.__name__}): {detail}") from err


def save_checkpoint(accelerator, output_dir, global_step, run_metadata, total_limit=None):
    """Write checkpoint-N crash-safely: into a hidden temporary folder, flushed to disk, then renamed into place (a
    checkpoint is visible only when complete); then keep the newest `total_limit` (--checkpoints_total_limit).
    Called by every process. Under DeepSpeed and FSDP, save_state is collective (each rank writes its own shards into
    the folder, which must be shared by all machines) and the checkpoint is published only if every rank succeeded;
    otherwise the main process writes it alone."""
    import torch
    from accelerate.utils import DistributedType

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
        logger.info(f"Saved {final_path}")
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                logger.info(f"Deleting {path} (--checkpoints_total_limit {total_limit})")
                shutil.rmtree(path)
    if collective:
        accelerator.wait_for_everyone()


def final_save_failed(accelerator, output_dir, global_step, run_metadata, err):
    """final_save_error for the PyTorch scripts: checkpoint-<final step> through Accelerate. Main process only; the
    model must hold the trained weights, as in every checkpoint (EMA weights restored)."""
    from accelerate.utils import DistributedType

    if accelerator.state.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        # Their checkpoints are written by every process together, and the others are past this point.
        return final_save_error(output_dir, global_step, err, None, "DeepSpeed and FSDP write it with every process")
    write = functools.partial(save_checkpoint, accelerator, output_dir, global_step, run_metadata)
    return final_save_error(output_dir, global_step, err, write)


def render_validation_images(pipeline, prompts, size, seed, weight_dtype):
    """One image per prompt, each from its own fixed seed, so grids compare across steps and across a resume."""
    import torch

    device = pipeline.device
    mixed = weight_dtype != torch.float32
    # A VAE kept in fp32 under mixed precision (SDXL's, which overflows in fp16) must also decode in fp32, and autocast
    # would run its convolutions in the low precision: the latents are decoded after it.
    decode_apart = mixed and pipeline.vae.dtype == torch.float32
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(derive_seed(seed, VALIDATION_SEED_KEY, index))
        # Trained and frozen parts may differ in dtype under mixed precision; autocast reconciles them.
        with torch.autocast(device.type, dtype=weight_dtype, enabled=mixed):
            height, width = size
            output_type = "latent" if decode_apart else "pil"
            output = pipeline(
                prompt, num_inference_steps=20, generator=generator, height=height, width=width, output_type=output_type
            )
        if decode_apart:
            with torch.no_grad():
                latents = output.images.to(torch.float32) / pipeline.vae.config.scaling_factor
                decoded = pipeline.vae.decode(latents, return_dict=False)[0]
            images.append(pipeline.image_processor.postprocess(decoded, output_type="pil")[0])
        else:
            images.append(output.images[0])
    return images


def log_validation(pipeline, prompts, args, accelerator, seed, global_step, tag, weight_dtype):
    """Render, save a PNG grid under output_dir/validation/, and log the images to the trackers."""
    pipeline.set_progress_bar_config(disable=True)
    images = render_validation_images(pipeline, prompts, args.validation_resolution, seed, weight_dtype)
    grid = labelled_grid(images, prompts)
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid_path = os.path.join(folder, f"{tag}-step-{global_step:06d}.png")
    grid.save(grid_path)
    logger.info(f"Validation grid ({' | '.join(prompts)}): {grid_path}")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(i) for i in images]), global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            logged = [wandb.Image(image, caption=prompt) for image, prompt in zip(images, prompts, strict=True)]
            tracker.log({tag: logged}, step=global_step)
    return images


def text_components(text_encoders, tokenizers):
    """The text encoders and tokenizers by their pipeline names: text_encoder, tokenizer (and SDXL's text_encoder_2,
    tokenizer_2)."""
    components = {}
    for index, (text_encoder, tokenizer) in enumerate(zip(text_encoders, tokenizers, strict=True)):
        suffix = f"_{index + 1}" if index else ""
        components["text_encoder" + suffix], components["tokenizer" + suffix] = text_encoder, tokenizer
    return components


def encode_text(text_encoders, input_ids):
    """The UNet's text conditioning from token ids [batch, encoders, tokens], on the encoders' device. SD 1.x / 2.x:
    the text encoder's last hidden state. SDXL: (both encoders' penultimate hidden states side by side, the second's
    pooled projection)."""
    import torch

    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[:, 0], return_dict=False)[0]
    hidden_states = []
    for text_encoder, ids in zip(text_encoders, input_ids.unbind(1), strict=True):
        output = text_encoder(ids, output_hidden_states=True)
        # SDXL reads the penultimate layer of each encoder (Podell et al. 2023, arXiv:2307.01952, sec. 2.1).
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), output[0]  # output[0]: the second encoder's text_embeds


def write_hub_style_text_encoder(text_encoder_dir):
    """transformers 5 saves CLIPTextModel weights without the 'text_model.' key prefix that hub checkpoints carry and
    that transformers 4, the Flax twins and single-file converters expect (they silently load random weights
    otherwise). transformers 5 reads both layouts, so rewrite the saved file(s) with the prefix."""
    import safetensors.torch
    import torch

    def hub_key(key):
        return "text_model." + key if key.split(".")[0] in ("embeddings", "encoder", "final_layer_norm") else key

    index_path = os.path.join(text_encoder_dir, "model.safetensors.index.json")
    names = ["model.safetensors", "pytorch_model.bin"]
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        names = sorted(set(index["weight_map"].values()))
        index["weight_map"] = {hub_key(k): v for k, v in index["weight_map"].items()}
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
    for name in names:
        path = os.path.join(text_encoder_dir, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".safetensors"):
            state = safetensors.torch.load_file(path)
            safetensors.torch.save_file({hub_key(k): v for k, v in state.items()}, path, metadata={"format": "pt"})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            torch.save({hub_key(k): v for k, v in state.items()}, path)


def inference_scheduler(scheduler, args):
    """The pipeline's scheduler set up for what this run trained: its prediction type, and with
    --rescale_betas_zero_snr the rescaled schedule sampled from its last timestep ("trailing", Lin et al. 2023 sec.
    3.3). A scheduler class that cannot rescale (PNDM, LMS) is replaced by DDIM, which the paper samples with."""
    from diffusers import DDIMScheduler

    overrides = {} if args.prediction_type is None else {"prediction_type": args.prediction_type}
    if not args.rescale_betas_zero_snr:
        return scheduler.from_config(scheduler.config, **overrides) if overrides else scheduler
    overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if "rescale_betas_zero_snr" in inspect.signature(type(scheduler).__init__).parameters:
        return type(scheduler).from_config(scheduler.config, **overrides)
    logger.info(f"--rescale_betas_zero_snr: {type(scheduler).__name__} cannot rescale, saving a DDIMScheduler")
    # Latents are not confined to [-1, 1]: DDIM's default clipping of its x0 estimate would distort them.
    return DDIMScheduler.from_config(scheduler.config, **overrides, clip_sample=False)


def check_images(dataset, accelerator):
    """Every image must decode before anything else happens (a bad file found hours in would stop every resume
    too). Each process checks its share of the rows; the failures are gathered, so all processes stop together.
    Returns every image's (width, height), which the buckets need."""
    from accelerate.utils import gather_object

    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    started = time.perf_counter()
    sizes, problems = inspect_images(dataset.verify_image, indices)
    found = list(zip(indices, sizes, strict=True))
    if accelerator.num_processes > 1:
        problems, found = gather_object(problems), gather_object(found)
    if problems:
        listed = "\n  ".join(sorted(problems)[:10])
        raise UserError(f"{len(problems)} of {len(dataset)} images cannot be read; fix or remove them:\n  {listed}")
    logger.info(f"Checked {len(dataset)} images in {time.perf_counter() - started:.1f} s")
    return [size for _, size in sorted(found)]

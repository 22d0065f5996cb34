"""LoRA in the PyTorch script (sdtrain.lora says what the flags mean and writes the files): peft adapters in the UNet
and, with --train_text_encoder, in the text encoders; the adapter's tensors by their keys in the files a LoRA run
writes; its EMA; its checkpoints, which hold the adapter and not the base model; and its gradients averaged over
processes."""

import contextlib
import json
import logging
import os

import safetensors.torch
import torch
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import LoraLayer

from sdtrain.cli import UserError
from sdtrain.lora import TEXT_ENCODER_LORA_MODULES, diffusers_key

logger = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name for the one adapter a run trains; it appears in no file
# A LoRA run's checkpoint holds its adapter (and the adapter's EMA), not the base model, which the run never changes.
CHECKPOINT_FILE = "lora_adapter.safetensors"
EMA_CHECKPOINT_FILE = "lora_adapter_ema.safetensors"


def add_adapters(unet, text_encoders, family, config, weight_dtype, seed):
    """Add the run's LoRA (an sdtrain.lora.LoraConfig; None: no LoRA, nothing is adapted) to the UNet and, with
    config.train_text_encoder, to the text encoders (in the order of the family's: sdtrain.families.Family); returns
    the adapted models as (component name, model) pairs, the UNet first. Only the adapter trains: the base weights are
    frozen in weight_dtype (the mixed-precision dtype: they need no fp32 master copy), the adapter is held in fp32 so
    that its small updates are not rounded away. B starts at zero, so training starts from the base model; A is drawn
    as peft draws it (Kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in))) from the seed on the CPU, so it is the same in
    every process and on every device."""
    if config is None:
        return []
    adapted = [("unet", unet, config.unet_modules)]
    if config.train_text_encoder:
        pairs = zip(family.text_encoders, text_encoders, strict=True)
        adapted += [(name, model, TEXT_ENCODER_LORA_MODULES) for name, model in pairs]
    for _, model, modules in adapted:
        model.requires_grad_(False)
        model.to(dtype=weight_dtype)
        lora = PeftLoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(modules)
        )
        model.add_adapter(lora, adapter_name=ADAPTER)
        model.train()  # the adapter's dropout
    models = [(name, model) for name, model, _ in adapted]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in adapter_parameters(models):
            parameter.data = parameter.data.float()
            if key.endswith(".lora_A.weight"):
                bound = parameter.shape[1] ** -0.5
                parameter.copy_(torch.empty(parameter.shape).uniform_(-bound, bound, generator=generator))
            parameter.requires_grad_(True)
    count = sum(parameter.numel() for _, parameter in adapter_parameters(models))
    logger.info(
        f"LoRA rank {config.rank}, alpha {config.alpha:g} in {', '.join(name for name, _ in models)}: {count} "
        f"parameters ({count * 4 / 2**20:.2f} MiB) train in fp32, the base weights are frozen in {weight_dtype}"
    )
    return models


def adapter_parameters(adapted):
    """(diffusers_key, parameter) of every LoRA matrix of the adapted models ((component name, model) pairs), in a
    fixed order: the optimizer's, the EMA's and the checkpoints'."""
    for component, model in adapted:
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                yield diffusers_key(component, name, "A"), module.lora_A[ADAPTER].weight
                yield diffusers_key(component, name, "B"), module.lora_B[ADAPTER].weight


def adapter_state(adapted):
    """The adapter's tensors as float32 NumPy arrays by diffusers_key: what sdtrain.lora.write_lora_files writes."""
    return {key: parameter.detach().float().cpu().numpy() for key, parameter in adapter_parameters(adapted)}


def average_gradients(parameters, num_processes):
    """Average the gradients of parameters (the text encoders' adapters) over the processes, as DDP does for the
    UNet's. The text encoders are not wrapped in DDP: SDXL conditions on the first encoder's penultimate layer, so the
    adapter of its last layer gets no gradient, which DDP takes for a bug. A parameter without a gradient has none in
    every process (the same graph), as in one process, where the optimizer skips it."""
    if num_processes < 2:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad.div_(num_processes)


@contextlib.contextmanager
def evaluating(models):
    """The models (anything else is skipped) in eval mode, LoRA dropout off (renders, the loss probe), then back in
    the modes they had."""
    modules = [model for model in models if isinstance(model, torch.nn.Module)]
    modes = [{module: module.training for module in model.modules()} for model in modules]
    for model in modules:
        model.eval()
    try:
        yield
    finally:
        for model_modes in modes:
            for module, training in model_modes.items():
                module.training = training


# ------------------------------------------------------------------------------------------------------ checkpoints
def save_tensors(named_tensors, path, metadata=None):
    """Tensors by name into a safetensors file (a checkpoint's adapter, or its EMA)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in named_tensors}
    safetensors.torch.save_file(state, path, metadata=metadata)


def load_tensors(named_tensors, path, what):
    """Copy a save_tensors file into the tensors (name, tensor) it was saved from, exactly; a file holding other names
    (other modules) or shapes (another rank) is a UserError naming what differs. Returns the file's metadata."""
    state = safetensors.torch.load_file(path)
    named_tensors = list(named_tensors)
    missing = sorted({name for name, _ in named_tensors} - set(state))
    unexpected = sorted(set(state) - {name for name, _ in named_tensors})
    if missing or unexpected:
        raise UserError(
            f"{path}: {what} does not match this run's LoRA (--lora_layers, --train_text_encoder): "
            f"missing {missing[:2]}{' ...' if len(missing) > 2 else ''}, "
            f"unexpected {unexpected[:2]}{' ...' if len(unexpected) > 2 else ''}"
        )
    with torch.no_grad():
        for name, tensor in named_tensors:
            if state[name].shape != tensor.shape:
                raise UserError(
                    f"{path}: {what}'s {name} is {tuple(state[name].shape)}, this run's is {tuple(tensor.shape)} "
                    "(another --rank?)"
                )
            tensor.copy_(state[name])
    with safetensors.safe_open(path, "pt") as f:
        return f.metadata()


def register_lora_hooks(accelerator, adapted, ema, offload_ema):
    """Checkpoints of a LoRA run: the adapter's tensors of every adapted model ((component name, model) pairs) in
    CHECKPOINT_FILE, and with --use_ema (ema: an EMAModel over the adapter's parameters, or None) its shadow tensors
    and counters in EMA_CHECKPOINT_FILE, by the keys of the LoRA files. Accelerate writes the optimizer, schedule and
    RNG states beside them; the prepared UNet's state dict, its frozen base included, is not written."""

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            named = list(adapter_parameters(adapted))
            save_tensors(named, os.path.join(output_dir, CHECKPOINT_FILE))
            if ema is not None:
                state = ema.state_dict()
                shadows = zip([name for name, _ in named], state.pop("shadow_params"), strict=True)
                save_tensors(shadows, os.path.join(output_dir, EMA_CHECKPOINT_FILE), {"ema": json.dumps(state)})
        weights.clear()

    def load_model_hook(models, input_dir):
        models.clear()  # the adapters load below; the base weights are the pretrained ones
        path = os.path.join(input_dir, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            raise UserError(
                f"{input_dir} holds no LoRA adapter ({CHECKPOINT_FILE}): resume a full fine-tune without --rank"
            )
        named = list(adapter_parameters(adapted))
        load_tensors(named, path, "the adapter")
        if ema is not None:
            ema_path = os.path.join(input_dir, EMA_CHECKPOINT_FILE)
            if not os.path.isfile(ema_path):
                raise UserError(f"{input_dir} holds no EMA of the adapter: it was trained without --use_ema")
            # Offloaded (--offload_ema), the EMA stays in CPU memory, as the full fine-tune's does when it resumes.
            shadows = [torch.empty_like(parameter, device="cpu" if offload_ema else None) for _, parameter in named]
            metadata = load_tensors(zip([name for name, _ in named], shadows, strict=True), ema_path, "its EMA")
            ema.load_state_dict({**json.loads(metadata["ema"]), "shadow_params": shadows})
            if not offload_ema:
                ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def set_training(adapted, training):
    """The adapted models ((component name, model) pairs) in train mode (LoRA dropout on) or in eval mode."""
    for _, model in adapted:
        model.train(training)

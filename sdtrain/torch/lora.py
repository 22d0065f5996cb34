"""LoRA in the PyTorch script (sdtrain.lora says what the flags mean and writes the files): peft adapters in the UNet
and, with --train_text_encoder, in the text encoders; the adapter's tensors by their keys in the files a LoRA run
writes; and its gradients averaged over processes."""

import safetensors.torch
import torch
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import LoraLayer

from sdtrain.cli import UserError
from sdtrain.lora import TEXT_ENCODER_LORA_MODULES, diffusers_key

ADAPTER = "default"  # peft's name for the one adapter a run trains; it appears in no file
# transformers 5's CLIPTextModel holds these at its top level, where hub checkpoints, transformers 4 and diffusers'
# LoRA files have them under text_model. (CLIPTextModelWithProjection keeps text_model. in both versions).
TEXT_MODEL_PARTS = ("embeddings", "encoder", "final_layer_norm")


def add_adapters(unet, text_encoders, config, seed):
    """Add the run's LoRA (an sdtrain.lora.LoraConfig) to the UNet and, with config.train_text_encoder, to the text
    encoders (text_encoders: (pipeline component name, model) pairs); returns the adapted models as (component name,
    model) pairs, the UNet first. Only the adapter trains: the base weights stay frozen in the dtype they have (the
    mixed-precision one), the adapter is held in fp32 so that its small updates are not rounded away. B starts at zero
    (peft's default initialisation), so training starts from the base model; A is drawn from the seed on the CPU, the
    same in every process and on every device."""
    adapted = [("unet", unet, config.unet_modules)]
    if config.train_text_encoder:
        adapted += [(name, model, TEXT_ENCODER_LORA_MODULES) for name, model in text_encoders]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, model, modules in adapted:
            if next(model.parameters()).device.type != "cpu":
                raise ValueError("add the adapters before the models move to the device, so that A is drawn the same")
            model.requires_grad_(False)
            model.add_adapter(
                PeftLoraConfig(
                    r=config.rank,
                    lora_alpha=config.alpha,
                    lora_dropout=config.dropout,
                    target_modules=list(modules),
                    init_lora_weights=True,
                ),
                adapter_name=ADAPTER,
            )
    models = [(name, model) for name, model, _ in adapted]
    for _, parameter in adapter_parameters(models):
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return models


def module_path(component, name):
    """The adapted module's name in the files: diffusers' module path in the UNet, the hub's in a text encoder."""
    if component != "unet" and name.split(".", 1)[0] in TEXT_MODEL_PARTS:
        return "text_model." + name
    return name


def adapter_parameters(adapted):
    """(diffusers_key, parameter) of every LoRA matrix of the adapted models ((component name, model) pairs), in a
    fixed order: the optimizer's, the EMA's and the checkpoints'."""
    for component, model in adapted:
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                path = module_path(component, name)
                yield diffusers_key(component, path, "A"), module.lora_A[ADAPTER].weight
                yield diffusers_key(component, path, "B"), module.lora_B[ADAPTER].weight


def adapter_state(adapted):
    """The adapter's tensors as float32 NumPy arrays by diffusers_key: what sdtrain.lora.write_lora_files writes."""
    return {key: parameter.detach().float().cpu().numpy() for key, parameter in adapter_parameters(adapted)}


def save_tensors(named_tensors, path, metadata=None):
    """Tensors by name into a safetensors file (a checkpoint's adapter, or its EMA)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in named_tensors}
    safetensors.torch.save_file(state, path, metadata=metadata)


def load_tensors(named_parameters, path, what):
    """Copy a save_tensors file into the parameters (name, tensor) it was saved from, exactly; a file holding other
    names (another rank, other modules) is a UserError naming both."""
    state = safetensors.torch.load_file(path)
    named_parameters = list(named_parameters)
    expected = [name for name, _ in named_parameters]
    if sorted(state) != sorted(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise UserError(
            f"{path}: {what} does not match this run's LoRA (--rank, --lora_layers, --train_text_encoder): "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for name, parameter in named_parameters:
            if state[name].shape != parameter.shape:
                raise UserError(f"{path}: {name} is {tuple(state[name].shape)}, this run's is {tuple(parameter.shape)}")
            parameter.copy_(state[name])
    return safetensors.safe_open(path, "pt").metadata()


def average_gradients(parameters, num_processes):
    """Average the gradients of parameters over the processes, as DDP does for the UNet. The text encoders are not
    wrapped in DDP: SDXL conditions on the first encoder's penultimate layer, so its last layer's adapter gets no
    gradient, which DDP takes for a bug. A parameter without a gradient has none in every process (the same graph) and
    stays so, as in one process, where the optimizer skips it."""
    if num_processes < 2:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad.div_(num_processes)


def set_training(adapted, training):
    """Train mode (LoRA dropout on) or eval mode (off: validation renders, the loss probe) for the adapted models."""
    for _, model in adapted:
        model.train(training)


def adapter_size_mib(adapted):
    return sum(parameter.numel() * 4 for _, parameter in adapter_parameters(adapted)) / 2**20

"""The Flax twins' machinery around the recipe: processes and devices, loading the Flax models, rematerialisation,
the log window, stopping together, finiteness checks, Orbax checkpoints and validation rendering. jax, flax, optax and
diffusers are imported where they are used, so the package imports without them."""

import functools
import inspect
import logging
import math
import os
import shutil
import time

import numpy as np
from PIL import Image

from sdtrain.cli import UserError, WriteFailure
from sdtrain.families import component_problem
from sdtrain.images import labelled_grid
from sdtrain.run_folder import (
    final_save_error,
    list_checkpoints,
    publish_checkpoint,
    write_checkpoint_metadata,
    write_failure,
)
from sdtrain.seeds import VALIDATION_SEED_KEY, derive_seed

logger = logging.getLogger(__name__)


TRAIN_STATE = "train_state"  # inside checkpoint-N: the Orbax checkpoint of the step, params and optimizer state


def epoch_batches(dataset, epoch, global_batches, skip_batches):
    """This process's share of each of the epoch's global batches (lists of (row, weight)) from skip_batches on, with
    the weights as "sample_weights"."""
    import jax

    local = len(global_batches[0]) // jax.process_count()
    for global_batch in global_batches[skip_batches:]:
        share = global_batch[jax.process_index() * local : (jax.process_index() + 1) * local]
        examples = [dataset[(epoch, row)] for row, _ in share]
        batch = {name: np.stack([example[name] for example in examples]) for name in examples[0]}
        batch["sample_weights"] = np.array([weight for _, weight in share], np.float32)
        yield batch


def resolve_pipeline_folder(args):
    """A local folder holding the pipeline: the path itself, or the needed files of a hub repository (configs,
    tokenizer and the safetensors weights of the chosen variant; nothing else is downloaded)."""
    if os.path.isdir(args.pretrained_model_name_or_path):
        return args.pretrained_model_name_or_path
    from huggingface_hub import snapshot_download

    suffix = f".{args.variant}" if args.variant else ""
    return snapshot_download(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        cache_dir=args.cache_dir,
        allow_patterns=[
            "model_index.json",
            "scheduler/*",
            "tokenizer/*",
            "tokenizer_2/*",  # SDXL's second tokenizer and text encoder
            "*/config.json",
            f"text_encoder/model{suffix}.safetensors",
            f"text_encoder_2/model{suffix}.safetensors",
            f"unet/diffusion_pytorch_model{suffix}.safetensors",
            f"vae/diffusion_pytorch_model{suffix}.safetensors",
        ],
    )


def resolve_vae_folder(pipeline_folder, args):
    """(folder, subfolder) of the VAE to train with and save: the pipeline's, or --pretrained_vae_model_name_or_path
    (a local VAE folder, or the config and safetensors weights of a hub repository)."""
    if not args.pretrained_vae_model_name_or_path:
        return pipeline_folder, "vae"
    if os.path.isdir(args.pretrained_vae_model_name_or_path):
        return args.pretrained_vae_model_name_or_path, ""
    from huggingface_hub import snapshot_download

    allow_patterns = ["config.json", "diffusion_pytorch_model*.safetensors"]
    return snapshot_download(
        args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir, allow_patterns=allow_patterns
    ), ""


def component_name(folder, subfolder):
    return f"{folder}: its {subfolder}" if subfolder else f"the model {folder}"


def read_flax_config(read, folder, subfolder):
    """read(folder, subfolder=subfolder), the component's config; a UserError naming the component and what it lacks
    when there is none (diffusers' and transformers' errors name the pipeline, not the component; transformers'
    CLIPTextConfig even reads a missing subfolder as its default config)."""
    problem = component_problem(folder, subfolder) if subfolder and os.path.isdir(folder) else None
    if problem:
        raise UserError(f"{component_name(folder, subfolder)} cannot be loaded: {problem}")
    try:
        return read(folder, subfolder=subfolder)
    except (OSError, ValueError) as err:
        problem = component_problem(folder, subfolder) if subfolder and os.path.isdir(folder) else None
        detail = problem or f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        raise UserError(f"{component_name(folder, subfolder)} cannot be loaded: {detail}") from err


def missing_weights(folder, subfolder, name):
    where = os.path.join(folder, subfolder)
    return UserError(
        f"{component_name(folder, subfolder)} cannot be loaded: there is no {name} in {where} "
        "(the Flax scripts read PyTorch pipelines saved with safetensors weights)"
    )


def load_flax_model(cls, folder, subfolder, variant, dtype, **overrides):
    """A diffusers Flax model and its params from the PyTorch safetensors weights of a standard pipeline folder."""
    import jax
    import jax.numpy as jnp
    import safetensors.torch
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    config = read_flax_config(cls.load_config, folder, subfolder)
    if cls.__name__ == "FlaxUNet2DConditionModel" and config.get("norm_num_groups", 32) != 32:
        # diffusers' Flax UNet always normalises over 32 groups: any other value would silently compute another model.
        raise UserError(
            f"{os.path.join(folder, subfolder)}: norm_num_groups={config['norm_num_groups']}, "
            "but the Flax UNet supports only 32"
        )
    model = cls.from_config(config, dtype=dtype, **overrides)
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    path = os.path.join(folder, subfolder, name)
    if not os.path.isfile(path):
        raise missing_weights(folder, subfolder, name)
    state = {k: v.float() for k, v in safetensors.torch.load_file(path).items()}

    class ShapesOnly:
        # The converter initialises random params only to learn their names and shapes; eval_shape gives both
        # without running the model (tens of seconds saved on CPU).
        def init_weights(self, rng):
            return jax.eval_shape(model.init_weights, rng)

    params = convert_pytorch_state_dict_to_flax(state, ShapesOnly())
    return model, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def load_flax_text_encoder(folder, variant, dtype, subfolder="text_encoder"):
    """transformers' Flax CLIP text model and its params from the PyTorch safetensors weights of a pipeline folder:
    FlaxCLIPTextModel, or for SDXL's text_encoder_2 (CLIPTextModelWithProjection in its config) the model whose first
    output is the projected pooled embedding, FlaxCLIPTextModelWithProjection."""
    import jax
    import jax.numpy as jnp
    import safetensors.torch
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    config = read_flax_config(CLIPTextConfig.from_pretrained, folder, subfolder)
    with_projection = "CLIPTextModelWithProjection" in (config.architectures or [])
    cls = FlaxCLIPTextModelWithProjection if with_projection else FlaxCLIPTextModel
    model = cls(config, dtype=dtype, _do_init=False)
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    path = os.path.join(folder, subfolder, name)
    if not os.path.isfile(path):
        raise missing_weights(folder, subfolder, name)
    state = {k: v.float() for k, v in safetensors.torch.load_file(path).items()}
    if not any(k.startswith("text_model.") for k in state):  # transformers 5 drops the prefix when saving
        state = {"text_model." + k: v for k, v in state.items()}

    class ShapesOnly:  # what the converter reads of the model, without initialising random params
        base_model_prefix = model.base_model_prefix
        params = model.params_shape_tree

    params = convert_pytorch_state_dict_to_flax(state, ShapesOnly())
    model._is_initialized = True
    model.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return model


def enable_block_rematerialisation():
    """Gradient checkpointing for the Flax UNet: wrap each of its block classes in nn.remat, so a block's activations
    are recomputed in the backward pass instead of stored. The model code is unchanged; only the names the UNet
    module looks its blocks up by are rebound, before the UNet is built."""
    import diffusers.models.unets.unet_2d_condition_flax as unet_module
    import flax.linen as nn

    for name in [
        "FlaxCrossAttnDownBlock2D",
        "FlaxDownBlock2D",
        "FlaxCrossAttnUpBlock2D",
        "FlaxUpBlock2D",
        "FlaxUNetMidBlock2DCrossAttn",
    ]:
        block = getattr(unet_module, name)
        if not getattr(block, "_rematerialised", False):
            wrapped = nn.remat(block)
            wrapped._rematerialised = True
            setattr(unet_module, name, wrapped)


def evaluation_params(state, args):
    """The weights to check, render and save: the trained params, or with schedule-free AdamW the average it
    evaluates (its params are the point gradients are taken at). Checkpoints keep the training state as it is."""
    import optax

    if args.optimizer != "schedule_free_adamw":
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
        import jax

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


def make_renderer(models, size, num_inference_steps=20, guidance_scale=7.5, conditioning=None):
    """A compiled function (params, prompt_ids, rng) -> one image of `size` (height, width) as uint8 HWC: the
    pipeline's classifier-free guided sampling, as the PyTorch twin renders (20 steps, guidance 7.5, empty negative
    prompt). Compiled once per run, whatever the prompts. conditioning(params, prompt_ids): the UNet's
    (encoder_hidden_states, added_cond_kwargs or None) for the pair (unconditional, conditional); by default the
    text encoder's last hidden state of the empty prompt and of the prompt (SD 1.x / 2.x)."""
    import jax
    import jax.numpy as jnp

    height, width = size
    empty_ids = models.tokenizer("", padding="max_length", max_length=models.tokenizer.model_max_length).input_ids
    empty_ids = np.asarray([empty_ids])
    scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    shape = (1, models.unet.config.in_channels, height // scale, width // scale)

    def prompt_and_empty_prompt(params, prompt_ids):
        text = models.text_encoder(prompt_ids, params=params["text_encoder"], train=False)[0]
        empty = models.text_encoder(empty_ids, params=params["text_encoder"], train=False)[0]
        return jnp.concatenate([empty, text]), None

    conditioning = conditioning or prompt_and_empty_prompt

    def render(params, prompt_ids, rng):
        encoder_hidden_states, added_cond_kwargs = conditioning(params, prompt_ids)
        state = models.scheduler.set_timesteps(models.scheduler_state, num_inference_steps, shape)
        if models.trailing:
            # Lin et al. 2023 sec. 3.3: with zero terminal SNR, sampling starts at the last timestep.
            train_steps = models.scheduler.config.num_train_timesteps
            timesteps = np.round(np.arange(train_steps, 0, -train_steps / num_inference_steps)).astype(np.int32) - 1
            state = state.replace(timesteps=jnp.asarray(timesteps))
        latents = jax.random.normal(rng, shape, jnp.float32) * state.init_noise_sigma

        def denoise(step, carry):
            latents, state = carry
            t = state.timesteps[step]
            model_input = models.scheduler.scale_model_input(state, jnp.concatenate([latents] * 2), t)
            timesteps = jnp.broadcast_to(t, (2,))
            variables = {"params": params["unet"]}
            model_pred = models.unet.apply(
                variables, model_input, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
            ).sample
            unconditional, conditional = jnp.split(model_pred, 2)
            # Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598).
            model_pred = unconditional + guidance_scale * (conditional - unconditional)
            return models.scheduler.step(state, model_pred, t, latents).to_tuple()

        latents, _ = jax.lax.fori_loop(0, num_inference_steps, denoise, (latents, state))
        latents = latents / models.vae.config.scaling_factor
        image = models.vae.apply({"params": params["vae"]}, latents, method=models.vae.decode).sample[0]
        return jnp.round(jnp.clip(image / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).astype(jnp.uint8)

    return jax.jit(render)


def render_validation_images(render, params, tokenize, prompts, seed):
    """One image per prompt, each from its own fixed seed, so grids compare across steps and across a resume.
    tokenize(prompt): the prompt's ids as render takes them: a tokenizer (ids [1, tokens]), or a function."""
    import jax

    images = []
    for index, prompt in enumerate(prompts):
        if callable(getattr(tokenize, "encode", None)):  # a tokenizer
            ids = tokenize(prompt, padding="max_length", max_length=tokenize.model_max_length, truncation=True)
            prompt_ids = np.asarray([ids.input_ids])
        else:
            prompt_ids = tokenize(prompt)
        rng = jax.random.PRNGKey(derive_seed(seed, VALIDATION_SEED_KEY, index) % (2**31))
        images.append(Image.fromarray(np.asarray(render(params, prompt_ids, rng))))
    return images


def save_validation_grid(images, prompts, output_dir, tag, global_step):
    """The images side by side, each with its prompt under it, in output_dir/validation/<tag>-step-<global_step>.png.
    Main process only."""
    grid = labelled_grid(images, prompts)
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid_path = os.path.join(folder, f"{tag}-step-{global_step:06d}.png")
    grid.save(grid_path)
    logger.info(f"Validation grid ({' | '.join(prompts)}): {grid_path}")


def stop_agreed(stop_request):
    """Whether any process received a stop signal, the same answer on every process at the same update."""
    import jax
    from jax.experimental import multihost_utils

    requested = int(stop_request.signal_name is not None)
    if jax.process_count() > 1:
        requested = int(np.max(multihost_utils.process_allgather(np.array(requested))))
    return bool(requested)


def check_finite(tree, loss, what, global_step):
    """Before anything is written: every array about to be written is finite, and so is the loss the new params give
    on the last batch (params can stay finite while a model's outputs do not). Otherwise stop, naming the step and
    the arrays; only then is anything written, so no file ever holds a diverged model."""
    import jax
    import jax.numpy as jnp

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    floating = [(path, leaf) for path, leaf in leaves if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)]
    bad = [jax.tree_util.keystr(path) for path, leaf in floating if not bool(jnp.isfinite(leaf).all())]
    if bad or not math.isfinite(loss):
        culprits = f"non-finite values in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}" if bad else ""
        culprits = culprits or f"a loss of {loss} on the last batch"
        raise FloatingPointError(
            f"{what} diverged at step {global_step} ({culprits}): stopping, nothing was written for this step. "
            "Lower --learning_rate, or clip gradients with --max_grad_norm"
        )


def final_save_failed(state, output_dir, global_step, run_metadata, err):
    """final_save_error for the Flax scripts: checkpoint-<final step> of the train state. Main process only, so only
    a one-process run can write it (Orbax writes with every process, and the others are past this point)."""
    import jax

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
    import jax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

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
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(checkpoint_path, TRAIN_STATE))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), state)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except Exception as err:
        raise UserError(f"{path} could not be loaded ({type(err).__name__}: {err})") from err


def inference_scheduler_config(config, args):
    """The saved scheduler's config for what this run trained: its prediction type, and with
    --rescale_betas_zero_snr the rescaled schedule sampled from its last timestep ("trailing", Lin et al. 2023 sec.
    3.3). A scheduler class that cannot rescale (PNDM, LMS) is replaced by DDIM, which the paper samples with."""
    import diffusers

    config = dict(config)
    if args.prediction_type is not None:
        config["prediction_type"] = args.prediction_type
    if args.rescale_betas_zero_snr:
        import diffusers

        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if (
            "rescale_betas_zero_snr"
            not in inspect.signature(getattr(diffusers, config["_class_name"]).__init__).parameters
        ):
            logger.info(f"--rescale_betas_zero_snr: {config['_class_name']} cannot rescale, saving a DDIMScheduler")
            # Latents are not confined to [-1, 1]: DDIM's default clipping of its x0 estimate would distort them.
            config.update(_class_name="DDIMScheduler", clip_sample=False)
    return config


def start_distributed(args):
    """Join the run's other processes, before JAX touches a device: at the coordinator and with the process count and
    index given, or found by JAX itself on TPU pods and the clusters it knows (--jax_distributed alone)."""
    import jax

    if not (args.jax_distributed or args.coordinator_address):
        return
    # CPU processes exchange arrays over gloo (JAX's CPU backend has no collectives of its own); GPUs and TPUs
    # ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout_seconds=args.heartbeat_timeout_seconds,
    )


def encode_text(text_encoders, text_encoder_params, input_ids):
    """The UNet's text conditioning from token ids [batch, encoders, tokens], the twin of torch_training.encode_text.
    SD 1.x / 2.x: the text encoder's last hidden state. SDXL: (both encoders' penultimate hidden states side by side,
    the second's pooled projection)."""
    import jax.numpy as jnp

    if len(text_encoders) == 1:
        return text_encoders[0](input_ids[:, 0], params=text_encoder_params[0], train=False)[0]
    hidden_states = []
    for index, (text_encoder, params) in enumerate(zip(text_encoders, text_encoder_params, strict=True)):
        output = text_encoder(input_ids[:, index], params=params, train=False, output_hidden_states=True)
        # SDXL reads the penultimate layer of each encoder (Podell et al. 2023, arXiv:2307.01952, sec. 2.1).
        hidden_states.append(output.hidden_states[-2])
    return jnp.concatenate(hidden_states, axis=-1), output[0]  # output[0]: the second encoder's text_embeds

"""The Flax twins launched as users launch them (`python script_flax.py ...`) on two host devices, with their outputs
loaded by the PyTorch environment."""

import filecmp
import json
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
from conftest import run_torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file
from test_long_prompts_flax import with_long_captions

import train_text_to_image_flax
from devkit.command_line import command_line, recorded_seed, without_seed
from devkit.running_launch import free_port
from sdtrain.config_file import RUN_CONFIG
from sdtrain.families import SDXL
from sdtrain.run_folder import RUN_MANIFEST


def checkpoint_names(output_dir):
    return sorted(
        (n for n in os.listdir(output_dir) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1])
    )


# ------------------------------------------------------------------------------------------- train_text_to_image_flax


T2I = "train_text_to_image_flax.py"


def saved_train_state(checkpoint):
    """A checkpoint's train state as saved, as nested dicts of arrays on this process's first device (read with
    Orbax, given the shapes and dtypes its metadata lists)."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(checkpoint, "train_state"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda array: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=device), saved)
        return checkpointer.restore(path, target)


def folder_bytes(folder):
    """Every file under folder with its bytes: to prove a run wrote nothing over it."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def model_card(output_dir):
    with open(os.path.join(output_dir, "README.md")) as f:
        return f.read()


def t2i_args(assets, output_dir, *extra):
    """The tiny run's command line; `extra` are more flags, written as on a shell command line."""
    paths = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", assets["images"]]
    fixed = "--resolution 64 --train_batch_size 1 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 3"
    return command_line(*paths, "--output_dir", output_dir, fixed, *extra)


def test_text_to_image_flax_trains_on_two_devices_and_pytorch_loads_it(launch, assets, tmp_path):
    out = str(tmp_path / "run")
    flags = "--max_train_steps 4 --checkpointing_steps 2 --checkpoints_total_limit 1 --gradient_checkpointing"
    recipe = (
        "--mixed_precision bf16 --snr_gamma 5.0 --prediction_type v_prediction --random_flip --rescale_betas_zero_snr"
        " --loss_type huber --debiased_estimation_loss --timestep_sampling logit_normal"
    )
    argv = t2i_args(assets, out, flags, recipe, "--validation_prompts 'a red circle' --save_single_file")
    result = launch.run(T2I, argv)
    assert "devices = 2" in result.output and "total batch = 2" in result.output
    assert checkpoint_names(out) == ["checkpoint-4"]
    # Rendered by DDIM from the last timestep, where alpha_bar is 0: a picture, not NaN (which would render black).
    assert os.listdir(os.path.join(out, "validation")) == ["final-step-000004.png"]
    assert np.asarray(Image.open(os.path.join(out, "validation", "final-step-000004.png"))).std() > 0
    assert not [n for n in os.listdir(out) if n.endswith((".partial", ".stale"))]
    # Its config.toml repeats it: the settings of its command line (whose --seed 3 is the seed the run used).
    repeated = train_text_to_image_flax.parse_args(["--config", os.path.join(out, RUN_CONFIG)])
    assert {**vars(repeated), "config": None} == vars(train_text_to_image_flax.parse_args(argv))
    # The frozen parts are the source's files, byte for byte; the UNet is the trained one.
    for component, name in [("text_encoder", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")]:
        assert filecmp.cmp(
            os.path.join(assets["pipeline"], component, name), os.path.join(out, component, name), shallow=False
        )
    trained = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    source = load_file(os.path.join(assets["pipeline"], "unet", "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == source.keys() and all(v.dtype == np.float32 for v in trained.values())
    assert max(np.abs(trained[k] - source[k]).max() for k in source) > 1e-4
    result = run_torch(f"""
import numpy as np, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({out!r})
assert pipe.scheduler.config.prediction_type == "v_prediction", pipe.scheduler.config.prediction_type
# Zero terminal SNR: the tiny pipeline's PNDM cannot rescale, so DDIM, on the rescaled schedule from the last timestep.
assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.rescale_betas_zero_snr
assert pipe.scheduler.config.clip_sample is False
pipe.scheduler.set_timesteps(10)
assert pipe.scheduler.timesteps[0] == 999 and pipe.scheduler.alphas_cumprod[-1] == 0
image = pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=torch.manual_seed(0)).images[0]
print("generated", image.size, float(np.asarray(image).std()) > 0)
# The single file (fp16 by default) holds the same pipeline, as diffusers' own single-file loader reads it.
path = {os.path.join(out, "run.safetensors")!r}
single = StableDiffusionPipeline.from_single_file(path, config={out!r}, safety_checker=None, local_files_only=True)
for name in ["unet", "vae", "text_encoder"]:
    ours, folder = getattr(single, name).state_dict(), getattr(pipe, name).state_dict()
    assert ours.keys() == folder.keys(), name
    assert all(torch.equal(ours[k], v.half().float()) for k, v in folder.items()), name
print("single file", single.scheduler.config.prediction_type)
""")
    assert "generated (64, 64) True" in result.stdout and "single file v_prediction" in result.stdout
    with safe_open(os.path.join(out, "run.safetensors"), "np") as f:
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1" and metadata["modelspec.prediction_type"] == "v"
    assert metadata["training.zero_terminal_snr"] == "true" and metadata["training.global_step"] == "4"
    # The model card train_text_to_image.py writes: the family's license, tags and pipeline class, the settings, the
    # final grid.
    card = model_card(out)
    assert card.startswith("---\nlicense: creativeml-openrail-m\n") and "- stable-diffusion\n- text-to-image\n" in card
    assert f"fine-tuned with train_text_to_image_flax.py on `{assets['images']}`" in card
    assert f'pipe = StableDiffusionPipeline.from_pretrained("{out}")' in card
    assert "| optimizer updates | 4 |" in card and "| mixed precision | bf16 |" in card
    assert "| learning rate | 0.001 (constant, 0 warmup) |" in card
    assert card.endswith("![validation](validation/final-step-000004.png)\n")


T2I_EXACT = (
    "--max_train_steps 6 --checkpointing_steps 3 --gradient_accumulation_steps 2 --lr_scheduler cosine"
    " --lr_warmup_steps 2 --random_flip --noise_offset 0.05 --input_perturbation 0.1 --snr_gamma 5.0"
    " --loss_type smooth_l1 --huber_schedule exponential --timestep_bias_strategy later --timestep_bias_multiplier 2"
)


T2I_EMA_VALIDATION = (
    "--use_ema --ema_validation both --validation_prompts 'a red circle' 'a blue square' --validation_epochs 2"
    " --validation_split 0.1 --validation_loss_steps 3"
)


def validation_losses(output_dir):
    """validation_loss.jsonl's records by step."""
    with open(os.path.join(output_dir, "validation_loss.jsonl")) as f:
        return {record["step"]: record for record in map(json.loads, f)}


def test_text_to_image_flax_exact_resume(launch, assets, tmp_path):
    """With EMA and validation grids of the EMA and raw weights: the resumed run saves the same EMA UNet, draws the
    same grids and the same validation_loss.jsonl (it starts with the whole run's, whose later lines it drops)."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    launch.run(T2I, t2i_args(assets, full, T2I_EXACT, T2I_EMA_VALIDATION))
    # 9 images (one held out) / global batch 2 = 5 batches, 2 updates of 2 per epoch: step 3 is in the middle of
    # epoch 1.
    assert checkpoint_names(full) == ["checkpoint-3", "checkpoint-6"]
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    shutil.copy(os.path.join(full, "validation_loss.jsonl"), resumed)
    result = launch.run(
        T2I, t2i_args(assets, resumed, T2I_EXACT, T2I_EMA_VALIDATION, "--resume_from_checkpoint latest")
    )
    assert "starting at 3" in result.output and "Held out 1 of 10 images" in result.output
    losses = validation_losses(full)
    assert sorted(losses) == [3, 6] and len(losses[6]["per_timestep_ema"]) == 8
    assert losses[6]["loss"] != losses[6]["loss_ema"]
    assert validation_losses(resumed) == losses
    a = load_file(os.path.join(full, "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(resumed, "unet", "diffusion_pytorch_model.safetensors"))
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    # The saved UNet is the checkpointed EMA (conv_in: Flax HWIO kernel, PyTorch OIHW weight), not the raw params.
    saved = saved_train_state(os.path.join(full, "checkpoint-6"))
    ema, raw = (np.transpose(np.asarray(saved[k]["conv_in"]["kernel"]), (3, 2, 0, 1)) for k in ("ema_params", "params"))
    assert np.abs(a["conv_in.weight"] - ema).max() <= 1e-6 < np.abs(a["conv_in.weight"] - raw).max()
    # Grids at the end of epoch 2 (step 4) and after saving (step 6): two 64 px images side by side, EMA and raw.
    grids = ["final-raw-step-000006.png", "final-step-000006.png"]
    grids += ["validation-raw-step-000004.png", "validation-step-000004.png"]
    for run in (full, resumed):
        assert sorted(os.listdir(os.path.join(run, "validation"))) == grids
    drawn = {  # the pictures, above their prompts
        (run, n): np.asarray(Image.open(os.path.join(run, "validation", n)))[:64]
        for run in (full, resumed)
        for n in grids
    }
    assert all(image.shape == (64, 128, 3) and image.std() > 0 for image in drawn.values())
    assert all(np.array_equal(drawn[full, n], drawn[resumed, n]) for n in grids), "fixed seeds, exact resume"
    assert not np.array_equal(drawn[full, grids[0]], drawn[full, grids[1]]), "the EMA and the raw weights differ"
    before = folder_bytes(os.path.join(resumed, "checkpoint-6"))
    result = launch.run(
        T2I, t2i_args(assets, resumed, T2I_EXACT, T2I_EMA_VALIDATION, "--resume_from_checkpoint latest")
    )
    assert "nothing to train" in result.output
    assert folder_bytes(os.path.join(resumed, "checkpoint-6")) == before


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--train_data_dir", "/nowhere/images", "--train_data_dir /nowhere/images: no such folder"),
        ("--caption_column", "prompt", "--caption_column 'prompt' is not a column"),
    ],
)
def test_text_to_image_flax_clear_errors(launch, assets, tmp_path, flag, value, message):
    out = tmp_path / "previous"
    out.mkdir()
    (out / RUN_MANIFEST).write_text("{}")  # an earlier run's folder: a later run may write into it
    (out / "model_index.json").write_text("{}")
    args = t2i_args(assets, str(out), "--max_train_steps 2")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    result = launch.run(T2I, args, check=False)
    assert result.returncode != 0 and message in result.output, result.output[-3000:]
    visible = [name for name in os.listdir(out) if not name.startswith(".")]  # the manifest, a run's lock
    assert visible == ["model_index.json"] and (out / "model_index.json").read_text() == "{}"


def test_text_to_image_flax_refuses_a_single_file_it_has_no_layout_for(launch, assets, tmp_path):
    """An SD UNet with a class embedding (as upscalers and unCLIP have) has no original single-file layout: refused
    before anything is loaded or written."""
    base = tmp_path / "class-embedding"
    shutil.copytree(assets["pipeline"], base)
    config = json.loads((base / "unet" / "config.json").read_text())
    (base / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    out = tmp_path / "run"
    args = t2i_args(assets, str(out), "--max_train_steps 2 --save_single_file")
    args[args.index("--pretrained_model_name_or_path") + 1] = str(base)
    result = launch.run(T2I, args, check=False)
    assert result.returncode != 0, result.output[-3000:]
    assert "--save_single_file: no original Stable Diffusion single-file layout" in result.output
    assert "class_embed_type='timestep'" in result.output
    assert not out.exists()  # refused before training: nothing written, not even the folder


def test_text_to_image_flax_refuses_a_resolution_its_unet_cannot_use(launch, assets, tmp_path):
    """--resolution 40 trains in PyTorch (its UNet upsamples to an odd skip connection), not in Flax: 5x5 latents halve
    to 3x3 and come back 6x6. Refused from the configs, before any weights load or anything is written."""
    out = tmp_path / "run"
    args = t2i_args(assets, str(out), "--max_train_steps 1")
    args[args.index("--resolution") + 1] = "40"
    result = launch.run("train_text_to_image_flax.py", args, check=False)
    assert result.returncode != 0, result.output[-3000:]
    assert "--resolution 40: 40 is not a multiple of 16" in result.output and "32 or 48" in result.output
    assert "Examples =" not in result.output
    written = [name for name in os.listdir(out) if not name.startswith(".training.lock")] if out.exists() else []
    assert written == []


def start_two_processes(launch, script, args):
    """The script as two JAX processes of one CPU device each, meeting at a coordinator on 127.0.0.1, as two hosts
    of a pod or two GPU machines run it."""
    address = f"127.0.0.1:{free_port()}"
    return [
        launch.start(
            script, args + command_line(f"--coordinator_address {address} --num_processes 2 --process_id {i}"), 1
        )
        for i in range(2)
    ]


def test_a_dead_process_makes_the_other_exit_in_bounded_time(launch, assets, tmp_path):
    """A host that dies (SIGKILL, as a lost machine) mid-run: the other process leaves its collective and exits with
    an error naming the dead task once JAX's coordination service misses its heartbeats (--heartbeat_timeout_seconds,
    here 10), instead of hanging until the job's time limit; nothing half-written is visible."""
    out = tmp_path / "run"
    flags = "--max_train_steps 1000 --logging_steps 1 --heartbeat_timeout_seconds 10"
    processes = start_two_processes(launch, T2I, t2i_args(assets, out, flags))
    processes[0].wait_for(r"step 2: loss")
    killed = time.monotonic()
    processes[1].send(signal.SIGKILL)
    result = processes[0].finish(timeout=300)
    waited = time.monotonic() - killed
    print(f"the surviving process exited {waited:.0f} s after the other was killed")
    assert result.returncode != 0 and waited < 60
    assert "stopped sending heartbeats" in result.output and "1" in result.output.split("stopped sending heartbeats")[1]
    assert not os.path.exists(out / "model_index.json") and (not os.path.exists(out) or checkpoint_names(out) == [])


def test_text_to_image_flax_as_two_processes_matches_one_process_with_two_devices(launch, assets, tmp_path):
    """Two JAX processes of one CPU device each (a coordinator on 127.0.0.1, gloo collectives), as two hosts of a pod
    run: the same checkpoints and the same final UNet as one process with two devices, written by process 0 alone."""
    flags = "--max_train_steps 3 --checkpointing_steps 2 --random_flip --snr_gamma 5.0 --validation_split 0.2"
    one = tmp_path / "one"
    launch.run(T2I, t2i_args(assets, one, flags))
    two = tmp_path / "two"
    results = [process.finish() for process in start_two_processes(launch, T2I, t2i_args(assets, two, flags))]
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    assert "devices = 2" in results[0].output and "total batch = 2" in results[0].output
    assert "Saved the pipeline" in results[0].output and "Saved" not in results[1].output
    assert checkpoint_names(two) == checkpoint_names(one) == ["checkpoint-2"]
    # Orbax spreads the replicated arrays over the processes: each writes its own files, each array once.
    written = os.listdir(os.path.join(two, "checkpoint-2", "train_state"))
    assert sorted(name for name in written if name.startswith("ocdbt.process_")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    name = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    single, multi = load_file(os.path.join(one, name)), load_file(os.path.join(two, name))
    # Reduction order across processes may differ from across devices; measured: equal.
    assert max(np.abs(single[k] - multi[k]).max() for k in single) <= 1e-6
    # The held-out loss (2 images, at the end): the same images, timesteps and noise on any process count.
    (final,) = validation_losses(one).values()
    assert final["step"] == 3 and np.allclose(
        validation_losses(two)[3]["per_timestep"], final["per_timestep"], rtol=1e-5
    )
    # The 2-process checkpoint resumed by one process with two devices continues the same run: every draw is keyed by
    # the step and made over the global batch, whichever process holds which rows.
    elastic = tmp_path / "elastic"
    shutil.copytree(os.path.join(two, "checkpoint-2"), elastic / "checkpoint-2")
    result = launch.run(T2I, t2i_args(assets, elastic, flags, "--resume_from_checkpoint latest"))
    assert f"Resuming from {elastic / 'checkpoint-2'}" in result.output and "batch layout changed" not in result.output
    resumed = load_file(os.path.join(elastic, name))
    assert max(np.abs(single[k] - resumed[k]).max() for k in single) <= 1e-6


# --------------------------------------------------------------------------------------------- textual_inversion_flax


TI = "textual_inversion_flax.py"


def ti_args(assets, output_dir, *extra):
    """The tiny run's command line; `extra` are more flags, written as on a shell command line."""
    paths = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", assets["concept"]]
    token = "--placeholder_token <blob> --initializer_token circle --resolution 64 --repeats 3 --train_batch_size 1"
    return command_line(
        *paths, "--output_dir", output_dir, token, "--learning_rate 5e-2 --lr_warmup_steps 0 --seed 4", *extra
    )


def test_textual_inversion_flax_embeddings_load_in_pytorch(launch, assets, tmp_path):
    out = str(tmp_path / "run")
    flags = "--num_vectors 2 --max_train_steps 4 --save_steps 2 --checkpointing_steps 2 --snr_gamma 5.0"
    result = launch.run(TI, ti_args(assets, out, flags, "--gradient_checkpointing"))
    assert "devices = 2" in result.output
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(n for n in os.listdir(out) if n.startswith("learned_embeds")) == [
        "learned_embeds-steps-2.safetensors",
        "learned_embeds-steps-4.safetensors",
        "learned_embeds.safetensors",
    ]
    embeds = load_file(os.path.join(out, "learned_embeds.safetensors"))
    assert list(embeds) == ["<blob>"] and embeds["<blob>"].shape == (2, 32) and embeds["<blob>"].dtype == np.float32
    assert load_file(os.path.join(out, "blob.safetensors")).keys() == {"emb_params"}
    assert np.array_equal(load_file(os.path.join(out, "blob.safetensors"))["emb_params"], embeds["<blob>"])
    result = run_torch(f"""
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({assets["pipeline"]!r})
initial = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("circle</w>")].clone()
pipe.load_textual_inversion({os.path.join(out, "learned_embeds.safetensors")!r})
ids = pipe.tokenizer.convert_tokens_to_ids(["<blob>", "<blob>_1"])
rows = pipe.text_encoder.get_input_embeddings().weight[ids]
print("moved", bool((rows - initial).abs().max() > 1e-3))
image = pipe("a photo of a <blob>", num_inference_steps=2, height=64, width=64).images[0]
print("generated", image.size)
""")
    assert "moved True" in result.stdout and "generated (64, 64)" in result.stdout
    card = model_card(out)
    assert card.startswith("---\nlicense: creativeml-openrail-m\n") and "- textual_inversion\n" in card
    assert f'pipe.load_textual_inversion("{out}/learned_embeds.safetensors")' in card
    assert "Embedding of `<blob>` (2 vector(s))" in card and "4 optimizer updates" in card


def test_textual_inversion_flax_as_two_processes_matches_one_process_and_resumes_on_it(launch, assets, tmp_path):
    """Textual inversion as two JAX processes of one CPU device each: the same checkpoints and embedding as one process
    with two devices, written by process 0 alone; their mid-epoch checkpoint resumed by one process ends there too."""
    flags = "--num_vectors 2 --max_train_steps 5 --checkpointing_steps 3 --embedding_format diffusers"
    one, two, elastic = tmp_path / "one", tmp_path / "two", tmp_path / "elastic"
    # The two processes start without --seed: process 0's draw must be both processes' seed, which the one-process
    # run then takes from their checkpoint. Had process 1 drawn its own, it would shuffle and draw differently.
    two_processes = start_two_processes(launch, TI, without_seed(ti_args(assets, two, flags)))
    results = [process.finish() for process in two_processes]
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    seed = f"--seed {recorded_seed(two / 'checkpoint-3')}"
    launch.run(TI, ti_args(assets, one, flags, seed))
    assert "devices = 2" in results[0].output and "Saved" in results[0].output and "Saved" not in results[1].output
    assert checkpoint_names(two) == checkpoint_names(one) == ["checkpoint-3"]
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    reference = load_file(os.path.join(one, "learned_embeds.safetensors"))["<blob>"]
    assert np.abs(load_file(os.path.join(two, "learned_embeds.safetensors"))["<blob>"] - reference).max() <= 1e-6
    shutil.copytree(os.path.join(two, "checkpoint-3"), elastic / "checkpoint-3")
    result = launch.run(TI, ti_args(assets, elastic, flags, "--resume_from_checkpoint latest", seed))
    assert "starting at 3" in result.output and "batch layout changed" not in result.output
    assert np.abs(load_file(os.path.join(elastic, "learned_embeds.safetensors"))["<blob>"] - reference).max() <= 1e-6


TI_EXACT = "--num_vectors 2 --max_train_steps 6 --checkpointing_steps 3 --lr_scheduler linear --lr_warmup_steps 1"
TI_EXACT += " --center_crop"


TI_VALIDATION = "--validation_prompt 'a <blob> on a table' --num_validation_images 2 --validation_steps 4"


def test_textual_inversion_flax_exact_resume(launch, assets, tmp_path):
    """With validation grids: the resumed run learns the same embedding and draws the same grids."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    launch.run(TI, ti_args(assets, full, TI_EXACT, TI_VALIDATION))
    # 4 images x 3 repeats / global batch 2 = 6 updates per epoch: step 3 is mid-epoch.
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    launch.run(TI, ti_args(assets, resumed, TI_EXACT, TI_VALIDATION, "--resume_from_checkpoint checkpoint-3"))
    a = load_file(os.path.join(full, "learned_embeds.safetensors"))["<blob>"]
    b = load_file(os.path.join(resumed, "learned_embeds.safetensors"))["<blob>"]
    assert np.abs(a - b).max() <= 1e-6
    # Two 64 px images from their own seeds, at step 4 and after saving (step 6), the same in both runs.
    grids = ["final-step-000006.png", "validation-step-000004.png"]
    for name in grids:
        images = [np.asarray(Image.open(os.path.join(run, "validation", name)))[:64] for run in (full, resumed)]
        assert images[0].shape == (64, 128, 3) and np.array_equal(*images)  # the pictures, above their prompts
        assert not np.array_equal(images[0][:, :64], images[0][:, 64:]), "each image has its own seed"
    assert sorted(os.listdir(os.path.join(full, "validation"))) == grids


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--initializer_token", "squares", "--initializer_token 'squares' must be exactly one token"),
        ("--placeholder_token", "red", "--placeholder_token red: 'red' already exists in the tokenizer (as 'red</w>')"),
        ("--train_data_dir", "/nowhere/concept", "--train_data_dir /nowhere/concept: no such folder"),
    ],
)
def test_textual_inversion_flax_clear_errors(launch, assets, tmp_path, flag, value, message):
    out = tmp_path / "previous"
    out.mkdir()
    (out / RUN_MANIFEST).write_text("{}")  # an earlier run's folder: a later run may write into it
    (out / "learned_embeds.safetensors").write_bytes(b"earlier")
    args = ti_args(assets, str(out), "--max_train_steps 2")
    args[args.index(flag) + 1] = value
    result = launch.run(TI, args, check=False)
    assert result.returncode != 0 and message in result.output, result.output[-3000:]
    visible = [name for name in os.listdir(out) if not name.startswith(".")]  # the manifest, a run's lock
    assert visible == ["learned_embeds.safetensors"] and (out / "learned_embeds.safetensors").read_bytes() == b"earlier"


def test_flax_refused_starts_write_nothing_and_a_folder_of_user_files_is_refused(launch, assets, tmp_path):
    """The Flax twins take the output folder as the PyTorch scripts do: a start refused before training (here a
    missing --train_data_dir, found after the models load) leaves no folder at all; a folder of someone's files is
    refused, naming it, before any model loads, and is left byte for byte as it was."""
    out = tmp_path / "run"
    args = t2i_args(assets, str(out), "--max_train_steps 2")
    args[args.index("--train_data_dir") + 1] = "/nowhere/images"
    result = launch.run(T2I, args, check=False)
    assert result.returncode != 0 and "--train_data_dir /nowhere/images: no such folder" in result.output
    assert not out.exists(), os.listdir(out)
    mine = tmp_path / "mine"
    (mine / "unet").mkdir(parents=True)
    (mine / "unet" / "important.bin").write_text("keep")
    (mine / "README.md").write_text("mine")
    before = folder_bytes(mine)
    result = launch.run(TI, ti_args(assets, str(mine), "--max_train_steps 2"), check=False)
    assert result.returncode != 0
    assert f"--output_dir {mine} holds files no run of these scripts wrote (README.md, unet)" in result.output
    assert folder_bytes(mine) == before and sorted(os.listdir(mine)) == ["README.md", "unet"]


def test_textual_inversion_flax_preempted_resumes_to_the_same_embedding(launch, assets, tmp_path):
    """SIGTERM, sent twice to the process group: a checkpoint at the step reached, exit code 75; the resumed run is
    stopped again by Ctrl-C (SIGINT to the group): a checkpoint at its step, exit code 130; the second resume ends with
    the embedding of a run never stopped."""
    import signal

    full, out = str(tmp_path / "full"), str(tmp_path / "run")
    flags = "--num_vectors 2 --max_train_steps 16 --checkpointing_steps 100 --save_steps 100 --logging_steps 1"
    launch.run(TI, ti_args(assets, full, flags))
    run = launch.start(TI, ti_args(assets, out, flags))
    run.wait_for(r"step 2: loss")
    run.send(signal.SIGTERM)
    run.send(signal.SIGTERM)
    result = run.finish()
    found = re.search(r"SIGTERM received: stopped after step (\d+) with checkpoint-(\d+) written", result.output)
    assert found and result.returncode == 75, result.output[-3000:]
    step = int(found.group(1))
    assert checkpoint_names(out) == [f"checkpoint-{step}"] and step < 16
    run = launch.start(TI, ti_args(assets, out, flags, "--resume_from_checkpoint latest"))
    run.wait_for(rf"step {step + 2}: loss")
    run.send(signal.SIGINT)
    result = run.finish()
    found = re.search(r"SIGINT received: stopped after step (\d+) with checkpoint-(\d+) written", result.output)
    assert found and result.returncode == 130, result.output[-3000:]
    second = int(found.group(1))
    assert checkpoint_names(out) == [f"checkpoint-{step}", f"checkpoint-{second}"] and second < 16
    launch.run(TI, ti_args(assets, out, flags, "--resume_from_checkpoint latest"))
    a = load_file(os.path.join(full, "learned_embeds.safetensors"))["<blob>"]
    b = load_file(os.path.join(out, "learned_embeds.safetensors"))["<blob>"]
    assert np.abs(a - b).max() <= 1e-6


def test_a_failed_final_save_keeps_the_trained_steps_in_a_checkpoint(launch, assets, tmp_path):
    """The single file cannot take its name (a folder holds it), so the final save fails after the pipeline was
    written, 1 update after checkpoint-2, as a full disk makes it fail in tests/test_reliability.py (a file-size limit
    cannot single out the final save here: Orbax appends a checkpoint's arrays into files of unpredictable sizes)."""
    out = tmp_path / "run"
    (out / "run.safetensors").mkdir(parents=True)
    (out / RUN_MANIFEST).write_text("{}")  # an earlier run's folder: a later run may write into it
    flags = "--max_train_steps 3 --checkpointing_steps 2 --save_single_file"
    result = launch.run(T2I, t2i_args(assets, str(out), flags), check=False)
    assert result.returncode != 0 and f"the final save into {out} failed" in result.output, result.output[-3000:]
    assert f"is in {out / 'checkpoint-3'}" in result.output and "GiB free there" in result.output
    assert checkpoint_names(str(out)) == ["checkpoint-2", "checkpoint-3"]
    assert not [name for name in os.listdir(out) if name.endswith(".partial")], "the unfinished save is removed"
    (out / "run.safetensors").rmdir()
    resumed = launch.run(T2I, t2i_args(assets, str(out), flags, "--resume_from_checkpoint latest"))
    assert "starting at 3" in resumed.output and "nothing to train" in resumed.output
    assert (out / "run.safetensors").is_file()


def test_flax_writes_no_diverged_embedding_and_skips_a_damaged_checkpoint(launch, assets, tmp_path):
    # 1e39: inf rows; 1e6: finite rows of norm ~1e6, 100 times past the vocabulary's longest (check_embedding_scale).
    for learning_rate, message in [("1e39", "diverged at step 1 (non-finite"), ("1e6", "has norm")]:
        out = tmp_path / f"diverged-{learning_rate}"
        flags = f"--learning_rate {learning_rate} --max_train_steps 3 --checkpointing_steps 1 --save_steps 1"
        result = launch.run(TI, ti_args(assets, str(out), flags), check=False)
        assert result.returncode != 0 and "the embedding diverged at step 1" in result.output, result.output[-3000:]
        assert message in result.output, result.output[-3000:]
        assert not os.path.exists(out), f"a diverged run left {os.listdir(out)}"
    out = str(tmp_path / "damaged")
    launch.run(TI, ti_args(assets, out, "--max_train_steps 4 --checkpointing_steps 2"))
    files = [
        os.path.join(root, name) for root, _, names in os.walk(os.path.join(out, "checkpoint-4")) for name in names
    ]
    state = max(files, key=os.path.getsize)  # the largest file of the Orbax train state: the weights
    assert f"{os.sep}train_state{os.sep}" in state
    open(state, "r+b").truncate(os.path.getsize(state) // 2)
    result = launch.run(TI, ti_args(assets, out, "--max_train_steps 5 --resume_from_checkpoint latest"))
    assert f"skipping checkpoint-4: {state} is damaged" in result.output and "starting at 2" in result.output


def test_text_to_image_flax_cached_training_logs_the_same_losses(launch, assets, tmp_path):
    """--cache_latents (both flips) and --cache_text_embeddings (with dropped captions): the VAE and text encoder leave
    the step, and every update logs the loss of the plain run and ends at its weights."""
    plain, cached = str(tmp_path / "plain"), str(tmp_path / "cached")
    flags = "--max_train_steps 3 --logging_steps 1 --center_crop --random_flip --proportion_empty_prompts 0.3"
    outputs = [launch.run(T2I, t2i_args(assets, plain, flags)).output]
    outputs.append(launch.run(T2I, t2i_args(assets, cached, flags, "--cache_latents --cache_text_embeddings")).output)
    assert "Cached latents: 10 images x 2 views" in outputs[1] and "Cached text embeddings: (" in outputs[1]
    plain_losses, cached_losses = ([float(x) for x in re.findall(r"step \d+: loss=([^,]+),", o)] for o in outputs)
    assert len(plain_losses) == 3 and cached_losses == pytest.approx(plain_losses, rel=1e-3)  # logged to 4 digits
    a = load_file(os.path.join(plain, "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(cached, "unet", "diffusion_pytorch_model.safetensors"))
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-5


# ------------------------------------------------------------------------------------------------------------ SDXL


# 4 of the images, global batch 2: 2 updates per epoch, so step 2 ends epoch 0 (a mid-run grid) and is checkpointed.
SDXL_FLAGS = (
    "--max_train_samples 4 --max_train_steps 4 --checkpointing_steps 2 --mixed_precision bf16 --random_flip"
    " --proportion_empty_prompts 0.3 --snr_gamma 5.0 --validation_prompts 'a red circle' --validation_epochs 1"
)


def sdxl_args(assets, pipeline, output_dir, *extra):
    args = t2i_args(assets, output_dir, SDXL_FLAGS, *extra)
    args[args.index("--pretrained_model_name_or_path") + 1] = pipeline
    return args


def test_text_to_image_flax_fine_tunes_sdxl_resumes_exactly_and_pytorch_samples_it(
    launch, assets, sdxl_pipeline, tmp_path
):
    """Flips, caption dropout and Min-SNR under bf16: the SDXL VAE stays fp32 (force_upcast); a run resumed from its
    step-2 checkpoint ends at the same weights and draws the same final grid; StableDiffusionXLPipeline loads the
    saved folder and samples a finite image; the UNet (its add_embedding too) trained, the text encoders did not."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    result = launch.run(T2I, sdxl_args(assets, sdxl_pipeline, full))
    assert "VAE in float32 (its config asks for it: force_upcast)" in result.output
    # The converter's warning that add_embedding is "newly initialized" would be false: it is copied in after.
    assert "newly initialized" not in result.output and "Saved the pipeline" in result.output
    card = model_card(full)
    assert card.startswith("---\nlicense: openrail++\n") and "- stable-diffusion-xl\n" in card
    assert f'pipe = StableDiffusionXLPipeline.from_pretrained("{full}")' in card
    assert card.endswith("![validation](validation/final-step-000004.png)\n")
    assert checkpoint_names(full) == ["checkpoint-2", "checkpoint-4"]
    grids = ["final-step-000004.png", "validation-step-000002.png"]
    assert sorted(os.listdir(os.path.join(full, "validation"))) == grids
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = launch.run(T2I, sdxl_args(assets, sdxl_pipeline, resumed, "--resume_from_checkpoint latest"))
    assert "starting at 2" in result.output
    unet_file = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    a, b = (load_file(os.path.join(run, unet_file)) for run in (full, resumed))
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    final = [np.asarray(Image.open(os.path.join(run, "validation", grids[0])))[:64] for run in (full, resumed)]
    assert final[0].shape == (64, 64, 3) and final[0].std() > 0 and np.array_equal(*final)
    # The saved add_embedding is the trained one (diffusers' Flax-to-PyTorch converter would leave it random).
    trained = saved_train_state(os.path.join(full, "checkpoint-4"))["params"]["add_embedding"]
    for layer in ("linear_1", "linear_2"):
        assert np.abs(a[f"add_embedding.{layer}.weight"] - np.asarray(trained[layer]["kernel"]).T).max() <= 1e-6
    source = load_file(os.path.join(sdxl_pipeline, unet_file))
    assert a.keys() == source.keys()
    assert np.abs(a["add_embedding.linear_1.weight"] - source["add_embedding.linear_1.weight"]).max() > 1e-4
    for component in ("text_encoder", "text_encoder_2"):
        name = os.path.join(component, "model.safetensors")
        assert filecmp.cmp(os.path.join(sdxl_pipeline, name), os.path.join(full, name), shallow=False)
    result = run_torch(f"""
import numpy as np, torch
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained({full!r})
source = StableDiffusionXLPipeline.from_pretrained({sdxl_pipeline!r})
for name in ["text_encoder", "text_encoder_2", "vae"]:
    ours, theirs = getattr(pipe, name).state_dict(), getattr(source, name).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
image = pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=torch.manual_seed(0),
             output_type="np").images[0]
print("sampled", image.shape, bool(np.isfinite(image).all()), float(image.std()) > 0)
""")
    assert "sampled (64, 64, 3) True True" in result.stdout, result.stdout


def test_text_to_image_flax_writes_the_sdxl_single_file_diffusers_reads(launch, assets, tmp_path):
    """--save_single_file on SDXL from the Flax twin: the SGM layout train_text_to_image.py writes, read back by
    diffusers' StableDiffusionXLPipeline.from_single_file equal to the saved folder (fp16 by default). The text
    encoders differ in width (devkit/tiny_sd.py TINY_SDXL_TWO_WIDTHS), as diffusers' loader tells them apart by it."""
    base = str(tmp_path / "base")
    run_torch(f"from devkit import tiny_sd; tiny_sd.build_sdxl_pipeline({base!r}, tiny_sd.TINY_SDXL_TWO_WIDTHS, 64)")
    out = str(tmp_path / "run")
    flags = "--max_train_samples 2 --max_train_steps 1 --checkpointing_steps 10 --save_single_file"
    # Its captions are 200 tokens longer, which --max_token_length 225 encodes whole in both encoders (issue 32).
    args = t2i_args(assets, out, flags, "--max_token_length 225")
    args[args.index("--pretrained_model_name_or_path") + 1] = base
    args[args.index("--train_data_dir") + 1] = with_long_captions(assets["images"], tmp_path / "long_captions")
    output = launch.run(T2I, args).output
    assert "in 3 chunks of 77: 231 positions" in output and "captions are longer" not in output
    result = run_torch(f"""
import torch
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained({out!r})
single = StableDiffusionXLPipeline.from_single_file({os.path.join(out, "run.safetensors")!r}, config={out!r},
                                                    local_files_only=True)
for name in ["unet", "vae", "text_encoder", "text_encoder_2"]:
    ours, folder = getattr(single, name).state_dict(), getattr(pipe, name).state_dict()
    assert ours.keys() == folder.keys(), name
    assert all(torch.equal(ours[k], v.half().float()) for k, v in folder.items()), name
print("single file equal")
""")
    assert "single file equal" in result.stdout
    with safe_open(os.path.join(out, "run.safetensors"), "np") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_text_to_image_flax_sdxl_size_conditioning_of_a_known_image(sdxl_pipeline, tmp_path):
    """time_ids = (original height, width, crop top, left, target height, width) in the resized image's pixels; a
    mirrored image's left offset is measured from the other side; an empty caption is marked for zero
    conditioning; input_ids hold a row for each of the two tokenizers."""
    import datasets
    from transformers import CLIPTokenizerFast

    import train_text_to_image_flax as t2i

    path = str(tmp_path / "wide.png")
    Image.new("RGB", (100, 50), (200, 30, 30)).save(path)
    rows = datasets.Dataset.from_dict({"image": [path], "text": [""]})
    tokenizers = [CLIPTokenizerFast.from_pretrained(sdxl_pipeline, subfolder=n) for n in ("tokenizer", "tokenizer_2")]

    def dataset(*flags):
        args = t2i.parse_args(
            command_line("--pretrained_model_name_or_path p --train_data_dir d --resolution 64", *flags)
        )
        data = t2i.ImageCaptionDataset(rows, tokenizers, args, seed=0, family=SDXL)
        data.image_sizes = [(100, 50)]
        return data

    example = dataset("--center_crop")[(0, 0)]
    assert example["time_ids"].tolist() == [50, 100, 0, 32, 64, 64]  # 100x50 -> 128x64, the middle 64 columns
    assert example["caption_kept"] == 0 and example["input_ids"].shape == (2, 77)
    random, flips = dataset("--random_flip"), set()
    for epoch in range(8):  # random crops, both flips
        pixels, box, flipped = random.transform(
            Image.open(path).convert("RGB"), 0, np.random.default_rng([0, epoch, 0])
        )
        example = random[(epoch, 0)]
        left = box[1][1]
        assert np.array_equal(example["pixel_values"], pixels) and pixels.shape == (3, 64, 64)
        expected_left = 128 - left - 64 if flipped else left
        assert example["time_ids"].tolist() == [50, 100, 0, expected_left, 64, 64]
        flips.add(flipped)
    assert flips == {True, False}


def sdxl_ti_args(assets, sdxl_pipeline, output_dir, *extra):
    """The tiny textual-inversion run's command line on the tiny SDXL pipeline."""
    args = ti_args(assets, output_dir, "--num_vectors 2", *extra)
    args[args.index("--pretrained_model_name_or_path") + 1] = sdxl_pipeline
    return args


def test_sdxl_textual_inversion_flax_saves_both_tables_and_pytorch_loads_them(launch, assets, sdxl_pipeline, tmp_path):
    """Both encoders' rows, as diffusers (learned_embeds, learned_embeds_2) and the UIs (clip_l, clip_g) load them;
    the VAE stays fp32 (force_upcast); validation images are rendered through both encoders; the model card loads
    both files; PyTorch's SDXL pipeline loads both files, moves both tables' rows off the initializer, encodes a prompt
    and samples a finite image."""
    out = str(tmp_path / "run")
    flags = "--max_train_steps 2 --save_steps 2 --checkpointing_steps 2 --mixed_precision bf16 --center_crop"
    result = launch.run(TI, sdxl_ti_args(assets, sdxl_pipeline, out, flags, "--validation_prompt 'a <blob>'"))
    assert "VAE in float32 (its config asks for it: force_upcast)" in result.output
    assert os.listdir(os.path.join(out, "validation")) == ["final-step-000002.png"]
    grid = np.asarray(Image.open(os.path.join(out, "validation", "final-step-000002.png")))
    assert grid.shape[1] == 4 * 64 and grid[:64].std() > 0  # the 4 images side by side, their prompt under them
    card = model_card(out)
    assert card.startswith("---\nlicense: openrail++\n") and "from diffusers import StableDiffusionXLPipeline" in card
    for path, encoder, tokenizer in [
        ("learned_embeds", "text_encoder", "tokenizer"),
        ("learned_embeds_2", "text_encoder_2", "tokenizer_2"),
    ]:
        assert (
            f'pipe.load_textual_inversion("{out}/{path}.safetensors", token="<blob>", text_encoder=pipe.{encoder}, '
            f"tokenizer=pipe.{tokenizer})"
        ) in card
    assert card.endswith("![validation](validation/final-step-000002.png)\n")
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == [
        "blob.safetensors",
        "learned_embeds-steps-2.safetensors",
        "learned_embeds.safetensors",
        "learned_embeds_2-steps-2.safetensors",
        "learned_embeds_2.safetensors",
    ]
    rows = [load_file(os.path.join(out, f"{name}.safetensors")) for name in ("learned_embeds", "learned_embeds_2")]
    for embeds in rows:
        assert list(embeds) == ["<blob>"] and embeds["<blob>"].shape == (2, 32)
        assert embeds["<blob>"].dtype == np.float32
    ui = load_file(os.path.join(out, "blob.safetensors"))
    assert ui.keys() == {"clip_l", "clip_g"}
    assert np.array_equal(ui["clip_l"], rows[0]["<blob>"]) and np.array_equal(ui["clip_g"], rows[1]["<blob>"])
    assert np.array_equal(load_file(os.path.join(out, "learned_embeds_2-steps-2.safetensors"))["<blob>"], ui["clip_g"])
    result = run_torch(f"""
import torch
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained({sdxl_pipeline!r})
pairs = [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]
initial = [e.get_input_embeddings().weight[t.convert_tokens_to_ids("circle</w>")].clone() for e, t in pairs]
for name, (text_encoder, tokenizer) in zip(["learned_embeds", "learned_embeds_2"], pairs):
    path = {out!r} + "/" + name + ".safetensors"
    pipe.load_textual_inversion(path, token="<blob>", text_encoder=text_encoder, tokenizer=tokenizer)
for (text_encoder, tokenizer), start in zip(pairs, initial):
    ids = tokenizer.convert_tokens_to_ids(["<blob>", "<blob>_1"])
    rows = text_encoder.get_input_embeddings().weight[ids]
    print("moved", bool((rows - start).abs().amax(dim=1).min() > 1e-3))  # every new row
embeds, _, pooled, _ = pipe.encode_prompt("a photo of a <blob>", device="cpu", do_classifier_free_guidance=False)
print("encoded", tuple(embeds.shape), tuple(pooled.shape), bool(torch.isfinite(embeds).all()))
image = pipe("a photo of a <blob>", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
print("generated", image.shape, bool(torch.isfinite(torch.from_numpy(image)).all()))
""")
    assert result.stdout.count("moved True") == 2, result.stdout
    assert "encoded (1, 77, 64) (1, 32) True" in result.stdout and "generated (64, 64, 3) True" in result.stdout


def test_sdxl_textual_inversion_flax_exact_resume(launch, assets, sdxl_pipeline, tmp_path):
    """Stopped at step 2 and resumed to 4, both encoders' rows equal the uninterrupted run's."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    flags = "--max_train_steps 4 --checkpointing_steps 2 --lr_scheduler linear --lr_warmup_steps 1"
    launch.run(TI, sdxl_ti_args(assets, sdxl_pipeline, full, flags))
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = launch.run(
        TI, sdxl_ti_args(assets, sdxl_pipeline, resumed, flags, "--resume_from_checkpoint checkpoint-2")
    )
    assert "starting at 2" in result.output
    for name in ("learned_embeds", "learned_embeds_2"):
        a = load_file(os.path.join(full, f"{name}.safetensors"))["<blob>"]
        b = load_file(os.path.join(resumed, f"{name}.safetensors"))["<blob>"]
        assert np.abs(a - b).max() <= 1e-6, name

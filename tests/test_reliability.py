"""Nothing bad is ever saved, launched as users launch the scripts: diverged models, unreadable or odd images, a
second run into the same folder, damaged or leftover checkpoints, a crash during the final swap, a preemption
signal, a full disk. Each test here failed on the scripts before these guards existed."""

import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import BIN, OFFLINE_ENV, REPO
from helpers import checkpoint_names, load_state_dict, max_abs_diff
from PIL import Image
from test_textual_inversion import SCRIPT as TI_SCRIPT
from test_textual_inversion import base_args as ti_args
from test_train_text_to_image import SCRIPT, base_args

import train_text_to_image
from devkit import tiny_sd
from sdtrain import captions, data_config, images, run_folder
from sdtrain.cli import UserError
from sdtrain.cli import run as run_main
from sdtrain.preemption import StopRequest
from sdtrain.torch import checkpoints


def concept_folder(tmp_path):
    return tiny_sd.write_concept_folder(str(tmp_path / "concept"), num_images=4, size=72)


# ------------------------------------------------------------------------------------------------ diverged models


@pytest.mark.parametrize(
    "flags",
    [
        "--learning_rate 1e6 --max_train_steps 1 --checkpointing_steps 100",  # finite weights, NaN outputs
        "--learning_rate 1e39 --max_train_steps 3 --checkpointing_steps 1",  # non-finite weights
    ],
)
def test_a_diverged_unet_is_never_written(launch, assets, tmp_path, flags):
    out = tmp_path / "run"
    result = launch.accelerate(SCRIPT, base_args(assets, str(out), flags), check=False)
    assert result.returncode != 0 and "the UNet diverged at step 1" in result.output, result.output[-3000:]
    # The folder it made is removed again: it held nothing but the run's bookkeeping and logs.
    assert not os.path.exists(out), f"a diverged run left {os.listdir(out)}"


@pytest.mark.parametrize(
    "learning_rate,message",
    [
        ("1e39", r"the embedding diverged at step 1 \(non-finite values"),
        # Finite rows of norm ~1e6 after one update (AdamW moves every coordinate by about the learning rate), that
        # checkpoints used to hold: the vocabulary's longest row is 0.16 in the tiny model.
        ("1e6", r"the embedding diverged at step 1: a learned row has norm \d\.\d+e\+0[67], over 100 times"),
    ],
)
def test_a_diverged_embedding_is_never_written(launch, assets, tmp_path, learning_rate, message):
    out = tmp_path / "run"
    flags = f"--learning_rate {learning_rate} --max_train_steps 3 --checkpointing_steps 1 --save_steps 1"
    result = launch.accelerate(TI_SCRIPT, ti_args(assets, concept_folder(tmp_path), str(out), flags), check=False)
    assert result.returncode != 0 and re.search(message, result.output), result.output[-3000:]
    assert not os.path.exists(out), f"a diverged run left {os.listdir(out)}"


# ---------------------------------------------------------------------------------------------------------- images


def truncated_png(path, size=72):
    buffer = io.BytesIO()
    tiny_sd.draw_shape("red", "circle", size).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_a_bad_image_anywhere_stops_the_run_before_anything_is_written(launch, assets, tmp_path):
    """A truncated PNG late in the data used to stop the run at step 2, after checkpoint-1, and every resume after."""
    folder = tmp_path / "data"
    shutil.copytree(assets["images"], folder)
    truncated_png(folder / "0009.png")
    out = tmp_path / "run"
    args = base_args(assets, str(out), "--max_train_steps 4 --checkpointing_steps 1")
    args[args.index("--train_data_dir") + 1] = str(folder)
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0
    assert "1 of 10 images cannot be read" in result.output and str(folder / "0009.png") in result.output
    assert "row 9" in result.output and "truncated" in result.output.lower()
    assert not os.path.exists(out)  # refused before training: nothing written, not even the folder


def image_file(mode, tmp_path):
    """An image stored in `mode`, and the RGB picture it shows."""
    path = tmp_path / f"{mode}.png"
    gradient = np.tile(np.linspace(0, 1, 32), (32, 1))
    if mode == "I;16":  # 16-bit grayscale: 0..65535
        Image.fromarray((gradient * 65535).astype(np.uint16)).save(path)
        shown = np.repeat((gradient * 255).round()[..., None], 3, axis=2)
    elif mode == "RGBA":  # left half transparent (with a garbage colour), right half opaque blue
        pixels = np.zeros((32, 32, 4), np.uint8)
        pixels[:, :16] = (10, 200, 30, 0)
        pixels[:, 16:] = (0, 0, 255, 255)
        Image.fromarray(pixels, "RGBA").save(path)
        shown = np.where(np.arange(32)[None, :, None] < 16, [255, 255, 255], [0, 0, 255]) * np.ones((32, 1, 1))
    elif mode == "P":  # palette with a transparent index
        image = Image.new("P", (32, 32), 0)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        image.paste(1, (16, 0, 32, 32))
        image.save(path, transparency=0)
        shown = np.where(np.arange(32)[None, :, None] < 16, [255, 255, 255], [255, 0, 0]) * np.ones((32, 1, 1))
    elif mode == "LA":
        pixels = np.stack([np.full((32, 32), 80, np.uint8), np.full((32, 32), 255, np.uint8)], axis=2)
        Image.fromarray(pixels, "LA").save(path)
        shown = np.full((32, 32, 3), 80)
    elif mode == "L":
        Image.fromarray((gradient * 255).round().astype(np.uint8), "L").save(path)
        shown = np.repeat((gradient * 255).round()[..., None], 3, axis=2)
    elif mode == "CMYK":  # pure cyan
        path = tmp_path / "CMYK.jpg"
        Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(path, quality=100)
        shown = np.broadcast_to(np.array([0, 255, 255]), (32, 32, 3))
    elif mode == "EXIF-rotated":  # stored landscape, red on the left; orientation 6: shown rotated 90 degrees clockwise
        path = tmp_path / "rotated.jpg"
        pixels = np.zeros((16, 32, 3), np.uint8)
        pixels[:, :16] = (255, 0, 0)
        image = Image.fromarray(pixels)
        exif = image.getexif()
        exif[0x0112] = 6
        image.save(path, exif=exif, quality=100)
        shown = np.zeros((32, 16, 3))
        shown[:16] = (255, 0, 0)  # red on top
    return path, shown


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "P", "LA", "L", "CMYK", "EXIF-rotated"])
def test_images_of_every_kind_become_the_picture_they_show(tmp_path, mode):
    path, shown = image_file(mode, tmp_path)
    rgb = images.load_rgb(str(path), str(path))
    assert rgb.mode == "RGB" and np.asarray(rgb).shape == shown.shape
    assert np.abs(np.asarray(rgb).astype(float) - shown).mean() < 3, np.asarray(rgb)[::8, ::8]


def test_a_16_bit_png_trains_as_its_picture_not_as_white(assets, tmp_path):
    """The dataset a launch trains on (16-bit PNGs used to become 99.6% white)."""
    folder = tmp_path / "data"
    folder.mkdir()
    path, shown = image_file("I;16", tmp_path)
    shutil.copy(path, folder / "gray16.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "gray16.png", "text": "a gradient"}) + "\n")
    from transformers import CLIPTokenizer

    from devkit.command_line import command_line

    flags = "--resolution 32 --center_crop"
    args = train_text_to_image.parse_args(
        command_line("--pretrained_model_name_or_path", "x", "--train_data_dir", folder, flags)
    )
    rows = captions.load_image_caption_dataset(data_config.DatasetConfig.from_args(args), 0)
    tokenizer = CLIPTokenizer.from_pretrained(assets["pipeline"], subfolder="tokenizer")
    pixels = train_text_to_image.ImageCaptionDataset(rows, [tokenizer], args, 0)[(0, 0, 1.0)]["pixel_values"]
    assert abs(float((pixels.mean() + 1) * 127.5) - shown.mean()) < 2  # mid-gray, as the gradient shows


# ------------------------------------------------------------------------------------------------- output folders


def folder_bytes(folder):
    """Every entry under folder, a file's bytes or None for a folder: to prove a refused run changed nothing."""
    found = {}
    for root, folders, names in os.walk(folder):
        for name in folders:
            found[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return found


def test_which_output_folders_a_run_may_write_into(tmp_path):
    """check_output_dir, in-process: absent, empty or a run's folder (its manifest, an earlier version's lock, or a
    checkpoint copied in to resume from) are accepted; anything else is refused naming the folder, what it holds and
    what to do, and the check itself writes nothing."""
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    vae = tmp_path / "vae"
    vae.mkdir()
    models = {"--pretrained_model_name_or_path": str(model), "--pretrained_vae_model_name_or_path": str(vae)}
    runs = tmp_path / "runs"
    for name, entry in [("ours", run_folder.RUN_MANIFEST), ("legacy", run_folder.LOCK_FILE)]:
        (runs / name).mkdir(parents=True)
        (runs / name / entry).write_text("")
        (runs / name / "unet").mkdir()
    (runs / "copied" / "checkpoint-3").mkdir(parents=True)
    (runs / "copied" / "checkpoint-3" / run_folder.CHECKPOINT_METADATA).write_text('{"global_step": 3}')
    (runs / "empty").mkdir()
    before = folder_bytes(tmp_path)
    for folder in ["absent", "absent/and/deeper", "empty", "ours", "legacy", "copied"]:
        run_folder.check_output_dir(str(runs / folder), models)
    assert folder_bytes(tmp_path) == before, "accepting a folder wrote nothing"
    # A probe left by a run killed while it checked: no user's file, so the folder is still a run's to take.
    (runs / "empty" / ".sdtrain-x1y2.probe").mkdir()
    run_folder.check_output_dir(str(runs / "empty"), models)
    (runs / "mine").mkdir()
    for name in ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "f.txt", "g.txt"]:
        (runs / "mine" / name).write_text("keep")
    incomplete = runs / "incomplete" / "checkpoint-3"  # a folder named like a checkpoint is not one of ours
    incomplete.mkdir(parents=True)
    before = folder_bytes(tmp_path)
    refusals = {
        str(runs / "mine"): f"--output_dir {runs / 'mine'} holds files no run of these scripts wrote (a.txt, b.txt, "
        "c.txt, d.txt, e.txt and 2 more): a run would write over them. Empty it, or choose another --output_dir",
        str(runs / "incomplete"): "holds files no run of these scripts wrote (checkpoint-3)",
        str(model): f"--output_dir {model} is, contains or lies inside --pretrained_model_name_or_path {model}",
        str(model / "unet"): "is, contains or lies inside --pretrained_model_name_or_path",
        str(model / "new" / "folder"): "is, contains or lies inside --pretrained_model_name_or_path",
        str(tmp_path): "is, contains or lies inside --pretrained_model_name_or_path",
        str(vae): "is, contains or lies inside --pretrained_vae_model_name_or_path",
        str(model / "model_index.json"): "is, contains or lies inside",
        str(runs / "mine" / "a.txt"): f"--output_dir {runs / 'mine' / 'a.txt'} is a file, not a folder",
        str(runs / "mine" / "a.txt" / "run"): f"--output_dir {runs / 'mine' / 'a.txt' / 'run'} (in "
        f"{runs / 'mine' / 'a.txt'}): {runs / 'mine' / 'a.txt'} is a file, so no folder can be made under it",
        "/proc/sdtrain-run": "--output_dir /proc/sdtrain-run (in /proc) lies in /proc, a virtual file system",
        "/sys/kernel/run": "--output_dir /sys/kernel/run (in /sys/kernel) lies in /sys, a virtual file system",
    }
    (tmp_path / "link").symlink_to(model)  # real paths are compared
    refusals[str(tmp_path / "link" / "unet")] = "is, contains or lies inside --pretrained_model_name_or_path"
    for output_dir, message in refusals.items():
        with pytest.raises(UserError) as refused:
            run_folder.check_output_dir(output_dir, models)
        assert message in str(refused.value), str(refused.value)
    (tmp_path / "link").unlink()
    assert folder_bytes(tmp_path) == before


def test_a_folder_a_run_made_is_removed_when_it_fails_before_anything_of_value(tmp_path):
    """take_output_dir makes the folder with its manifest and lock; a process that then fails leaves no folder,
    unless something of value (here a checkpoint) was written into it, and a folder it did not make is kept."""
    code = (
        "import os, sys, sdtrain.run_folder as r; r.take_output_dir(sys.argv[1], 'train_text_to_image.py', ['logs'])"
        "; os.makedirs(os.path.join(sys.argv[1], 'logs', 'run')); os.makedirs(os.path.join(sys.argv[1], sys.argv[2]))"
        "; raise SystemExit('stopped')"
    )
    made, kept, earlier = tmp_path / "made", tmp_path / "kept", tmp_path / "earlier"
    earlier.mkdir()
    (earlier / run_folder.RUN_MANIFEST).write_text("{}")  # made by an earlier run
    for folder, entry in [(made, ".checkpoint-1.partial"), (kept, "checkpoint-1"), (earlier, ".checkpoint-1.partial")]:
        stopped = subprocess.run([sys.executable, "-c", code, str(folder), entry], cwd=REPO, capture_output=True)
        assert stopped.returncode == 1 and b"stopped" in stopped.stderr, stopped.stderr
    assert not made.exists()
    assert sorted(os.listdir(kept)) == [
        ".sdtrain-run.json",
        ".training.lock",
        ".training.lock.owner",
        "checkpoint-1",
        "logs",
    ]
    manifest = json.loads((kept / run_folder.RUN_MANIFEST).read_text())
    assert manifest["script"] == "train_text_to_image.py" and manifest["version"] != "unknown" and manifest["started"]
    assert earlier.is_dir()


def test_user_files_in_the_output_folder_survive_and_the_run_is_refused_before_models_load(launch, assets, tmp_path):
    """The issue's reproduction: someone's files in --output_dir were deleted or replaced by a run that exited 0.
    Refused now, byte for byte untouched, before any model loads: the model given is one the scripts refuse when
    they read it (an SD3 pipeline), and it is the folder that is named."""
    out = tmp_path / "X"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "important.bin").write_text("keep\n")
    (out / "model_index.json").write_text("{}\n")
    (out / "README.md").write_text("mine\n")
    before = folder_bytes(out)
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    args = base_args(assets, str(out), "--max_train_steps 2")
    args[args.index("--pretrained_model_name_or_path") + 1] = str(sd3)
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0
    assert f"--output_dir {out} holds files no run of these scripts wrote (README.md, model_index.json, unet)" in (
        result.output
    ), result.output[-3000:]
    assert "Stable Diffusion 3" not in result.output
    assert folder_bytes(out) == before


def test_the_base_models_folder_is_refused_as_output_dir(launch, assets, tmp_path):
    base = shutil.copytree(assets["pipeline"], tmp_path / "base")
    before = folder_bytes(base)
    args = base_args(assets, str(base), "--max_train_steps 2")
    args[args.index("--pretrained_model_name_or_path") + 1] = str(base)
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0
    message = f"--output_dir {base} is, contains or lies inside --pretrained_model_name_or_path {base}"
    assert message in result.output, result.output[-3000:]
    assert folder_bytes(base) == before


def test_a_refused_start_leaves_no_output_folder(launch, assets, tmp_path):
    """Refusals before training (a missing --train_data_dir, a model family the scripts do not train, an output_dir
    under a file) wrote the folder and its lock; now they write nothing."""
    out = tmp_path / "run"
    flags = "--max_train_steps 2"
    missing = launch.accelerate(TI_SCRIPT, ti_args(assets, str(tmp_path / "nowhere"), str(out), flags), check=False)
    assert missing.returncode != 0 and "--train_data_dir" in missing.output, missing.output[-3000:]
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    args = base_args(assets, str(out), flags)
    args[args.index("--pretrained_model_name_or_path") + 1] = str(sd3)
    refused = launch.accelerate(SCRIPT, args, check=False)
    assert refused.returncode != 0 and "Stable Diffusion 3" in refused.output, refused.output[-3000:]
    assert not out.exists()


def test_two_processes_that_formed_no_group_are_told_so_not_blamed_on_the_lock(launch, assets, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs starts two processes that each
    see one process and think they are the main one; the second used to be refused by the first's lock."""
    from devkit.running_launch import free_port

    out = tmp_path / "run"
    command = [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--main_process_port", free_port(), SCRIPT, *base_args(assets, str(out), "--max_train_steps 2")]
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env.update(OFFLINE_ENV, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "started several processes (WORLD_SIZE=2, RANK=1, LOCAL_RANK=1) but they formed no distributed" in output
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2" in output, output[-3000:]
    assert "in use by another training run" not in output and not out.exists()


def test_processes_that_formed_no_group_are_found_from_the_launchers_variables():
    check = run_folder.check_process_group
    for alone in [{}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, {"JAX_NUM_PROCESSES": "2"}]:
        check(1, alone, "accelerate")  # one process, as launched (JAX's variables are not accelerate's)
    check(2, {"WORLD_SIZE": "2", "RANK": "1"}, "accelerate")  # a group was formed
    check(2, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "jax")
    for environ, framework, hint in [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "accelerate", "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu"),
        ({"LOCAL_RANK": "1"}, "accelerate", "ACCELERATE_USE_CPU=true"),
        ({"WORLD_SIZE": "4", "RANK": "3"}, "jax", "Start each process with --coordinator_address HOST:PORT"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "jax", "(or --jax_distributed where JAX finds them"),
    ]:
        with pytest.raises(UserError) as refused:
            check(1, environ, framework)
        shown = ", ".join(f"{name}={value}" for name, value in environ.items())
        assert f"the launcher started several processes ({shown}) but they formed no distributed group" in str(
            refused.value
        ) and hint in str(refused.value), str(refused.value)


def test_a_second_run_into_a_live_runs_folder_is_refused(launch, assets, tmp_path):
    out = tmp_path / "run"
    # Long enough to outlive the second launch on any machine; stopped with SIGTERM once the second is refused.
    first = launch.start(SCRIPT, base_args(assets, str(out), "--max_train_steps 100000 --logging_steps 1"))
    first.wait_for(r"step 1: loss")
    second = launch.accelerate(SCRIPT, base_args(assets, str(out), "--max_train_steps 2"), check=False)
    assert second.returncode != 0
    assert f"--output_dir {out} is in use by another training run (pid" in second.output, second.output[-3000:]
    owner = int(re.search(r"in use by another training run \(pid (\d+)", second.output).group(1))
    assert owner != first.process.pid and owner > 0  # the training process, not its launcher
    first.send(signal.SIGTERM)
    result = first.finish()
    # Undisturbed by the second launch, the first saved its checkpoint when stopped (accelerate launch reports the
    # script's exit code 75 as a failure of its own).
    assert re.search(PREEMPTED, result.output) and checkpoint_names(str(out)), result.output[-3000:]


def test_a_killed_runs_lock_and_leftovers_never_block(launch, assets, tmp_path):
    """The lock of a run killed with SIGKILL is taken over; its unfinished checkpoint and pipeline, and a replaced
    checkpoint it had not deleted yet, are cleared instead of failing the next run at that step."""
    out = tmp_path / "run"
    code = f"import time, sdtrain.run_folder as r; r.lock_output_dir({str(out)!r}); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    for _ in range(200):
        if os.path.isfile(out / ".training.lock.owner"):
            break
        subprocess.run(["sleep", "0.1"])
    holder.kill()
    holder.wait()
    for leftover in [".checkpoint-2.partial/unet", "checkpoint-2.stale/unet", ".pipeline-7/unet", ".pipeline.partial"]:
        (out / leftover).mkdir(parents=True)
        (out / leftover / "half.bin").write_bytes(b"half")
    launch.accelerate(SCRIPT, base_args(assets, str(out), "--max_train_steps 2 --checkpointing_steps 2"))
    assert checkpoint_names(str(out)) == ["checkpoint-2"]
    hidden = sorted(n for n in os.listdir(out) if n.startswith("."))
    # The folder of an earlier version (its lock, no manifest) is taken, and now carries the manifest.
    assert hidden == [".pipeline", ".pipeline-1", ".sdtrain-run.json", ".training.lock", ".training.lock.owner"], hidden


# ---------------------------------------------------------------------------------------------------- checkpoints


def damage(checkpoint, case):
    """Damage a checkpoint the ways a crash or a bad disk does; the file that was damaged."""
    name = {
        "empty metadata": "checkpoint_metadata.json",
        "missing metadata": "checkpoint_metadata.json",
        "truncated optimizer": "optimizer.bin",
        "truncated weights": "unet/diffusion_pytorch_model.safetensors",
        "truncated embeddings": "learned_embeds.safetensors",
    }[case]
    path = os.path.join(checkpoint, name)
    if case == "missing metadata":
        os.remove(path)
        return path
    data = open(path, "rb").read()
    open(path, "wb").write(b"" if case == "empty metadata" else data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def two_checkpoints(launch, assets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("two_checkpoints") / "run")
    launch.accelerate(SCRIPT, base_args(assets, out, "--max_train_steps 4 --checkpointing_steps 2"))
    return out


@pytest.mark.parametrize("case", ["empty metadata", "missing metadata", "truncated optimizer", "truncated weights"])
def test_a_damaged_checkpoint_is_named_and_latest_falls_back_to_the_newest_good_one(
    launch, assets, tmp_path, two_checkpoints, case
):
    out, flags = str(tmp_path / "run"), "--max_train_steps 4 --checkpointing_steps 2"
    shutil.copytree(two_checkpoints, out, symlinks=True)
    damaged = damage(os.path.join(out, "checkpoint-4"), case)
    named = launch.accelerate(
        SCRIPT, base_args(assets, out, flags, "--resume_from_checkpoint checkpoint-4"), check=False
    )
    assert named.returncode != 0 and damaged in named.output, named.output[-3000:]
    resumed = launch.accelerate(
        SCRIPT, base_args(assets, out, "--max_train_steps 5 --checkpointing_steps 5", "--resume_from_checkpoint latest")
    )
    assert f"skipping checkpoint-4: {damaged}" in resumed.output
    assert f"Resuming from {os.path.join(out, 'checkpoint-2')}" in resumed.output and "starting at 2" in resumed.output


def test_a_damaged_embeddings_checkpoint_falls_back(launch, assets, tmp_path):
    out, concept = str(tmp_path / "run"), concept_folder(tmp_path)
    flags = "--max_train_steps 4 --checkpointing_steps 2"
    launch.accelerate(TI_SCRIPT, ti_args(assets, concept, out, flags))
    damaged = damage(os.path.join(out, "checkpoint-4"), "truncated embeddings")
    named = launch.accelerate(
        TI_SCRIPT, ti_args(assets, concept, out, flags, "--resume_from_checkpoint checkpoint-4"), check=False
    )
    assert named.returncode != 0 and damaged in named.output
    resumed = launch.accelerate(
        TI_SCRIPT, ti_args(assets, concept, out, "--max_train_steps 5", "--resume_from_checkpoint latest")
    )
    assert f"skipping checkpoint-4: {damaged}" in resumed.output and "starting at 2" in resumed.output


def test_a_checkpoint_of_another_kind_of_run_is_refused_naming_what_it_was_trained_as(
    launch, assets, tmp_path, two_checkpoints
):
    """Textual inversion's checkpoints hold the new rows, text-to-image's the UNet: resuming one with the other script,
    or with another placeholder or number of vectors, is refused before anything is loaded from it. Checkpoints
    written before the metadata recorded this are told by their files."""
    out, concept = str(tmp_path / "run"), concept_folder(tmp_path)
    flags = "--max_train_steps 2 --checkpointing_steps 2 --report_to none"
    launch.accelerate(TI_SCRIPT, ti_args(assets, concept, out, flags))
    trained_as = f"{os.path.join(out, 'checkpoint-2')} was trained by textual_inversion.py --placeholder_token <blob>"
    resume = "--resume_from_checkpoint latest"
    for script, args, this_run in [
        (SCRIPT, base_args(assets, out, flags, resume), "this run is train_text_to_image.py (the whole UNet):"),
        (TI_SCRIPT, ti_args(assets, concept, out, flags, resume, "--num_vectors 2"), "--num_vectors 2:"),
        (
            TI_SCRIPT,
            [a.replace("<blob>", "<cat>") for a in ti_args(assets, concept, out, flags, resume)],
            "<cat> --num_vectors 1:",
        ),
    ]:
        result = launch.accelerate(script, args, check=False)
        assert result.returncode != 0 and trained_as in result.output and this_run in result.output, result.output[
            -3000:
        ]
    metadata_file = os.path.join(out, "checkpoint-2", "checkpoint_metadata.json")
    metadata = json.load(open(metadata_file))
    json.dump({key: value for key, value in metadata.items() if key != "script"}, open(metadata_file, "w"))
    result = launch.accelerate(SCRIPT, base_args(assets, out, flags, resume), check=False)
    assert result.returncode != 0 and "was trained by textual_inversion.py" in result.output, result.output[-3000:]
    copy = str(tmp_path / "text_to_image")
    shutil.copytree(two_checkpoints, copy, symlinks=True)
    result = launch.accelerate(TI_SCRIPT, ti_args(assets, concept, copy, flags, resume), check=False)
    assert result.returncode != 0, result.output[-3000:]
    assert (
        f"{os.path.join(copy, 'checkpoint-4')} was trained by train_text_to_image.py (the whole UNet), this run"
        in result.output
    )


def test_checkpoint_files_reach_the_disk_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    from accelerate import PartialState

    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", str(a))) or real_rename(a, b))

    class Accelerator:
        state, is_main_process = PartialState(), True  # one process, no DeepSpeed or FSDP

        def save_state(self, path):
            os.makedirs(os.path.join(path, "unet"))
            for name in ["unet/diffusion_pytorch_model.safetensors", "optimizer.bin"]:
                open(os.path.join(path, name), "wb").write(b"weights")

    checkpoints.save_checkpoint(Accelerator(), str(tmp_path), 3, {"seed": 1})
    partial = str(tmp_path / ".checkpoint-3.partial")
    publish = events.index(("rename", partial))
    flushed = {path for kind, path in events[:publish] if kind == "fsync"}
    files = ["unet/diffusion_pytorch_model.safetensors", "optimizer.bin", "checkpoint_metadata.json"]
    assert {os.path.join(partial, name) for name in files} | {partial, os.path.join(partial, "unet")} <= flushed
    assert ("fsync", str(tmp_path)) in events[publish:], "the rename itself must be flushed"
    metadata = json.load(open(tmp_path / "checkpoint-3" / "checkpoint_metadata.json"))
    assert metadata["files"] == {"unet/diffusion_pytorch_model.safetensors": 7, "optimizer.bin": 7}


def launch_with_file_size_limit(assets, script, args, limit):
    """`accelerate launch` where writing past `limit` bytes into one file fails as a full disk does: an error from the
    write in the middle of the save (EFBIG, with SIGXFSZ ignored so that it does not kill the process)."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [os.path.join(BIN, "accelerate"), "launch", "--config_file", assets["accelerate_config"], script]
    env = {**os.environ, **OFFLINE_ENV}
    result = subprocess.run(
        command + args, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=limit_file_size
    )
    result.output = result.stdout + result.stderr
    return result


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_that_keeps_the_older_checkpoints(launch, assets, tmp_path):
    """The limit is hit halfway through the optimizer state of checkpoint-4, after checkpoint-2 was written."""
    out = str(tmp_path / "run")
    launch.accelerate(SCRIPT, base_args(assets, out, "--max_train_steps 2 --checkpointing_steps 2 --report_to none"))
    size = os.path.getsize(os.path.join(out, "checkpoint-2", "optimizer.bin"))
    args = base_args(assets, out, "--max_train_steps 4 --checkpointing_steps 2 --report_to none")
    result = launch_with_file_size_limit(assets, SCRIPT, args + ["--resume_from_checkpoint", "latest"], size // 2)
    output = result.output
    assert result.returncode != 0 and "could not write checkpoint-4 into" in output and "GiB free there" in output
    assert checkpoint_names(out) == ["checkpoint-2"] and not [n for n in os.listdir(out) if n.endswith(".partial")]


def final_save_failure(result, out, step):
    assert result.returncode != 0 and f"the final save into {out} failed" in result.output, result.output[-3000:]
    assert "GiB free there" in result.output and f"is in {os.path.join(out, f'checkpoint-{step}')}" in result.output
    assert not [name for name in os.listdir(out) if name.endswith(".partial")], "the unfinished save is removed"


def test_a_full_disk_during_the_final_save_keeps_the_trained_steps_in_a_checkpoint(launch, assets, tmp_path):
    """Adafactor's factored state is small, so every checkpoint file is at most the UNet's weights; the fp32 single
    file (UNet, VAE and text encoder in one file) is the only larger file: the limit between the two fails the final
    save alone, after the pipeline was written, 1 update after checkpoint-2."""
    out, pipeline = str(tmp_path / "run"), assets["pipeline"]
    flags = "--max_train_steps 3 --checkpointing_steps 2 --optimizer adafactor --report_to none"
    flags += " --save_single_file --single_file_dtype fp32"
    unet, vae, text_encoder = (
        os.path.getsize(os.path.join(pipeline, *path))
        for path in [
            ("unet", "diffusion_pytorch_model.safetensors"),
            ("vae", "diffusion_pytorch_model.safetensors"),
            ("text_encoder", "model.safetensors"),
        ]
    )
    result = launch_with_file_size_limit(
        assets, SCRIPT, base_args(assets, out, flags), unet + (vae + text_encoder) // 2
    )
    final_save_failure(result, out, 3)
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-3"]
    saved = load_state_dict(os.path.join(out, "unet"))  # the pipeline, written before the single file failed
    assert max_abs_diff(load_state_dict(os.path.join(out, "checkpoint-3", "unet")), saved) == 0
    resumed = launch.accelerate(SCRIPT, base_args(assets, out, flags, "--resume_from_checkpoint latest"))
    assert "starting at 3" in resumed.output and "nothing to train" in resumed.output
    assert os.path.isfile(os.path.join(out, "run.safetensors"))


def test_a_full_disk_during_the_final_embedding_pipeline_save_keeps_the_trained_steps(launch, assets, tmp_path):
    """A checkpoint of textual inversion holds kilobytes; --save_as_full_pipeline writes the UNet's megabytes."""
    out, concept = str(tmp_path / "run"), concept_folder(tmp_path)
    flags = "--max_train_steps 3 --checkpointing_steps 2 --save_as_full_pipeline --report_to none"
    unet = os.path.getsize(os.path.join(assets["pipeline"], "unet", "diffusion_pytorch_model.safetensors"))
    result = launch_with_file_size_limit(assets, TI_SCRIPT, ti_args(assets, concept, out, flags), unet // 2)
    final_save_failure(result, out, 3)
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-3"]
    resumed = launch.accelerate(TI_SCRIPT, ti_args(assets, concept, out, flags, "--resume_from_checkpoint latest"))
    assert "starting at 3" in resumed.output and "nothing to train" in resumed.output
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


# ------------------------------------------------------------------------------------------------- the final swap


def pipeline_with_unet_offset(source, destination, offset):
    """A copy of a pipeline whose UNet and text encoder weights are shifted by `offset`: a second, distinct model."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, destination)
    for name in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]:
        path = os.path.join(destination, name)
        shifted = {k: v + offset if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(shifted, path, metadata={"format": "pt"})
    return destination


def first_weights(pipe):
    return tuple(float(next(iter(part.state_dict().values())).flatten()[0]) for part in (pipe.unet, pipe.text_encoder))


def shown_model(output_dir, base):
    """Which model from_pretrained(output_dir) loads: the offsets of its UNet and text encoder from `base`'s (one
    value if they agree), or why it does not load."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(output_dir)
    except Exception as err:  # noqa: BLE001 - failing to load at all is what this looks for
        return f"does not load: {type(err).__name__}: {err}"
    return {round(loaded - start, 3) for loaded, start in zip(first_weights(pipe), base, strict=True)}


class Killed(Exception):
    pass


def publish_killed_before_operation(number, output_dir, monkeypatch):
    """publish_pipeline(output_dir/.pipeline.partial, output_dir), stopped dead right before its number-th file
    operation (a rename, link, removal, ...), as a kill there would stop it. True if it finished first."""
    calls = []

    def counted(function):
        def call(*args, **kwargs):
            calls.append(function)
            if len(calls) >= number:
                raise Killed()
            return function(*args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        for name in ["rename", "replace", "symlink", "link", "remove", "rmdir", "makedirs"]:
            patch.setattr(os, name, counted(getattr(os, name)))
        patch.setattr(shutil, "rmtree", counted(shutil.rmtree))
        patch.setattr(run_folder, "exchange_entries", counted(run_folder.exchange_entries))
        try:
            run_folder.publish_pipeline(os.path.join(output_dir, ".pipeline.partial"), output_dir)
        except Killed:
            return False
    return True


@pytest.mark.parametrize("before", ["published", "real folders", "nothing"])
def test_the_final_swap_leaves_the_old_or_the_new_model_at_every_step(assets, tmp_path, monkeypatch, before):
    """publish_pipeline is stopped right before each of its file operations in turn (as a kill there would): the
    folder then loads the old model or the new one, never a mix and never nothing (when there was an old one)."""
    from accelerate import PartialState
    from diffusers import StableDiffusionPipeline

    PartialState()  # the script's logger needs accelerate's state, as it has inside main()
    base = first_weights(StableDiffusionPipeline.from_pretrained(assets["pipeline"]))
    old = pipeline_with_unet_offset(assets["pipeline"], str(tmp_path / "old"), 1.0)
    new = pipeline_with_unet_offset(assets["pipeline"], str(tmp_path / "new"), 2.0)

    crash_at = 0
    while True:
        out = str(tmp_path / f"run-{crash_at}")
        os.makedirs(out)
        if before == "published":
            shutil.copytree(old, os.path.join(out, ".pipeline.partial"))
            run_folder.publish_pipeline(os.path.join(out, ".pipeline.partial"), out)
        elif before == "real folders":
            shutil.copytree(old, out, dirs_exist_ok=True)
        shutil.copytree(new, os.path.join(out, ".pipeline.partial"))
        finished = publish_killed_before_operation(crash_at + 1, out, monkeypatch)
        shown = shown_model(out, base)
        if finished:
            assert shown == {2.0}, shown
            break
        if before == "nothing":
            assert shown == {2.0} or str(shown).startswith("does not load"), f"killed at operation {crash_at + 1}"
        else:
            assert shown in ({1.0}, {2.0}), f"killed at operation {crash_at + 1}: {shown}"
        crash_at += 1
    assert crash_at > 5, "the swap must have been interrupted at each of its steps"


# ---------------------------------------------------------------------------------------------------- preemption

PREEMPTED = r"(SIGTERM|SIGUSR1|SIGINT) received: stopped after step (\d+) with checkpoint-(\d+) written"
RUN = "--max_train_steps 12 --checkpointing_steps 100 --logging_steps 1 --random_flip --lr_scheduler cosine"


@pytest.fixture(scope="module")
def uninterrupted(launch, assets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    launch.accelerate(SCRIPT, base_args(assets, out, RUN))
    return load_state_dict(os.path.join(out, "unet"))


@pytest.mark.parametrize(
    "launcher,sig", [("accelerate", signal.SIGTERM), ("python", signal.SIGUSR1), ("accelerate", signal.SIGINT)]
)
def test_a_preempted_run_checkpoints_its_step_and_resumes_to_the_same_weights(
    launch, assets, tmp_path, uninterrupted, launcher, sig
):
    """The signal goes to the whole process group, as SLURM and a spot VM's shutdown send it, and as a terminal sends
    Ctrl-C (SIGINT): the launcher and the DataLoader's worker get it too. SIGTERM and SIGUSR1 are sent twice."""
    out = str(tmp_path / "run")
    workers = f"--dataloader_num_workers {int(sig == signal.SIGINT)}"  # the CPU default is 0
    run = launch.start(SCRIPT, base_args(assets, out, RUN, workers), launcher=launcher)
    run.wait_for(r"step 2: loss")
    run.send(sig)
    if sig != signal.SIGINT:
        run.send(sig)  # a second signal changes nothing
    result = run.finish()
    found = re.search(PREEMPTED, result.output)
    assert found, result.output[-4000:]
    step = int(found.group(2))
    assert 2 <= step < 12 and checkpoint_names(out) == [f"checkpoint-{step}"]
    assert not os.path.exists(os.path.join(out, "model_index.json")), "a preempted run saves no final model"
    if launcher == "python":
        assert result.returncode == 75, "the documented exit code"
    if sig == signal.SIGINT:
        # accelerate launch stops waiting a quarter second after Ctrl-C and ends as killed by it, as a shell expects;
        # the training process finishes its checkpoint and ends with 130 too.
        assert result.returncode == -signal.SIGINT and "(exit code 130)" in result.output, result.output[-4000:]
        assert "exited unexpectedly" not in result.output
    resumed = launch.accelerate(SCRIPT, base_args(assets, out, RUN, "--resume_from_checkpoint latest"))
    assert f"starting at {step}" in resumed.output
    assert max_abs_diff(load_state_dict(os.path.join(out, "unet")), uninterrupted) <= 1e-6


def test_a_second_ctrl_c_aborts_at_once(launch, assets, tmp_path):
    # Updates of 5 batches each: the first Ctrl-C lands in one with seconds to go, time enough for the second to
    # arrive before the checkpoint would be written, however busy the machine.
    slow_updates = "--gradient_accumulation_steps 5"
    run = launch.start(SCRIPT, base_args(assets, str(tmp_path / "run"), RUN, slow_updates), launcher="python")
    run.wait_for(r"step 2: loss")
    run.send(signal.SIGINT)
    run.wait_for("Ctrl-C: stopping after this update")
    run.send(signal.SIGINT)
    result = run.finish(timeout=60)
    assert result.returncode == 130 and "Second Ctrl-C: aborted" in result.output, result.output[-4000:]
    assert "Traceback" not in result.output and "stopped after step" not in result.output


def test_a_preempted_two_process_run_resumes_exactly_on_two_processes(launch, assets, tmp_path):
    """Under torchrun the agent forwards the signal again: the second one arrives while the checkpoint is written."""
    full, out = str(tmp_path / "full"), str(tmp_path / "run")
    flags = "--train_batch_size 1 --random_flip --max_train_steps 12 --checkpointing_steps 100 --logging_steps 1"
    launch.torchrun(SCRIPT, base_args(assets, full, flags))
    run = launch.start(SCRIPT, base_args(assets, out, flags), launcher="torchrun")
    run.wait_for(r"step 2: loss")
    run.send(signal.SIGTERM)
    result = run.finish()
    step = int(re.search(PREEMPTED, result.output).group(2))
    launch.torchrun(SCRIPT, base_args(assets, out, flags, "--resume_from_checkpoint latest"))
    final, resumed = (load_state_dict(os.path.join(folder, "unet")) for folder in (full, out))
    assert max_abs_diff(final, resumed) <= 1e-6, f"stopped at step {step}"


def test_ctrl_c_asks_for_a_clean_stop_only_while_the_loop_trains():
    """Before the loop (loading, caching) and in the final save there is no update to finish: Ctrl-C interrupts there
    as in any program (run() prints one line for it), instead of promising a checkpoint after an update to come."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        request = StopRequest()
        assert signal.getsignal(signal.SIGINT) is saved[signal.SIGINT]
        request.stop_on_ctrl_c(True)
        assert signal.getsignal(signal.SIGINT) == request.interrupt
        request.stop_on_ctrl_c(False)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started with Ctrl-C ignored keeps it ignored
        ignoring = StopRequest()
        ignoring.stop_on_ctrl_c(True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_ctrl_c_outside_the_loop_is_one_line_and_exit_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_main(interrupted, debug=False)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "\nCtrl-C: interrupted; the checkpoints already written are kept\n"

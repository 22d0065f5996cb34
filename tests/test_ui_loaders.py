"""The single file, the embeddings file and the LoRA file in the UIs' own loaders: ComfyUI's `comfy` package and
InvokeAI's model probe, run offline by devkit/ui_loaders.py in the JAX environment (where requirements_ui_loaders.txt
installs them). The runs train an SD-shaped pipeline (devkit/tiny_sd.py SD1_SHAPED / SD2_SHAPED / SDXL_SHAPED) for one
step: the tiny test pipeline is too small for the loaders to tell which model family it is."""

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import OFFLINE_ENV, REPO
from safetensors import safe_open
from safetensors.torch import load_file
from test_textual_inversion import SCRIPT as TI_SCRIPT
from test_train_text_to_image import SCRIPT as T2I_SCRIPT

from devkit import lora_files, tiny_sd
from devkit.command_line import command_line
from sdtrain import lora, single_file

FLAX_PYTHON = os.path.join(REPO, ".venv-flax", "bin", "python")
FAMILIES = {
    # family: (architecture, prediction type, ComfyUI's model class, InvokeAI's base, text encoder width)
    "sd1": (tiny_sd.SD1_SHAPED, "epsilon", "SD15", "sd-1", 768),
    "sd2": (tiny_sd.SD2_SHAPED, "v_prediction", "SD20", "sd-2", 1024),
}


def ui_loaders(kind, path, tmp_path, *extra):
    """devkit/ui_loaders.py's report; run from an empty folder, since ComfyUI reads ./config.yaml if there is one."""
    workdir = tmp_path / f"loaders-{kind}"
    workdir.mkdir(exist_ok=True)
    command = [FLAX_PYTHON, os.path.join(REPO, "devkit", "ui_loaders.py"), kind, str(path), *extra]
    env = {**os.environ, **OFFLINE_ENV}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    line = next(line for line in result.stdout.splitlines() if line.startswith("UI_LOADERS "))
    return json.loads(line.removeprefix("UI_LOADERS "))


def require_flax_python():
    if not os.path.exists(FLAX_PYTHON):
        pytest.fail(f"{FLAX_PYTHON} is missing: `make test` builds it, with the UI loaders")


COMMON = "--resolution 64 --train_batch_size 1 --max_train_steps 1 --report_to none"


def train_single_file(launch, base, data, out):
    """One step of train_text_to_image.py with --save_single_file, launched as users launch it; the file's path."""
    args = command_line("--pretrained_model_name_or_path", base, "--train_data_dir", data, COMMON)
    launch.accelerate(T2I_SCRIPT, args + ["--output_dir", out, "--save_single_file"])
    return out / f"{out.name}.safetensors"


def assert_uis_load_the_checkpoint(single_file, tmp_path, comfy_class, invoke_base, prediction_type):
    """ComfyUI detects comfy_class and holds every tensor of the file as written; InvokeAI's probe sees a main
    checkpoint of invoke_base."""
    report = ui_loaders("checkpoint", single_file, tmp_path)
    comfy, invoke = report["comfyui"], report["invokeai"]
    assert comfy["model_config"] == comfy_class
    assert comfy["tensors"] == len(load_file(single_file)) and comfy["not_loaded"] == [] and comfy["differ"] == []
    assert invoke["type"] == "main" and invoke["format"] == "checkpoint" and invoke["base"] == invoke_base
    assert invoke["variant"] == "normal" and invoke["prediction_type"] == prediction_type


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    return tiny_sd.write_concept_folder(str(tmp_path_factory.mktemp("concept")), num_images=2, size=64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_comfyui_and_invokeai_load_the_single_file_and_the_embedding(launch, assets, concept, tmp_path, family):
    require_flax_python()
    architecture, prediction_type, comfy_class, invoke_base, width = FAMILIES[family]
    # The UIs' text encoders have CLIP's 49408-row vocabulary; textual inversion needs the tokenizer to match the
    # text encoder's table, so it trains on the same architecture with the test vocabulary.
    base = tiny_sd.build_pipeline(
        str(tmp_path / "base"), architecture, sample_size=64, prediction_type=prediction_type, vocab_size=49408
    )
    ti_base = tiny_sd.build_pipeline(str(tmp_path / "ti-base"), architecture, 64, prediction_type=prediction_type)
    single_file = train_single_file(launch, base, assets["images"], tmp_path / "my-model")
    ti_out = tmp_path / "embedding"
    ti = command_line("--pretrained_model_name_or_path", ti_base, "--train_data_dir", concept, COMMON)
    ti += command_line(
        "--output_dir", ti_out, "--num_vectors 3 --placeholder_token <cat-toy> --initializer_token circle"
    )
    launch.accelerate(TI_SCRIPT, ti)

    assert_uis_load_the_checkpoint(single_file, tmp_path, comfy_class, invoke_base, prediction_type)

    ui_file = ti_out / "cat-toy.safetensors"
    report = ui_loaders("embedding", ui_file, tmp_path, "--width", str(width))
    comfy, invoke = report["comfyui"], report["invokeai"]
    assert comfy == {"rows": [3, width], "vectors_in_prompt": 3, "vectors_match": True}
    assert invoke["type"] == "embedding" and invoke["format"] == "embedding_file" and invoke["base"] == invoke_base
    # Why the UI file exists: InvokeAI's probe reads the width of a token-keyed file from its first dimension (the
    # number of vectors) and refuses diffusers' learned_embeds, which ComfyUI reads all the same.
    report = ui_loaders("embedding", ti_out / "learned_embeds.safetensors", tmp_path, "--width", str(width))
    assert report["invokeai"]["config"] is None and report["comfyui"]["vectors_match"]


def test_comfyui_and_invokeai_load_the_sdxl_single_file(launch, assets, tmp_path):
    """ComfyUI detects SDXL_SHAPED as Segmind_Vega, its smallest SDXL-family class (SDXL's widths, fewer transformer
    layers): its SDXL model and both SDXL text encoders hold every tensor of the file."""
    require_flax_python()
    base = tiny_sd.build_sdxl_pipeline(str(tmp_path / "base"), tiny_sd.SDXL_SHAPED, sample_size=64, vocab_size=49408)
    single_file = train_single_file(launch, base, assets["images"], tmp_path / "my-xl-model")
    assert_uis_load_the_checkpoint(single_file, tmp_path, "Segmind_Vega", "sdxl", "epsilon")


def test_comfyui_and_invokeai_read_the_sdxl_embedding(launch, concept, tmp_path):
    """textual_inversion.py's SDXL file for the UIs, {"clip_l": [n, 768], "clip_g": [n, 1280]} (trained on a tiny UNet
    beside SDXL's text encoders, devkit/tiny_sd.py SDXL_TEXT_SHAPED): ComfyUI loads each half for its text encoder
    and expands "embedding:NAME" to its n vectors; InvokeAI's probe sees an SDXL embedding."""
    require_flax_python()
    base = tiny_sd.build_sdxl_pipeline(str(tmp_path / "xl-base"), tiny_sd.SDXL_TEXT_SHAPED, sample_size=64)
    out = tmp_path / "xl-embedding"
    flags = "--resolution 64 --train_batch_size 1 --max_train_steps 1 --report_to none --num_vectors 3"
    args = command_line("--pretrained_model_name_or_path", base, "--train_data_dir", concept, "--output_dir", out)
    launch.accelerate(TI_SCRIPT, args + command_line(flags, "--placeholder_token <xl-toy> --initializer_token circle"))
    path = out / "xl-toy.safetensors"
    report = ui_loaders("embedding", path, tmp_path, "--sdxl")
    for key, width in [("clip_l", 768), ("clip_g", 1280)]:
        expected = {"rows": [3, width], "vectors_in_prompt": 3, "vectors_match": True, "rows_are_the_files": True}
        assert report["comfyui"][key] == expected, key
    invoke = report["invokeai"]
    assert invoke["type"] == "embedding" and invoke["format"] == "embedding_file" and invoke["base"] == "sdxl"


# LoRA (issue 31). The tests below launch train_text_to_image.py --rank, so they need the LoRA training: `-k lora`.
# SDXL conditions on the penultimate hidden state of its first text encoder, so that encoder's last layer never
# trains: the SDXL run's first text encoder has two layers, so its LoRA has a trained layer (0) to compare as well.
SDXL_LORA_SHAPED = {**tiny_sd.SDXL_SHAPED, "text": {**tiny_sd.SDXL_SHAPED["text"], "num_hidden_layers": 2}}
LORA_FAMILIES = {
    # family: (pipeline builder, architecture, ComfyUI's model class, InvokeAI's base, the modules one step leaves
    # untouched (B still zero): the unused last layer of SDXL's first text encoder)
    "sd1": (tiny_sd.build_pipeline, tiny_sd.SD1_SHAPED, "SD15", "sd-1", ()),
    "sdxl": (
        tiny_sd.build_sdxl_pipeline,
        SDXL_LORA_SHAPED,
        "Segmind_Vega",
        "sdxl",
        ("text_encoder.text_model.encoder.layers.1.",),
    ),
}
# Rank 4, alpha 8: a scale of 2, which a loader ignoring .alpha (scale 1) or reading alpha as the scale (8) would miss.
# The learning rate moves B well away from zero in the one step (B starts at zero: an untrained LoRA changes nothing).
LORA_FLAGS = "--rank 4 --lora_alpha 8 --train_text_encoder --learning_rate 1e-2 --lr_warmup_steps 0 --seed 0"


def write_base_single_file(pipeline_dir, path):
    """The base pipeline as the single file the UIs load as their model (the LoRA's base), in float32."""
    _, state = single_file.original_layout_state(pipeline_dir)
    single_file.write_single_file(state, str(path), "fp32", {})
    return path


def assert_uis_load_the_lora(base, out, tmp_path, comfy_class, invoke_base, untrained=()):
    """The kohya-layout file in `out` (beside diffusers' file) over the base pipeline: ComfyUI maps every key of it
    (.alpha included) onto the model, InvokeAI's probe sees a LoRA of invoke_base and its loader finds a module for
    every layer, and the weights each patches equal diffusers' fuse_lora within 1e-5 in every adapted module of the
    UNet and text encoder(s). untrained: module name prefixes the run cannot train, whose B is still zero."""
    patched_dir = tmp_path / "patched"
    checkpoint = write_base_single_file(base, tmp_path / "base.safetensors")
    report = ui_loaders(
        "lora",
        lora.ui_lora_path(out),
        tmp_path,
        *("--checkpoint", checkpoint, "--pipeline", base, "--patched", patched_dir),
    )
    comfy, invoke, invoke_patch = report["comfyui"], report["invokeai"], report["invokeai_patch"]
    assert comfy["model_config"] == comfy_class
    assert comfy["unmapped"] == [] and comfy["warnings"] == [], comfy
    assert invoke.get("type") == "lora" and invoke.get("base") == invoke_base, invoke
    # InvokeAI files a kohya-layout LoRA (lora_up / lora_down / alpha keys) under its LyCORIS format.
    assert invoke["format"] == "lycoris", invoke
    assert invoke_patch["no_prefix"] == [] and invoke_patch["unmatched"] == [], invoke_patch
    with safe_open(os.path.join(out, lora.DIFFUSERS_LORA_FILE), "np") as f:
        adapted = sorted({key.rsplit(".lora_", 1)[0] for key in f.keys()})
    assert {name.split(".", 1)[0] for name in adapted} == {"unet", *lora_files.text_encoder_names(base)}
    base_weights, fused = lora_files.fused_weights(base, out, adapted)
    # The comparison means something only where the LoRA moved the weight.
    moved = {name: float(np.abs(fused[name] - base_weights[name]).max()) for name in adapted}
    trained = {name: change for name, change in moved.items() if not name.startswith(tuple(untrained))}
    assert min(trained.values()) > 1e-4, min(trained.items(), key=lambda item: item[1])
    for ui in ["comfyui", "invokeai"]:
        patched = {
            key.removesuffix(".weight"): t.numpy() for key, t in load_file(patched_dir / f"{ui}.safetensors").items()
        }
        assert sorted(patched) == adapted, ui
        differences = {name: float(np.abs(patched[name] - fused[name]).max()) for name in adapted}
        worst = max(differences, key=differences.get)
        assert differences[worst] <= 1e-5, f"{ui}: {worst} differs from diffusers' fused weight by {differences[worst]}"


@pytest.mark.parametrize("family", sorted(LORA_FAMILIES))
def test_comfyui_and_invokeai_load_the_lora(launch, assets, tmp_path, family):
    """train_text_to_image.py --rank --train_text_encoder, one step: its kohya-layout file in ComfyUI's LoRA loader
    over the base model's single file, and in InvokeAI's probe, loader and patcher over its diffusers folder (see
    assert_uis_load_the_lora)."""
    require_flax_python()
    build, architecture, comfy_class, invoke_base, untrained = LORA_FAMILIES[family]
    base = build(str(tmp_path / "base"), architecture, sample_size=64, vocab_size=49408)
    out = tmp_path / f"my-{family}-lora"
    args = command_line("--pretrained_model_name_or_path", base, "--train_data_dir", assets["images"], COMMON)
    launch.accelerate(T2I_SCRIPT, args + command_line("--output_dir", out, LORA_FLAGS))
    assert_uis_load_the_lora(base, out, tmp_path, comfy_class, invoke_base, untrained)

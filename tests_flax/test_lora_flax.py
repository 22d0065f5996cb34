"""LoRA in the Flax twin (--rank), launched as users launch it: the two files it writes (diffusers' layout, which
diffusers loads and fuses into W + (alpha / rank) * B @ A, and the kohya layout with the real alpha), checkpoints of the
adapter alone, an exact resume, two processes equal to one, SD and SDXL with the text encoders' LoRA."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import OFFLINE_ENV, REPO, run_torch
from safetensors.numpy import load_file
from test_flax_scripts import checkpoint_names, saved_train_state, start_two_processes

from devkit.command_line import command_line
from sdtrain.config_file import RUN_CONFIG
from sdtrain.jax import lora as jax_lora
from sdtrain.lora import DIFFUSERS_LORA_FILE, ui_lora_path

T2I = "train_text_to_image_flax.py"
RANK, ALPHA = 4, 8
LORA = f"--rank {RANK} --lora_alpha {ALPHA} --train_text_encoder"
# Two updates to a checkpoint, two more after it; EMA of the adapter, Min-SNR and flips along.
SD_FLAGS = "--max_train_steps 4 --checkpointing_steps 2 --use_ema --snr_gamma 5.0 --random_flip"
SDXL_FLAGS = (
    "--max_train_samples 4 --max_train_steps 2 --checkpointing_steps 2 --mixed_precision bf16 --random_flip"
    " --proportion_empty_prompts 0.3 --validation_prompts 'a red circle' --validation_epochs 5"
)
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")

# In each environment: the saved LoRA loads into the base pipeline (load_lora_weights), and fusing it gives each
# adapted weight W + (alpha / rank) * B @ A, with W the base's.
FUSE_CHECK = """
import sys, numpy as np
from diffusers import DiffusionPipeline
from safetensors.numpy import load_file
base, out, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
pipe = DiffusionPipeline.from_pretrained(base)
names = [n for n in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
before = {n: {k: v.numpy().copy() for k, v in getattr(pipe, n).state_dict().items()} for n in names}
# diffusers 0.39 offline needs the file's name even in a local folder; 0.42 finds it (sys.argv[4]: give it).
pipe.load_lora_weights(out, **({"weight_name": "pytorch_lora_weights.safetensors"} if sys.argv[4:] else {}))
pipe.fuse_lora()
pipe.unload_lora_weights()
lora, worst, fused = load_file(out + "/pytorch_lora_weights.safetensors"), 0.0, set()
for key, a in lora.items():
    if ".lora_A." in key:
        component, module = key.split(".", 1)[0], key.split(".", 1)[1].rsplit(".lora_A", 1)[0]
        weights = getattr(pipe, component).state_dict()
        if module + ".weight" not in weights:  # transformers 5's CLIPTextModel has no text_model level
            module = module.removeprefix("text_model.")
        weight = weights[module + ".weight"].numpy()
        expected = before[component][module + ".weight"] + scale * lora[key.replace("lora_A", "lora_B")] @ a
        worst = max(worst, float(np.abs(weight - expected).max()))
        fused.add(component)
print("fused", sorted(fused), worst)
"""


def run_flax_python(code, *args):
    """A snippet in this (the Flax) environment, whose diffusers is 0.39."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def lora_args(base, data, output_dir, *extra, lora=LORA):
    paths = ["--pretrained_model_name_or_path", base, "--train_data_dir", data, "--output_dir", output_dir]
    fixed = "--resolution 64 --train_batch_size 1 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 3"
    return command_line(*paths, fixed, lora, *extra)


def expected_shapes(base, text_encoders):
    """diffusers_key -> shape of every matrix the LoRA must hold: the UNet's attention projections and the text
    encoders', read from the base pipeline's PyTorch weights (out, in)."""
    expected = {}
    sources = [("unet", "diffusion_pytorch_model.safetensors", ATTENTION)]
    sources += [(name, "model.safetensors", TEXT_ATTENTION) for name in text_encoders]
    for component, file_name, modules in sources:
        suffixes = tuple(f".{module}.weight" for module in modules)
        for key, weight in load_file(os.path.join(base, component, file_name)).items():
            if key.endswith(suffixes):
                module = key.removesuffix(".weight")
                if component != "unet" and not module.startswith("text_model."):
                    module = "text_model." + module  # transformers 5 saves CLIP without the prefix
                out_features, in_features = weight.shape
                expected[f"{component}.{module}.lora_A.weight"] = (RANK, in_features)
                expected[f"{component}.{module}.lora_B.weight"] = (out_features, RANK)
    return expected


def check_files(output_dir, base, text_encoders, kohya_prefixes):
    """Both files hold exactly the expected matrices, the kohya one under its prefixes with .alpha = ALPHA; returns
    the diffusers-layout tensors."""
    saved = load_file(os.path.join(output_dir, DIFFUSERS_LORA_FILE))
    expected = expected_shapes(base, text_encoders)
    assert {key: value.shape for key, value in saved.items()} == expected
    assert all(value.dtype == np.float32 for value in saved.values())
    assert any(np.abs(value).max() > 0 for key, value in saved.items() if ".lora_B." in key), "B trained"
    ui = load_file(ui_lora_path(output_dir))
    prefixes = {"unet": "lora_unet_", **dict(zip(text_encoders, kohya_prefixes, strict=True))}
    for key, value in saved.items():
        component, rest = key.split(".", 1)
        module, matrix = rest.removesuffix(".weight").rsplit(".lora_", 1)
        name = prefixes[component] + module.replace(".", "_")
        assert np.array_equal(ui[f"{name}.lora_{'down' if matrix == 'A' else 'up'}.weight"], value)
        assert float(ui[f"{name}.alpha"]) == ALPHA
    assert len(ui) == len(saved) // 2 * 3
    return saved


# ---------------------------------------------------------------------------------------------------------- SD runs


@pytest.fixture(scope="module")
def sd_run(launch, assets, tmp_path_factory):
    """One SD LoRA run of 4 updates on two devices, and the same run resumed from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("lora_sd")
    full, resumed = str(root / "full"), str(root / "resumed")
    output = launch.run(T2I, lora_args(assets["pipeline"], assets["images"], full, SD_FLAGS)).output
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    resume = lora_args(assets["pipeline"], assets["images"], resumed, SD_FLAGS, "--resume_from_checkpoint latest")
    resumed_output = launch.run(T2I, resume).output
    return {"full": full, "resumed": resumed, "output": output, "resumed_output": resumed_output, "root": root}


def test_sd_lora_writes_both_files_that_diffusers_loads(sd_run, assets):
    full = sd_run["full"]
    assert sorted(name for name in os.listdir(full) if not name.startswith(".")) == sorted(
        ["README.md", "checkpoint-2", "checkpoint-4", DIFFUSERS_LORA_FILE, "full.safetensors", RUN_CONFIG]
    ), "the adapter's files and the run's settings, not the pipeline"
    check_files(full, assets["pipeline"], ["text_encoder"], ["lora_te_"])
    card = open(os.path.join(full, "README.md")).read()
    assert "- lora\n" in card and f"rank {RANK}, alpha {ALPHA}" in card and f'load_lora_weights("{full}")' in card
    assert "checkpoints hold the adapter and its optimizer state" in sd_run["output"]
    for result in (
        run_flax_python(FUSE_CHECK, assets["pipeline"], full, str(ALPHA / RANK), "named"),  # diffusers 0.39
        run_torch(["-c", FUSE_CHECK, assets["pipeline"], full, str(ALPHA / RANK)]),  # diffusers 0.42
    ):
        components, worst = result.stdout.strip().splitlines()[-1].split(" ", 1)[1].rsplit(" ", 1)
        assert components == "['text_encoder', 'unet']" and float(worst) <= 1e-6, result.stdout


def test_sd_lora_checkpoint_holds_the_adapter_alone_and_resumes_exactly(sd_run):
    """The checkpoint holds the adapter (A, B for each layer), its EMA and optimizer state, no base weight; the run
    resumed at step 2 saves the same LoRA as the uninterrupted one."""
    state = saved_train_state(os.path.join(sd_run["full"], "checkpoint-2"))
    for tree in (state["params"], state["ema_params"]):
        assert sorted(tree) == ["text_encoder", "unet"]
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        assert {str(path[-1].key) for path, _ in leaves} == {"lora_A", "lora_B"}
    assert "starting at 2" in sd_run["resumed_output"]
    assert checkpoint_names(sd_run["resumed"]) == ["checkpoint-2", "checkpoint-4"]
    a, b = (load_file(os.path.join(sd_run[run], DIFFUSERS_LORA_FILE)) for run in ("full", "resumed"))
    assert a.keys() == b.keys() and max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    # The saved LoRA is the EMA of the adapter (checkpoint-4), not the raw one.
    final = saved_train_state(os.path.join(sd_run["full"], "checkpoint-4"))
    module = "down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q"
    ema, raw = (jax_lora.lookup(final[tree]["unet"], module)["lora_B"] for tree in ("ema_params", "params"))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    assert np.array_equal(a[key], np.asarray(ema)) and not np.array_equal(a[key], np.asarray(raw))


def test_a_lora_checkpoint_resumes_only_the_same_lora(sd_run, launch, assets):
    """Another rank, or no LoRA at all (the whole UNet), cannot resume the adapter's checkpoint: refused, naming it."""
    for name, lora in [("other-rank", "--rank 8"), ("whole-unet", "--snr_gamma 5.0")]:
        out = sd_run["root"] / name
        shutil.copytree(os.path.join(sd_run["full"], "checkpoint-2"), out / "checkpoint-2")
        args = lora_args(
            assets["pipeline"], assets["images"], out, SD_FLAGS, "--resume_from_checkpoint latest", lora=lora
        )
        result = launch.run(T2I, args, check=False)
        assert (
            result.returncode != 0
            and "was trained by train_text_to_image_flax.py --rank 4 --lora_alpha 8.0" in result.output
        ), result.output[-3000:]
        assert [n for n in os.listdir(out) if not n.startswith(".")] == ["checkpoint-2"], "nothing written"


def test_sd_lora_as_two_processes_equals_one_process(sd_run, launch, assets):
    """Two JAX processes of one CPU device each (gloo) train the same LoRA as one process with two devices."""
    two = str(sd_run["root"] / "two")
    processes = start_two_processes(launch, T2I, lora_args(assets["pipeline"], assets["images"], two, SD_FLAGS))
    results = [process.finish() for process in processes]
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    assert "Saved the LoRA" in results[0].output and "Saved the LoRA" not in results[1].output
    assert checkpoint_names(two) == ["checkpoint-2", "checkpoint-4"]
    one, other = (load_file(os.path.join(run, DIFFUSERS_LORA_FILE)) for run in (sd_run["full"], two))
    assert max(np.abs(one[k] - other[k]).max() for k in one) <= 1e-6


# -------------------------------------------------------------------------------------------------------- SDXL run


def test_sdxl_lora_in_bf16_trains_both_text_encoders_and_diffusers_loads_it(launch, assets, sdxl_pipeline, tmp_path):
    out = str(tmp_path / "sdxl")
    # --max_token_length: the text encoders' LoRA trains through captions encoded in chunks (issue 32).
    held_out = "--validation_split 0.25 --validation_loss_steps 1"  # held-out captions encoded by the trained LoRA
    result = launch.run(
        T2I, lora_args(sdxl_pipeline, assets["images"], out, SDXL_FLAGS, "--max_token_length 150", held_out)
    )
    assert "on 48 layers (unet, text_encoder, text_encoder_2)" in result.output
    saved = check_files(out, sdxl_pipeline, ["text_encoder", "text_encoder_2"], ["lora_te1_", "lora_te2_"])
    assert any(np.abs(v).max() > 0 for k, v in saved.items() if k.startswith("text_encoder_2.") and ".lora_B." in k)
    assert os.listdir(os.path.join(out, "validation")) == ["final-step-000002.png"]
    records = [json.loads(line) for line in open(os.path.join(out, "validation_loss.jsonl"))]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["per_timestep"]).all() for r in records)
    fused = run_flax_python(FUSE_CHECK, sdxl_pipeline, out, str(ALPHA / RANK), "named").stdout.strip().splitlines()[-1]
    components, worst = fused.split(" ", 1)[1].rsplit(" ", 1)
    assert components == "['text_encoder', 'text_encoder_2', 'unet']" and float(worst) <= 1e-6, fused


# ------------------------------------------------------------------------------------------------ in-process checks


def test_adapter_merges_as_w_plus_scaled_b_a_and_names_pytorch_modules(assets):
    """init_lora: A uniform within 1/sqrt(in), B zero (the base model unchanged); merge_lora: kernel + scale (B A)^T;
    every layer's PyTorch name is a module of the PyTorch UNet."""
    from diffusers import FlaxUNet2DConditionModel

    from sdtrain.jax.models import load_flax_model

    _, params = load_flax_model(FlaxUNet2DConditionModel, assets["pipeline"], "unet", None, jnp.float32)
    adapter = jax_lora.init_lora(params, "unet", ATTENTION, RANK, jax.random.PRNGKey(0))
    layers = jax_lora.adapter_layers(adapter)
    names = {jax_lora.module_name("unet", path) for path, _ in layers}
    weights = load_file(os.path.join(assets["pipeline"], "unet", "diffusion_pytorch_model.safetensors"))
    assert names == {k.removesuffix(".weight") for k in weights if k.endswith(tuple(f".{m}.weight" for m in ATTENTION))}
    merged = jax_lora.merge_lora(params, adapter, 2.0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged), strict=True))
    path, pair = layers[0]
    fan_in = pair["lora_A"].shape[1]
    assert np.abs(pair["lora_A"]).max() <= 1 / np.sqrt(fan_in) and np.abs(pair["lora_A"]).max() > 0.5 / np.sqrt(fan_in)
    b = jax.random.normal(jax.random.PRNGKey(1), pair["lora_B"].shape)
    with_b = jax.tree.map(lambda x: x, adapter)
    jax_lora.lookup(with_b, path)["lora_B"] = b
    kernel = jax_lora.lookup(jax_lora.merge_lora(params, with_b, 2.0), path)["kernel"]
    expected = jax_lora.lookup(params, path)["kernel"] + 2.0 * (b @ pair["lora_A"]).T
    assert np.abs(np.asarray(kernel) - np.asarray(expected)).max() <= 1e-6


@pytest.mark.parametrize(
    "flags,message",
    [
        ("--rank 0", "--rank must be 1 or more (got 0)"),
        ("--lora_alpha 8", "--lora_alpha sets up a LoRA: give --rank too"),
        ("--rank 4 --lora_dropout 0.1", "--lora_dropout: the Flax twin merges the LoRA into the weights"),
        ("--rank 4 --save_single_file", "--save_single_file writes a whole model"),
        ("--rank 4 --train_text_encoder --cache_text_embeddings", "--cache_text_embeddings with --train_text_encoder"),
    ],
)
def test_lora_flag_errors(flags, message, capsys):
    import train_text_to_image_flax

    argv = command_line("--pretrained_model_name_or_path x --train_data_dir y", flags)
    with pytest.raises(SystemExit) as exit_info:
        train_text_to_image_flax.parse_args(argv)
    assert exit_info.value.code != 0 and message in capsys.readouterr().err

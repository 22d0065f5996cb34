"""train_text_to_image.py --rank (LoRA), launched as users launch it, on the tiny SD and SDXL pipelines: the two files
it writes load in diffusers with alpha / rank honoured (the diffusers file and the kohya file for the UIs alike), the
base model is never written, a checkpoint holds the adapter and resumes exactly, two processes train what one does, the
EMA of the adapter is what is saved, and wrong flag combinations are refused before anything loads."""

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from helpers import checkpoint_names, tree_snapshot
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_text_to_image import SCRIPT, base_args

import textual_inversion
import train_text_to_image
from sdtrain.config_file import RUN_CONFIG
from sdtrain.lora import DIFFUSERS_LORA_FILE, ui_lora_path
from sdtrain.torch.lora import CHECKPOINT_FILE as LORA_CHECKPOINT_FILE
from sdtrain.torch.lora import EMA_CHECKPOINT_FILE as LORA_EMA_CHECKPOINT_FILE

RANK, ALPHA = 4, 8.0
# A text encoder trains too; EMA of the adapter; --adam_epsilon 1e-5 as in tests/test_multi_node.py, so that two
# processes match one within TOLERANCE (at 1e-8 Adam amplifies the all-reduce's rounding of near-zero gradients).
LORA = f"--rank {RANK} --lora_alpha {ALPHA:g} --train_text_encoder --use_ema --adam_epsilon 1e-5"
STEPS = "--max_train_steps 4 --checkpointing_steps 2 --random_flip --gradient_accumulation_steps 2"
TOLERANCE = 1e-5
UNET_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # cross-attention: reads the text
TEXT_MODULE = "text_model.encoder.layers.0.self_attn.q_proj"
# What a LoRA checkpoint holds: the adapter and its EMA beside Accelerate's optimizer, schedule and RNG states.
CHECKPOINT_FILES = {
    "checkpoint_metadata.json",
    LORA_CHECKPOINT_FILE,
    LORA_EMA_CHECKPOINT_FILE,
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
}


def lora_file(output_dir):
    return load_file(os.path.join(output_dir, DIFFUSERS_LORA_FILE))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


@pytest.fixture(scope="module")
def sd_runs(launch, assets, tmp_path_factory):
    """The SD run (one process, global batch 2), the same run resumed from its checkpoint-2, the same run on two
    processes of batch 1, and that run's checkpoint-2 resumed on one process."""
    root = tmp_path_factory.mktemp("lora_sd")
    runs = {name: str(root / name) for name in ("one", "resumed", "two", "two_then_one")}
    before = tree_snapshot(assets["pipeline"])
    args = [LORA, STEPS, "--validation_prompts 'a red circle'"]
    runs["output"] = launch.accelerate(SCRIPT, base_args(assets, runs["one"], *args)).output
    assert tree_snapshot(assets["pipeline"]) == before  # the base model is only read
    os.makedirs(runs["resumed"])
    shutil.copytree(os.path.join(runs["one"], "checkpoint-2"), os.path.join(runs["resumed"], "checkpoint-2"))
    resume = "--resume_from_checkpoint latest"
    runs["resumed_output"] = launch.accelerate(SCRIPT, base_args(assets, runs["resumed"], *args, resume)).output
    launch.torchrun(SCRIPT, base_args(assets, runs["two"], LORA, STEPS, "--train_batch_size 1"))
    os.makedirs(runs["two_then_one"])
    shutil.copytree(os.path.join(runs["two"], "checkpoint-2"), os.path.join(runs["two_then_one"], "checkpoint-2"))
    launch.accelerate(SCRIPT, base_args(assets, runs["two_then_one"], LORA, STEPS, resume))
    return runs


@pytest.fixture(scope="module")
def sdxl_run(launch, assets, sdxl_pipeline, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_sdxl") / "run")
    flags = f"--rank {RANK} --lora_alpha {ALPHA:g} --train_text_encoder --max_train_steps 2 --checkpointing_steps 10"
    flags += " --max_token_length 150"  # the text encoders' LoRA trains through captions encoded in chunks (issue 32)
    flags += " --validation_split 0.25 --validation_loss_steps 1"  # held-out captions encoded by the trained LoRA
    launch.accelerate(SCRIPT, ["--pretrained_model_name_or_path", sdxl_pipeline, *base_args(assets, out, flags)[2:]])
    return out


def fused_weights(pipeline, lora_path, modules):
    """The weights of `modules` ((component, module path) pairs) after load_lora_weights(lora_path) and fuse_lora()."""
    pipeline.load_lora_weights(lora_path)
    pipeline.fuse_lora()
    return {
        f"{component}.{path}": getattr(pipeline, component)
        .get_submodule(module_in(getattr(pipeline, component), path))
        .weight.detach()
        .clone()
        for component, path in modules
    }


def module_in(model, path):
    """A text encoder's module path as this transformers version names it (5 drops CLIPTextModel's text_model.)."""
    if path.startswith("text_model.") and not hasattr(model, "text_model"):
        return path.removeprefix("text_model.")
    return path


def check_lora_loads_and_fuses(pipeline_class, base, out, text_encoders):
    """Both files load into the base pipeline with every key used, and fuse to W + (alpha / rank) B @ A."""
    from peft.utils import get_peft_model_state_dict

    state = lora_file(out)
    metadata = json.loads(safe_open(os.path.join(out, DIFFUSERS_LORA_FILE), "pt").metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == RANK and metadata["unet.lora_alpha"] == ALPHA
    components = ["unet", *text_encoders]
    assert {key.split(".")[0] for key in state} == set(components)
    for component in components:  # trained: B moved away from its zero start
        assert max(v.abs().max().item() for k, v in state.items() if k.startswith(component + ".") and "lora_B" in k)
    ui_state = load_file(ui_lora_path(out))
    prefixes = ["lora_unet_", *(["lora_te_"] if len(text_encoders) == 1 else ["lora_te1_", "lora_te2_"])]
    assert {key.split("_")[0] + "_" + key.split("_")[1] + "_" for key in ui_state} == set(prefixes)
    assert all(ui_state[key].item() == ALPHA for key in ui_state if key.endswith(".alpha"))

    pipeline = pipeline_class.from_pretrained(base)
    modules = [("unet", UNET_MODULE)] + [(name, TEXT_MODULE) for name in text_encoders]
    base_weights = {
        f"{c}.{p}": getattr(pipeline, c).get_submodule(module_in(getattr(pipeline, c), p)).weight.detach().clone()
        for c, p in modules
    }
    generate = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    base_image = pipeline("a red circle", generator=torch.manual_seed(0), **generate).images[0]
    pipeline.load_lora_weights(out)
    for component in components:  # every key of the file went into the model, and nothing else is adapted
        model = getattr(pipeline, component)
        loaded = {key for key in get_peft_model_state_dict(model, adapter_name=model.active_adapters()[0])}
        expected = {key.split(".", 1)[1] for key in state if key.startswith(component + ".")}
        assert {module_in(model, key) for key in expected} == loaded, component
    lora_image = pipeline("a red circle", generator=torch.manual_seed(0), **generate).images[0]
    assert abs(lora_image - base_image).max() > 1e-3
    pipeline.fuse_lora()
    fused = {}
    for name, weight in base_weights.items():
        component, path = name.split(".", 1)
        model = getattr(pipeline, component)
        fused[name] = model.get_submodule(module_in(model, path)).weight.detach().clone()
        a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        expected = weight + (ALPHA / RANK) * b @ a
        assert (fused[name] - expected).abs().max().item() <= 1e-5, name
        assert (fused[name] - weight).abs().max().item() > 1e-6, name
    # The UIs' file, read by diffusers' kohya converter, is the same LoRA.
    from_ui = fused_weights(pipeline_class.from_pretrained(base), ui_lora_path(out), modules)
    assert max_difference(from_ui, fused) <= 1e-5


def test_sd_lora_files_load_in_diffusers_with_alpha_and_the_base_is_untouched(sd_runs, assets):
    from diffusers import StableDiffusionPipeline

    out = sd_runs["one"]
    assert sorted(os.listdir(out)) == sorted(
        [DIFFUSERS_LORA_FILE, "one.safetensors", "README.md", "checkpoint-2", "checkpoint-4", "logs", "validation"]
        + [RUN_CONFIG, ".sdtrain-run.json", ".training.lock", ".training.lock.owner"]
    )
    # Its config.toml repeats it: the settings of its command line (whose --seed 7 is the seed the run used).
    repeated = train_text_to_image.parse_args(["--config", os.path.join(out, RUN_CONFIG)])
    original = train_text_to_image.parse_args(
        base_args(assets, out, LORA, STEPS, "--validation_prompts 'a red circle'")
    )
    assert {**vars(repeated), "config": None} == vars(original)
    assert "LoRA rank 4, alpha 8 in unet, text_encoder" in sd_runs["output"]
    card = open(os.path.join(out, "README.md")).read()
    assert "rank 4, alpha 8" in card and "load_lora_weights" in card and "one.safetensors" in card
    assert f"base_model: {assets['pipeline']}" in card
    assert os.listdir(os.path.join(out, "validation")) == ["final-step-000004.png"]
    # safetensors creates files for their owner only; a UI running as another user must be able to read them.
    umask = os.umask(0o022)
    os.umask(umask)
    for name in [DIFFUSERS_LORA_FILE, "one.safetensors"]:
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o666 & ~umask, name
    check_lora_loads_and_fuses(StableDiffusionPipeline, assets["pipeline"], out, ["text_encoder"])


def test_sdxl_lora_adapts_both_text_encoders_in_both_files(sdxl_run, sdxl_pipeline):
    from diffusers import StableDiffusionXLPipeline

    check_lora_loads_and_fuses(StableDiffusionXLPipeline, sdxl_pipeline, sdxl_run, ["text_encoder", "text_encoder_2"])
    assert safe_open(ui_lora_path(sdxl_run), "pt").metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    records = [json.loads(line) for line in open(os.path.join(sdxl_run, "validation_loss.jsonl"))]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["per_timestep"]).all() for r in records)


def test_a_checkpoint_holds_the_adapter_and_resumes_exactly(sd_runs):
    one, resumed = sd_runs["one"], sd_runs["resumed"]
    assert "starting at 2" in sd_runs["resumed_output"]
    assert checkpoint_names(resumed) == ["checkpoint-2", "checkpoint-4"]
    for name in ("checkpoint-2", "checkpoint-4"):
        folder = os.path.join(one, name)
        assert set(os.listdir(folder)) == CHECKPOINT_FILES, name  # no unet/: the base model is not copied
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
    assert size < 1_000_000  # the tiny UNet alone is several MiB
    assert f"Saved {folder} ({size / 2**20:.2f} MiB)" in sd_runs["output"]
    # Bit for bit: the final (EMA) file, the checkpoint's adapter and its EMA (the tensors and the metadata; the
    # safetensors header lists the metadata in no fixed order).
    final, final_resumed = (os.path.join(run, DIFFUSERS_LORA_FILE) for run in (one, resumed))
    assert max_difference(load_file(final), load_file(final_resumed)) == 0
    assert safe_open(final, "pt").metadata() == safe_open(final_resumed, "pt").metadata()
    for name in (LORA_CHECKPOINT_FILE, LORA_EMA_CHECKPOINT_FILE):
        a, b = (load_file(os.path.join(run, "checkpoint-4", name)) for run in (one, resumed))
        assert max_difference(a, b) == 0, name


def test_the_ema_of_the_adapter_is_what_is_saved(sd_runs):
    out = sd_runs["one"]
    final = lora_file(out)
    ema = load_file(os.path.join(out, "checkpoint-4", LORA_EMA_CHECKPOINT_FILE))
    raw = load_file(os.path.join(out, "checkpoint-4", LORA_CHECKPOINT_FILE))
    assert max_difference(final, ema) == 0
    assert max_difference(final, raw) > 1e-6


def test_two_processes_train_what_one_process_with_the_same_global_batch_trains(sd_runs):
    reference = lora_file(sd_runs["one"])
    assert max_difference(reference, lora_file(sd_runs["two"])) <= TOLERANCE
    # Elastic resume: the two processes' checkpoint finished on one.
    assert max_difference(reference, lora_file(sd_runs["two_then_one"])) <= TOLERANCE
    trained = max(v.abs().max().item() for k, v in reference.items() if "lora_B" in k)
    assert trained > 100 * TOLERANCE


LORA_ERRORS = {
    "rank_zero": (["--rank", "0"], "--rank must be 1 or more (got 0)"),
    "unknown_layer": (["--rank", "4", "--lora_layers", "to_q,nonsense"], "unknown module 'nonsense'"),
    "alpha_without_rank": (["--lora_alpha", "8"], "--lora_alpha sets up a LoRA: give --rank too"),
    "single_file": (
        ["--rank", "4", "--save_single_file"],
        "--save_single_file writes a whole model; a LoRA run always writes",
    ),
    "cached_text": (
        ["--rank", "4", "--train_text_encoder", "--cache_text_embeddings"],
        "--cache_text_embeddings with --train_text_encoder",
    ),
    "non_ema_revision": (["--rank", "4", "--non_ema_revision", "other"], "--non_ema_revision with --rank"),
}


@pytest.mark.parametrize("case", sorted(LORA_ERRORS))
def test_lora_flags_that_cannot_work_are_refused_naming_the_flag(case, capsys):
    flags, message = LORA_ERRORS[case]
    with pytest.raises(SystemExit) as exit_info:
        train_text_to_image.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", *flags])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_textual_inversion_has_no_lora(capsys):
    with pytest.raises(SystemExit):
        textual_inversion.parse_args(
            ["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", "--placeholder_token", "<x>"]
            + ["--initializer_token", "x", "--rank", "4"]
        )
    assert "unrecognized arguments: --rank 4" in capsys.readouterr().err


def test_a_diverged_lora_is_never_written(launch, assets, tmp_path):
    """The finite check covers the adapter's tensors (here: the text encoder's, whose update overflows too)."""
    out = tmp_path / "run"
    flags = "--rank 4 --train_text_encoder --learning_rate 1e39 --max_train_steps 3 --checkpointing_steps 1"
    result = launch.accelerate(SCRIPT, base_args(assets, str(out), flags), check=False)
    assert result.returncode != 0 and "the LoRA diverged at step 1 (non-finite values in unet." in result.output
    assert ".lora_A.weight" in result.output.split("diverged at step 1", 1)[1].split("\n")[0]
    assert not os.path.exists(out), f"a diverged run left {os.listdir(out)}"


def test_a_lora_checkpoint_resumes_only_the_same_lora(sd_runs, launch, assets, tmp_path):
    """Another alpha would resume at another scale without a word: the checkpoint records its LoRA flags, and a run
    with others is refused, naming both, before anything is written."""
    out = tmp_path / "other-alpha"
    shutil.copytree(os.path.join(sd_runs["one"], "checkpoint-2"), out / "checkpoint-2")
    other = LORA.replace(f"--lora_alpha {ALPHA:g}", "--lora_alpha 16")
    args = base_args(assets, str(out), other, STEPS, "--resume_from_checkpoint latest")
    result = launch.accelerate(SCRIPT, args, check=False)
    trained_as = f"was trained by train_text_to_image.py --rank {RANK} --lora_alpha {ALPHA}"
    assert result.returncode != 0 and trained_as in result.output, result.output[-3000:]
    assert "this run is train_text_to_image.py --rank 4 --lora_alpha 16.0" in result.output
    assert os.listdir(out) == ["checkpoint-2"], "nothing written"

"""textual_inversion.py, launched as users launch it, on the tiny pipeline at 64 px."""

import os
import shutil

import numpy as np
import pytest
import torch
from helpers import checkpoint_names, earlier_run_folder, load_state_dict, tree_snapshot
from PIL import Image
from safetensors.torch import load_file

import textual_inversion
from devkit import tiny_sd
from devkit.command_line import command_line

SCRIPT = "textual_inversion.py"
REFERENCE_FLAGS = """
--save_steps --save_as_full_pipeline --num_vectors --pretrained_model_name_or_path --revision --variant
--tokenizer_name --train_data_dir --placeholder_token --initializer_token --learnable_property --repeats --output_dir
--seed --resolution --center_crop --train_batch_size --num_train_epochs --max_train_steps --gradient_accumulation_steps
--gradient_checkpointing --learning_rate --scale_lr --lr_scheduler --lr_warmup_steps --lr_num_cycles
--dataloader_num_workers --adam_beta1 --adam_beta2 --adam_weight_decay --adam_epsilon --push_to_hub --hub_token
--hub_model_id --logging_dir --mixed_precision --allow_tf32 --report_to --validation_prompt --num_validation_images
--validation_steps --validation_epochs --local_rank --checkpointing_steps --checkpoints_total_limit
--resume_from_checkpoint --enable_xformers_memory_efficient_attention --no_safe_serialization""".split()
BEYOND_REFERENCE = {"--snr_gamma", "--prediction_type", "--max_grad_norm", "--cache_latents", "--torch_compile"}
BEYOND_REFERENCE |= {"--logging_steps", "--cache_dir"}


@pytest.fixture(scope="module")
def concept(assets, tmp_path_factory):
    return tiny_sd.write_concept_folder(str(tmp_path_factory.mktemp("concept")), num_images=4, size=72)


def base_args(assets, concept, output_dir, *extra):
    """The tiny run's command line; `extra` are more flags, written as on a shell command line."""
    paths = [
        "--pretrained_model_name_or_path",
        assets["pipeline"],
        "--train_data_dir",
        concept,
        "--output_dir",
        output_dir,
    ]
    token = "--placeholder_token <blob> --initializer_token circle --resolution 64 --repeats 3 --train_batch_size 2"
    return command_line(*paths, token, "--learning_rate 5e-2 --lr_warmup_steps 0 --seed 5", *extra)


def test_every_reference_flag_exists():
    required = "--pretrained_model_name_or_path x --train_data_dir y --placeholder_token <t> --initializer_token toy"
    args = textual_inversion.parse_args(required.split())
    flags = {"--" + name for name in vars(args)}
    assert set(REFERENCE_FLAGS) - flags == set()
    assert BEYOND_REFERENCE <= flags
    assert args.max_grad_norm == 0, "clipping stays off by default, as in the reference recipe"


def test_embeddings_load_in_diffusers_and_generate(launch, assets, concept, tmp_path):
    out = str(tmp_path / "run")
    flags = "--num_vectors 3 --max_train_steps 6 --save_steps 2 --checkpointing_steps 100"
    validation = "--validation_prompt 'a <blob> on a table' --num_validation_images 2 --validation_steps 4"
    launch.accelerate(SCRIPT, base_args(assets, concept, out, flags, validation))
    embeds = load_file(os.path.join(out, "learned_embeds.safetensors"))
    assert list(embeds) == ["<blob>"] and embeds["<blob>"].shape == (3, 32) and embeds["<blob>"].dtype == torch.float32
    assert sorted(n for n in os.listdir(out) if n.startswith("learned_embeds-steps-")) == [
        "learned_embeds-steps-2.safetensors",
        "learned_embeds-steps-4.safetensors",
        "learned_embeds-steps-6.safetensors",
    ]
    assert torch.equal(load_file(os.path.join(out, "learned_embeds-steps-6.safetensors"))["<blob>"], embeds["<blob>"])
    assert not torch.equal(
        load_file(os.path.join(out, "learned_embeds-steps-2.safetensors"))["<blob>"], embeds["<blob>"]
    )
    assert sorted(os.listdir(os.path.join(out, "validation"))) == [
        "final-step-000006.png",
        "validation-step-000004.png",
    ]
    grid = Image.open(os.path.join(out, "validation", "final-step-000006.png"))
    assert grid.width == 128 and grid.height > 64, "two 64 px pictures, their prompt under each"

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(assets["pipeline"])
    pipe.load_textual_inversion(os.path.join(out, "learned_embeds.safetensors"))
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("a <blob>", pipe.tokenizer)).input_ids
    assert ids[2:5] == pipe.tokenizer.convert_tokens_to_ids(["<blob>", "<blob>_1", "<blob>_2"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids[2:5]], embeds["<blob>"])
    # The UIs' file (--embedding_format both, the default): the same rows under "emb_params", named for the prompt
    # word the UIs take from the file name; diffusers reads it too, told the token.
    ui_file = os.path.join(out, "blob.safetensors")
    assert load_file(ui_file).keys() == {"emb_params"} and torch.equal(
        load_file(ui_file)["emb_params"], embeds["<blob>"]
    )
    other = StableDiffusionPipeline.from_pretrained(assets["pipeline"])
    other.load_textual_inversion(ui_file, token="<blob>")
    assert torch.equal(other.text_encoder.get_input_embeddings().weight[ids[2:5]], embeds["<blob>"])
    image = pipe(
        "a photo of a <blob>", num_inference_steps=2, height=64, width=64, generator=torch.manual_seed(0)
    ).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_only_the_new_rows_change(launch, assets, concept, tmp_path):
    """With a large learning rate and weight decay, every pre-existing embedding row and every other weight of the text
    encoder, UNet and VAE stays bit-identical; the new rows move away from the initializer. (The learning rate stays
    under what the divergence check refuses: rows of 100 times the vocabulary's longest.)"""
    out = str(tmp_path / "run")
    flags = "--num_vectors 2 --max_train_steps 4 --learning_rate 0.2 --adam_weight_decay 0.5 --save_as_full_pipeline"
    launch.accelerate(SCRIPT, base_args(assets, concept, out, flags, "--checkpointing_steps 100"))
    from transformers import CLIPTextModel, CLIPTokenizer

    assert all(k.startswith("text_model.") for k in load_file(os.path.join(out, "text_encoder", "model.safetensors")))
    original = CLIPTextModel.from_pretrained(assets["pipeline"], subfolder="text_encoder").state_dict()
    trained = CLIPTextModel.from_pretrained(out, subfolder="text_encoder").state_dict()
    table = next(name for name in original if name.endswith("token_embedding.weight"))
    vocab = original[table].shape[0]
    assert trained[table].shape[0] == vocab + 2
    assert torch.equal(trained[table][:vocab], original[table])
    for name in original:
        if name != table:
            assert torch.equal(trained[name], original[name]), name
    initializer = CLIPTokenizer.from_pretrained(assets["pipeline"], subfolder="tokenizer").convert_tokens_to_ids(
        "circle</w>"
    )
    assert (trained[table][vocab:] - original[table][initializer]).abs().max() > 1e-2
    assert torch.equal(trained[table][vocab:], load_file(os.path.join(out, "learned_embeds.safetensors"))["<blob>"])
    for part in ("unet", "vae"):
        assert (
            load_state_dict(os.path.join(out, part)).keys()
            == load_state_dict(os.path.join(assets["pipeline"], part)).keys()
        )
        for name, value in load_state_dict(os.path.join(out, part)).items():
            assert torch.equal(value, load_state_dict(os.path.join(assets["pipeline"], part))[name]), f"{part}.{name}"

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.tokenizer.convert_tokens_to_ids(["<blob>", "<blob>_1"]) == [vocab, vocab + 1]
    pipe("a <blob>", num_inference_steps=2, height=64, width=64)


EXACT = (
    "--num_vectors 2 --max_train_steps 8 --checkpointing_steps 2 --checkpoints_total_limit 3"
    " --gradient_accumulation_steps 2 --lr_scheduler cosine --lr_warmup_steps 2 --snr_gamma 5.0 --center_crop"
)


def test_checkpoints_and_exact_resume(launch, assets, concept, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    launch.accelerate(SCRIPT, base_args(assets, concept, full, EXACT))
    # 4 images x 3 repeats / (batch 2 x accumulation 2) = 3 updates per epoch; checkpoints every 2, the last 3 kept.
    assert checkpoint_names(full) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    checkpoint = os.listdir(os.path.join(full, "checkpoint-4"))
    assert "learned_embeds.safetensors" in checkpoint and not [n for n in checkpoint if n.startswith("model")]
    # A run stopped after step 4 (mid-epoch 1) and resumed.
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-4"), os.path.join(resumed, "checkpoint-4"))
    result = launch.accelerate(SCRIPT, base_args(assets, concept, resumed, EXACT, "--resume_from_checkpoint latest"))
    assert "starting at 4" in result.output
    assert checkpoint_names(resumed) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    a = load_file(os.path.join(full, "learned_embeds.safetensors"))["<blob>"]
    b = load_file(os.path.join(resumed, "learned_embeds.safetensors"))["<blob>"]
    assert (a - b).abs().max() <= 1e-6

    result = launch.accelerate(SCRIPT, base_args(assets, concept, resumed, EXACT, "--resume_from_checkpoint latest"))
    assert "nothing to train" in result.output


def test_min_snr_v_prediction_bf16_gradient_checkpointing_and_bin(launch, assets, concept, tmp_path):
    out = str(tmp_path / "run")
    flags = "--max_train_steps 3 --snr_gamma 5.0 --prediction_type v_prediction --mixed_precision bf16"
    more = "--gradient_checkpointing --no_safe_serialization --max_grad_norm 1.0 --learnable_property style"
    validation = (
        "--validation_prompt 'a painting in the style of <blob>' --num_validation_images 1 --validation_steps 2"
    )
    launch.accelerate(SCRIPT, base_args(assets, concept, out, flags, more, validation, "--checkpointing_steps 100"))
    embeds = torch.load(os.path.join(out, "learned_embeds.bin"))
    assert list(embeds) == ["<blob>"] and embeds["<blob>"].shape == (1, 32) and torch.isfinite(embeds["<blob>"]).all()
    assert torch.equal(torch.load(os.path.join(out, "blob.bin"))["emb_params"], embeds["<blob>"])
    assert sorted(os.listdir(os.path.join(out, "validation"))) == [
        "final-step-000003.png",
        "validation-step-000002.png",
    ]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(assets["pipeline"])
    pipe.load_textual_inversion(os.path.join(out, "learned_embeds.bin"))
    assert "<blob>" in pipe.tokenizer.get_vocab()


def test_two_processes_train_what_one_process_with_the_same_global_batch_trains(launch, assets, concept, tmp_path):
    out, one = str(tmp_path / "run"), str(tmp_path / "one")
    flags = "--max_train_steps 3 --checkpointing_steps 2 --save_steps 2 --cache_latents --embedding_format diffusers"
    flags += " --adam_epsilon 1e-5"  # see test_multi_node: Adam at 1e-8 amplifies the all-reduce's rounding
    result = launch.torchrun(SCRIPT, base_args(assets, concept, out, flags))
    assert "processes = 2" in result.output and "total batch = 4" in result.output
    assert "Cached latents: (4, 2, 8, 8, 8)" in result.output  # encoded half by each process, gathered by both
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert sorted(n for n in os.listdir(out) if n.startswith("learned_embeds")) == [
        "learned_embeds-steps-2.safetensors",
        "learned_embeds.safetensors",
    ]
    assert not [n for n in os.listdir(out) if n.endswith(".partial")] and not os.path.exists(
        os.path.join(out, "blob.safetensors")
    )
    launch.accelerate(SCRIPT, base_args(assets, concept, one, flags, "--train_batch_size 4"))
    rows = {run: load_file(os.path.join(run, "learned_embeds.safetensors"))["<blob>"] for run in (out, one)}
    difference = (rows[out] - rows[one]).abs().max().item()
    print(f"2 processes x 2 vs 1 x 4: {difference:.2e}")
    last_step = (rows[one] - load_file(os.path.join(one, "learned_embeds-steps-2.safetensors"))["<blob>"]).abs().max()
    # Only the reduction order differs. Measured: 3.5e-7 on an Intel Xeon, 1.4e-5 on an AMD EPYC (the same on the
    # commit before sdtrain), against a last step of 4.6e-2: the bound is a thousandth of what one step changes.
    assert difference <= last_step / 1000


# ---------------------------------------------------------------------------------------------------- clear errors


def empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    return str(tmp_path / "empty")


def broken_folder(tmp_path, concept):
    shutil.copytree(concept, tmp_path / "broken")
    (tmp_path / "broken" / "concept_9.jpg").write_bytes(b"not a jpeg")
    return str(tmp_path / "broken")


ERROR_CASES = {
    "initializer_two_tokens": (
        lambda t, c: ["--initializer_token", "squares"],
        ["--initializer_token 'squares' must be exactly one token", "'squa', 're', 's</w>'"],
    ),
    "placeholder_is_a_word": (
        lambda t, c: ["--placeholder_token", "a"],
        ["--placeholder_token a: 'a' already exists in the tokenizer (as 'a</w>')"],
    ),
    "placeholder_is_a_subword": (
        lambda t, c: ["--placeholder_token", "squ"],
        ["'squ' already exists in the tokenizer (as 'squ')"],
    ),
    "placeholder_vector_name_taken": (
        lambda t, c: ["--placeholder_token", "<|startoftext|>"],
        ["already exists in the tokenizer"],
    ),
    "missing_folder": (
        lambda t, c: ["--train_data_dir", str(t / "nowhere")],
        ["--train_data_dir", "nowhere: no such folder"],
    ),
    "empty_folder": (lambda t, c: ["--train_data_dir", empty_folder(t)], ["empty: no images"]),
    "unreadable_image": (
        lambda t, c: ["--train_data_dir", broken_folder(t, c)],
        ["cannot read image", os.path.join("broken", "concept_9.jpg")],
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_clear_errors_write_nothing(launch, assets, concept, tmp_path, case):
    make_args, expected = ERROR_CASES[case]
    out = tmp_path / "previous_run"
    earlier_run_folder(out)
    (out / "learned_embeds.safetensors").write_bytes(b"embeddings of an earlier run")
    before = tree_snapshot(str(out))
    args = base_args(assets, concept, str(out), "--max_train_steps 2")
    overrides = make_args(tmp_path, concept)
    for flag, value in zip(overrides[::2], overrides[1::2], strict=True):
        index = args.index(flag)
        args[index + 1] = value
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0
    for text in expected:
        assert text in result.output, f"expected {text!r} in:\n{result.output[-3000:]}"
    after = tree_snapshot(str(out))
    assert {k: v for k, v in after.items() if k in before} == before, "a failed run changed existing files"
    assert not [k for k in after if k not in before and not k.startswith(".training.lock")], "it wrote new files"

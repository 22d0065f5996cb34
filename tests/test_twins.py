"""The four scripts stand alone, so helpers are copied between them. This file lists every copied helper in one place
and keeps the copies identical as code: definitions are compared as syntax trees, so comments may differ and code may
not. It also checks that each Flax twin keeps its PyTorch twin's flags and the same shape of diffusion_loss. The
scripts are read, not imported, so this runs in either environment."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I, TI = "train_text_to_image.py", "textual_inversion.py"
T2I_FLAX, TI_FLAX = "train_text_to_image_flax.py", "textual_inversion_flax.py"

# The scripts that carry an identical copy -> the top-level names copied among them.
COPIED = {
    (T2I, TI, T2I_FLAX, TI_FLAX): """
        CHECKPOINT_PATTERN CHECKPOINT_METADATA derive_seed list_checkpoints find_resume_checkpoint
        read_checkpoint_metadata choose_seed warn_if_batch_layout_changed format_logs push_to_hub files_to_upload
        LOCK_FILE PIPELINE_LINK PIPELINE_VERSION PREEMPTED_EXIT_CODE fsync_folder fsync_tree write_failure
        lock_output_dir checkpoint_problem write_checkpoint_metadata publish_checkpoint load_rgb verify_image
        inspect_images StopRequest preemption_message add_recipe_arguments check_recipe_arguments recipe_fields
        timestep_bias_weights VALIDATION_SEED_KEY parse_size cut_into_batches shuffled_batches
    """.split(),
    (T2I, TI, T2I_FLAX): """
        exchange_entries point_link link_component next_pipeline_version publish_pipeline
    """.split(),
    (T2I, TI): """
        LR_SCHEDULERS tokenize encode_once GlobalBatchSampler BatchShare collate default_num_workers LogWindow
        load_component LossConfig diffusion_loss save_checkpoint render_validation_images log_validation
        write_hub_style_text_encoder stop_agreed check_finite optimizer_tensors inference_scheduler
        OPTIMIZERS OPTIMIZER_PACKAGES add_optimizer_arguments check_optimizer_arguments make_optimizer
    """.split(),
    (T2I_FLAX, TI_FLAX): """
        LR_SCHEDULERS epoch_batches resolve_pipeline_folder load_flax_model load_flax_text_encoder
        enable_block_rematerialisation learning_rate_schedule make_optimizer LogWindow LossConfig diffusion_loss
        save_checkpoint restore_train_state stop_agreed check_finite rescale_zero_terminal_snr load_noise_scheduler
        OPTIMIZERS add_optimizer_arguments check_optimizer_arguments evaluation_params ValidationModels
        load_validation_scheduler make_renderer validation_renderer render_validation_images save_validation_grid
        inference_scheduler_config start_distributed TRAIN_STATE
    """.split(),
    (T2I, T2I_FLAX): """
        load_image_caption_dataset BUCKET_SEED_KEY parse_buckets bucket_step generate_buckets assign_buckets
        bucket_batches describe_buckets setup_buckets CaptionConfig edit_caption validation_weights
        SINGLE_FILE_DTYPES SD_DOWN_BLOCKS SD_UP_BLOCKS LDM_RESNET_NAMES LDM_VAE_RESNET_NAMES LDM_VAE_ATTENTION_NAMES
        OPEN_CLIP_LAYER_NAMES single_file_layout ldm_unet_prefixes ldm_vae_prefixes rename_by_prefix open_clip_state
        component_configs read_component_weights original_layout_state write_single_file single_file_metadata
        save_single_file
    """.split(),
    (TI, TI_FLAX): """
        IMAGE_EXTENSIONS OBJECT_TEMPLATES STYLE_TEMPLATES find_example_images add_placeholder_tokens
        initializer_token_id UI_EMBEDDING_KEY ui_embedding_name embedding_files
    """.split(),
}
# The names the math uses in all four scripts (diffusers' names).
DOMAIN_NAMES = {"latents", "noise", "timesteps", "noisy_latents", "encoder_hidden_states", "model_pred", "target"}
# Flags a Flax twin may have that its PyTorch twin does not.
FLAX_ONLY_FLAGS = {
    "--jax_distributed",
    "--coordinator_address",
    "--num_processes",
    "--process_id",
    "--heartbeat_timeout_seconds",
}


def definitions(script):
    """Top-level functions, classes and assignments of a script, as syntax trees by name."""
    tree = ast.parse(open(os.path.join(REPO, script)).read())
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node
    return found


@pytest.mark.parametrize(
    "scripts", sorted(COPIED), ids=lambda scripts: "+".join(s.removesuffix(".py") for s in scripts)
)
def test_copied_helpers_are_identical_code(scripts):
    trees = {script: definitions(script) for script in scripts}
    for name in COPIED[scripts]:
        dumps = {script: ast.dump(trees[script][name]) for script in scripts if name in trees[script]}
        assert len(dumps) == len(scripts), f"{name} is missing from {set(scripts) - set(dumps)}"
        assert len(set(dumps.values())) == 1, f"{name} differs among {', '.join(scripts)}"


def test_the_drift_check_sees_code_changes_and_not_comments():
    one = ast.parse("def f(x):\n    # a comment\n    return x + 1\n").body[0]
    other_comment = ast.parse("def f(x):\n    # another comment\n    return x + 1\n").body[0]
    other_code = ast.parse("def f(x):\n    # a comment\n    return x + 2\n").body[0]
    assert ast.dump(one) == ast.dump(other_comment) and ast.dump(one) != ast.dump(other_code)


def assigned_names(function):
    """The names a function assigns, in order of first assignment."""
    names = []
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name) and name.id not in names:
                    names.append(name.id)
    return names


@pytest.mark.parametrize("torch_script,flax_script", [(T2I, T2I_FLAX), (TI, TI_FLAX)])
def test_diffusion_loss_twins_compute_the_same_names_in_the_same_order(torch_script, flax_script):
    torch_loss, flax_loss = definitions(torch_script)["diffusion_loss"], definitions(flax_script)["diffusion_loss"]
    torch_names, flax_names = assigned_names(torch_loss), assigned_names(flax_loss)
    # JAX splits its key first; apart from that, it computes the PyTorch names in the PyTorch order.
    flax_names = [name for name in flax_names if not name.endswith("_rng")]
    assert [name for name in torch_names if name in flax_names] == flax_names
    # Neither reads the flags: everything it depends on comes through its arguments and the config.
    for loss in (torch_loss, flax_loss):
        assert DOMAIN_NAMES <= set(assigned_names(loss)) | {argument.arg for argument in loss.args.args}
        assert "args" not in {node.id for node in ast.walk(loss) if isinstance(node, ast.Name)}
    configs = [definitions(script)["LossConfig"] for script in (torch_script, flax_script)]
    assert config_fields(configs[1]) <= config_fields(configs[0])


def config_fields(dataclass):
    return {node.target.id for node in dataclass.body if isinstance(node, ast.AnnAssign)}


def flags(script):
    tree = ast.parse(open(os.path.join(REPO, script)).read())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return {call.args[0].value for call in calls if getattr(call.func, "attr", "") == "add_argument"}


@pytest.mark.parametrize("torch_script,flax_script", [(T2I, T2I_FLAX), (TI, TI_FLAX)])
def test_flax_flags_are_a_subset_of_the_pytorch_twin(torch_script, flax_script):
    assert flags(flax_script) - flags(torch_script) - FLAX_ONLY_FLAGS == set()
    assert len(flags(flax_script)) > 30

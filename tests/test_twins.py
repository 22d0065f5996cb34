"""The four scripts share their machinery through the sdtrain package and copy only the recipe a user edits. This
file lists every deliberate copy in one place and keeps the copies identical as code: definitions are compared as
syntax trees, so comments may differ and code may not. It also checks that each Flax twin keeps its PyTorch twin's
flags and the same shape of diffusion_loss. The scripts are read, not imported, so this runs in either environment."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I, TI = "train_text_to_image.py", "textual_inversion.py"
T2I_FLAX, TI_FLAX = "train_text_to_image_flax.py", "textual_inversion_flax.py"

# What the scripts still copy on purpose: the recipe a user edits (the loss, its config, the optimizer and schedule),
# kept identical between scripts of the same framework. Everything else lives once, in sdtrain/. OPTIMIZER_PACKAGES
# stays beside the optimizer flags: parse_args reads it before the frameworks (and so sdtrain.torch) load.
COPIED = {
    (T2I, TI): """
        LR_SCHEDULERS OPTIMIZERS OPTIMIZER_PACKAGES add_optimizer_arguments check_optimizer_arguments make_optimizer
        LossConfig diffusion_loss
    """.split(),
    (T2I_FLAX, TI_FLAX): """
        LR_SCHEDULERS OPTIMIZERS add_optimizer_arguments check_optimizer_arguments make_optimizer learning_rate_schedule
        LossConfig diffusion_loss train_step
    """.split(),
    (T2I, T2I_FLAX): """
        validation_weights model_card
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


def added_flags(tree):
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return {call.args[0].value for call in calls if getattr(call.func, "attr", "") == "add_argument"}


def flags(script):
    """The flags a script's parser defines: its own, and those of the sdtrain add_*_argument(s) functions it calls."""
    tree = ast.parse(open(os.path.join(REPO, script)).read())
    found = added_flags(tree)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdtrain."):
            module = ast.parse(open(os.path.join(REPO, *node.module.split(".")) + ".py").read())
            adders = {alias.name for alias in node.names if alias.name.startswith("add_") and "_argument" in alias.name}
            for function in module.body:
                if isinstance(function, ast.FunctionDef) and function.name in adders:
                    found |= added_flags(function)
    return found


@pytest.mark.parametrize("torch_script,flax_script", [(T2I, T2I_FLAX), (TI, TI_FLAX)])
def test_flax_flags_are_a_subset_of_the_pytorch_twin(torch_script, flax_script):
    assert flags(flax_script) - flags(torch_script) - FLAX_ONLY_FLAGS == set()
    assert len(flags(flax_script)) > 30

"""The sdtrain package, which the four scripts import from their own folder: a framework-free core (sdtrain/*.py) that
imports in either environment and names no framework anywhere in its source, framework adapters in sdtrain/torch/ and
sdtrain/jax/, and a package the scripts find without any install step. Also the size targets of issue 30."""

import ast
import importlib
import os
import subprocess
import sys

import pytest
from conftest import REPO

# What the core never imports: the frameworks and the libraries built on them.
FRAMEWORKS = ["torch", "torchvision", "jax", "flax", "optax", "orbax", "diffusers", "transformers", "accelerate"]
CORE = os.path.join(REPO, "sdtrain")
CORE_MODULES = sorted(name[:-3] for name in os.listdir(CORE) if name.endswith(".py") and name != "__init__.py")
SCRIPTS = ["train_text_to_image.py", "textual_inversion.py", "train_text_to_image_flax.py", "textual_inversion_flax.py"]
# Issue 30's targets: a script a newcomer can read, and a main() that reads in one sitting.
MAX_SCRIPT_LINES = 1300
MAX_MAIN_LINES = 300


def imported_modules(path):
    """Every module a source file imports, at the top or inside a function, as top-level package names."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_importing_every_core_module_imports_no_framework():
    assert {"run_folder", "seeds", "images", "batching", "captions", "single_file", "families"} <= set(CORE_MODULES)
    probe = (
        "import importlib, sys\n"
        f"for module in {CORE_MODULES!r}:\n"
        "    importlib.import_module('sdtrain.' + module)\n"
        f"print(sorted(name for name in {FRAMEWORKS!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", CORE_MODULES)
def test_a_core_module_names_no_framework_anywhere(module):
    """Not even inside a function: the core's contract holds for every call, not only at import time."""
    assert imported_modules(os.path.join(CORE, module + ".py")).isdisjoint(FRAMEWORKS)


def function_lines(path, name):
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    (node,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    return node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_stays_readable(script):
    with open(os.path.join(REPO, script)) as f:
        lines = len(f.read().splitlines())
    assert lines <= MAX_SCRIPT_LINES, f"{script}: {lines} lines"


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_reads_in_one_sitting(script):
    lines = function_lines(os.path.join(REPO, script), "main")
    assert lines <= MAX_MAIN_LINES, f"{script}: main() is {lines} lines"


def test_a_script_finds_the_package_beside_it_from_any_folder(tmp_path):
    """Launched by path from elsewhere (no install, no PYTHONPATH), as a user runs a copy of the repository."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    script = os.path.join(REPO, "train_text_to_image.py")
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Grouped flags, each with its default.
    assert "Model:" in result.stdout and "Checkpointing:" in result.stdout
    assert "(default: 512)" in result.stdout


def imports_inside_functions(path):
    """(function, modules) for every import statement inside a function of a source file."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    for function in (node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield (
                    function.name,
                    {alias.name for alias in node.names} if isinstance(node, ast.Import) else {node.module},
                )


@pytest.mark.parametrize("adapter", ["torch", "jax"])
def test_the_adapters_import_their_framework_at_the_top(adapter):
    """sdtrain/torch/ and sdtrain/jax/: no import inside a function, bar the optional packages a flag asks for. The
    PyTorch adapters also import here (no cycle among them); tests_flax/test_flax_units.py imports the JAX ones."""
    folder = os.path.join(REPO, "sdtrain", adapter)
    optional = {"wandb"}
    names = sorted(name[:-3] for name in os.listdir(folder) if name.endswith(".py"))
    assert {"family", "models", "checkpoints", "validation", "loop"} <= set(names)
    for name in names:
        if adapter == "torch":
            importlib.import_module(f"sdtrain.torch.{name}")
        for function, modules in imports_inside_functions(os.path.join(folder, f"{name}.py")):
            assert modules <= optional, f"sdtrain/{adapter}/{name}.py {function}() imports {modules}"

"""A run depends on its global batch, not on how many processes share it: two "nodes" (torchrun --nnodes 2 on this
machine, meeting on 127.0.0.1) and one process with the same global batch train the same UNet, and a checkpoint
written by either resumes on the other and ends where an uninterrupted run ends. The two nodes start without --seed:
node 0's draw must be every node's seed."""

import json
import os
import shutil

import numpy as np
from helpers import checkpoint_names, load_state_dict, max_abs_diff
from test_train_text_to_image import SCRIPT, base_args

from devkit.command_line import recorded_seed, without_seed

# Every kind of draw: the VAE sample, noise, offset noise, input perturbation, timesteps; flips and dropped captions.
# 10 images, one held out for the validation loss: 9 in global batches of 4 make 3 batches an epoch, the last padded;
# accumulation 2 makes its last update short. checkpoint-3 falls in the middle of the second epoch.
FLAGS = """--gradient_accumulation_steps 2 --max_train_steps 5 --checkpointing_steps 3 --random_flip --noise_offset 0.05
--input_perturbation 0.1 --proportion_empty_prompts 0.2 --snr_gamma 5 --adam_epsilon 1e-5 --report_to none
--validation_split 0.1 --validation_loss_steps 3""".split()
# Only the order of the gradient reduction differs (DDP's all-reduce against one process's batch mean), in fp32. Adam
# divides each gradient by its own size plus epsilon, so at the default epsilon (1e-8) the rounding of near-zero
# gradients moves weights by up to the learning rate (measured: 5e-5 after one step, with the same loss and gradient
# norm); at 1e-5 the two runs differ by 1.7e-7 after one step.
TOLERANCE = 1e-5


def resumed_copy(source, destination):
    """A fresh output folder holding source's checkpoint-3, to resume from as another launch would."""
    os.makedirs(destination)
    shutil.copytree(os.path.join(source, "checkpoint-3"), os.path.join(destination, "checkpoint-3"))
    return destination


def unet(output_dir):
    return load_state_dict(os.path.join(output_dir, "unet"))


def validation_losses(output_dir):
    with open(os.path.join(output_dir, "validation_loss.jsonl")) as f:
        return {record["step"]: record["per_timestep"] for record in map(json.loads, f)}


def assert_same_unet(reference, output_dir, what):
    difference = max_abs_diff(reference, unet(output_dir))
    print(f"{what}: {difference:.2e}")
    assert difference <= TOLERANCE, what


def test_two_nodes_and_one_process_with_the_same_global_batch_train_and_resume_the_same_run(launch, assets, tmp_path):
    nodes, one = str(tmp_path / "nodes"), str(tmp_path / "one")
    # 2 nodes x 1 process x batch 2 x accumulation 2, no --seed; then 1 process x batch 4 x accumulation 2 with the seed
    # the nodes' checkpoint recorded. Had node 1 drawn its own seed, it would shuffle and draw noise differently.
    head, other = launch.torchrun_nodes(SCRIPT, without_seed(base_args(assets, nodes, *FLAGS)))
    assert "processes = 2" in head.output and "total batch = 8" in head.output
    assert "Saved" in head.output and "Saved" not in other.output  # only the main process writes
    drawn = recorded_seed(os.path.join(nodes, "checkpoint-3"))
    assert f"seed = {drawn}" in head.output
    seed = f"--seed {drawn}"
    launch.accelerate(SCRIPT, base_args(assets, one, *FLAGS, "--train_batch_size 4", seed))
    assert checkpoint_names(nodes) == checkpoint_names(one) == ["checkpoint-3"]
    reference = unet(one)
    assert_same_unet(reference, nodes, "two nodes vs one process")
    # The held-out loss of the same weights, scored on the same images, timesteps and noise however many processes
    # share them; the weights themselves agree to TOLERANCE.
    one_losses, node_losses = validation_losses(one), validation_losses(nodes)
    assert sorted(one_losses) == sorted(node_losses) == [3, 5]
    for step, losses in one_losses.items():
        assert np.allclose(node_losses[step], losses, rtol=1e-4, atol=0), step
    # The tolerance is far below what training changed (and below the 2.7e-4 that per-process draws made).
    assert max_abs_diff(reference, load_state_dict(os.path.join(assets["pipeline"], "unet"))) > 100 * TOLERANCE

    # Elastic resume: the nodes' checkpoint on one process, and one process's checkpoint on two nodes.
    nodes_then_one = resumed_copy(nodes, str(tmp_path / "nodes_then_one"))
    result = launch.accelerate(
        SCRIPT, base_args(assets, nodes_then_one, *FLAGS, "--train_batch_size 4 --resume_from_checkpoint latest", seed)
    )
    assert "starting at 3" in result.output and "batch layout changed" not in result.output
    assert_same_unet(reference, nodes_then_one, "two nodes, then one process")
    assert np.allclose(validation_losses(nodes_then_one)[5], one_losses[5], rtol=1e-4, atol=0)
    one_then_nodes = resumed_copy(one, str(tmp_path / "one_then_nodes"))
    head, _ = launch.torchrun_nodes(
        SCRIPT, base_args(assets, one_then_nodes, *FLAGS, "--resume_from_checkpoint latest", seed)
    )
    assert "starting at 3" in head.output and "batch layout changed" not in head.output
    assert_same_unet(reference, one_then_nodes, "one process, then two nodes")

    # Another global batch (one process x batch 2) is another run: said clearly.
    smaller = resumed_copy(nodes, str(tmp_path / "smaller"))
    result = launch.accelerate(SCRIPT, base_args(assets, smaller, *FLAGS, "--resume_from_checkpoint latest", seed))
    assert "batch layout changed since the checkpoint" in result.output
    assert "'total_batch_size': 8" in result.output and "'total_batch_size': 4" in result.output

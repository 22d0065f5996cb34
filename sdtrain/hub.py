"""--push_to_hub: the files of output_dir worth uploading, in one commit."""

import os


def files_to_upload(output_dir):
    """(path in the repository, local path) for what push_to_hub uploads: the pipeline (component links resolved), the
    model card, embeddings and validation grids; not checkpoints, tracker logs or hidden files."""
    found = []
    for root, folders, names in os.walk(output_dir, followlinks=True):
        top = os.path.relpath(root, output_dir) == "."
        folders[:] = [
            f for f in folders if not f.startswith(".") and not (top and f.startswith(("checkpoint-", "logs")))
        ]
        for name in names:
            if not name.startswith("."):
                path = os.path.join(root, name)
                found.append((os.path.relpath(path, output_dir).replace(os.sep, "/"), path))
    return sorted(found)


def add_hub_arguments(group, push_help):
    """--push_to_hub and where to; push_help says what the script uploads."""
    group.add_argument("--push_to_hub", action="store_true", help=push_help)
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `hf auth login`).")
    group.add_argument(
        "--hub_model_id", type=str, default=None, help="Hub repository to push to; default: the output folder's name."
    )


def push_to_hub(output_dir, hub_model_id, hub_token):
    """Upload output_dir's files_to_upload in one commit, to hub_model_id (default: output_dir's name)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=hub_token)
    repo_id = api.create_repo(hub_model_id or os.path.basename(os.path.abspath(output_dir)), exist_ok=True).repo_id
    files = [CommitOperationAdd(path_in_repo, local) for path_in_repo, local in files_to_upload(output_dir)]
    api.create_commit(repo_id, operations=files, commit_message="End of training")


def hub_problem(push, hub_model_id, hub_token, output_dir):
    """Why --push_to_hub would fail at the end of the run, found now (a message naming the flag and what to do), or
    None. Only with --push_to_hub is huggingface_hub imported."""
    # --hub_model_id alone is allowed, as in diffusers' scripts: the model card names it for an upload made by hand.
    if not push:
        return None
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = hub_model_id or os.path.basename(os.path.abspath(output_dir))
    flag = f"--hub_model_id {hub_model_id}" if hub_model_id else f"the --output_dir name {repo_id!r}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return (
            f"--push_to_hub: {flag} is not a valid Hub repository name ({err}); pass --hub_model_id name or user/name"
        )
    if constants.HF_HUB_OFFLINE:
        return "--push_to_hub: the Hub is switched off (HF_HUB_OFFLINE=1), so the upload would fail after training"
    if hub_token is None and get_token() is None:
        return "--push_to_hub: no Hub token, so the upload would fail after training: run `hf auth login` first"
    return None

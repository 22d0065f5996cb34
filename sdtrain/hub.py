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


def push_to_hub(args):
    """Upload output_dir's files_to_upload in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(
        args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), exist_ok=True
    ).repo_id
    files = [CommitOperationAdd(path_in_repo, local) for path_in_repo, local in files_to_upload(args.output_dir)]
    api.create_commit(repo_id, operations=files, commit_message="End of training")

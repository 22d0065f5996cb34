"""--train_data_dir with a caption file beside each image (photo.png and photo.txt, the kohya and OneTrainer layout),
read when the folder has no metadata file: the same rows as the metadata, clear errors, and a run that trains."""

import json
import os
import shutil

import pytest
from helpers import earlier_run_folder, tree_snapshot
from test_train_text_to_image import SCRIPT, base_args

import train_text_to_image
from devkit.command_line import command_line
from sdtrain import captions, data_config
from sdtrain.cli import UserError


def metadata_rows(folder):
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        return [json.loads(line) for line in f]


def caption_file_folder(source, destination):
    """source's images with their metadata captions written as .txt files beside them, half of them in a subfolder;
    no metadata file."""
    os.makedirs(os.path.join(destination, "more"))
    for index, row in enumerate(metadata_rows(source)):
        folder = destination if index % 2 == 0 else os.path.join(destination, "more")
        shutil.copy(os.path.join(source, row["file_name"]), folder)
        with open(os.path.join(folder, os.path.splitext(row["file_name"])[0] + ".txt"), "w") as f:
            f.write(row["text"] + "\n")
    return destination


def read(folder, *flags):
    args = train_text_to_image.parse_args(
        command_line("--pretrained_model_name_or_path p --train_data_dir", folder, *flags)
    )
    dataset = captions.load_image_caption_dataset(data_config.DatasetConfig.from_args(args), 0)
    return {os.path.basename(row["image"]["path"]): row["text"] for row in dataset}


def test_caption_files_give_the_rows_the_metadata_gives(assets, tmp_path):
    folder = caption_file_folder(assets["images"], str(tmp_path / "photos"))
    expected = {row["file_name"]: row["text"] for row in metadata_rows(assets["images"])}
    assert read(folder) == expected
    # Several lines are alternatives (one drawn per use, as a metadata list); blank lines are not captions.
    with open(os.path.join(folder, "0000.txt"), "w") as f:
        f.write("a red circle\n\na photo of a red circle\n")
    rows = read(folder)
    assert rows["0000.png"] == ["a red circle", "a photo of a red circle"]
    assert rows["0002.png"] == [expected["0002.png"]]


def test_a_metadata_file_wins_over_caption_files(assets, tmp_path):
    folder = shutil.copytree(assets["images"], tmp_path / "both")
    with open(folder / "0000.txt", "w") as f:
        f.write("not this caption")
    assert read(str(folder))["0000.png"] == metadata_rows(assets["images"])[0]["text"]


def test_an_image_without_a_caption_file_is_named_and_nothing_is_written(launch, assets, tmp_path):
    folder = caption_file_folder(assets["images"], str(tmp_path / "photos"))
    os.remove(os.path.join(folder, "more", "0003.txt"))
    with pytest.raises(ValueError, match=r"1 of 10 images have no \.txt caption file beside them: more/0003\.png"):
        read(folder)
    out = tmp_path / "run"
    earlier_run_folder(out)
    (out / "keep.txt").write_text("mine")
    before = tree_snapshot(str(out))
    args = base_args(assets, str(out), "--max_train_steps 1")
    args[args.index("--train_data_dir") + 1] = folder
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0 and "more/0003.png" in result.output
    after = tree_snapshot(str(out))
    assert after == before  # refused before training: nothing written, not even the lock


def test_a_run_trains_on_caption_files(launch, assets, tmp_path):
    folder = caption_file_folder(assets["images"], str(tmp_path / "photos"))
    out = str(tmp_path / "run")
    args = base_args(assets, out, "--max_train_steps 2 --checkpointing_steps 100")
    args[args.index("--train_data_dir") + 1] = folder
    result = launch.accelerate(SCRIPT, args)
    assert "Examples = 10," in result.output
    assert "captions: 10 from .txt files, 0 empty, 0 with alternatives" in result.output
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def test_a_byte_order_mark_is_not_part_of_the_caption(assets, tmp_path):
    folder = caption_file_folder(assets["images"], str(tmp_path / "photos"))
    with open(os.path.join(folder, "0000.txt"), "wb") as f:
        f.write(b"\xef\xbb\xbfa red circle\r\n")  # what Windows Notepad writes
    assert read(folder)["0000.png"] == "a red circle"


def latin1_caption_folder(assets, folder):
    folder = caption_file_folder(assets["images"], folder)
    with open(os.path.join(folder, "more", "0003.txt"), "wb") as f:
        f.write("a café".encode("latin-1"))
    return folder


def test_a_caption_file_that_is_not_utf8_is_named_with_its_byte_offset(assets, tmp_path):
    folder = latin1_caption_folder(assets, str(tmp_path / "photos"))
    with pytest.raises(UserError, match=r"more/0003\.txt is not UTF-8: byte offset 5 is 0xe9 .*re-save it as UTF-8"):
        read(folder)


def test_skip_bad_captions_leaves_the_image_out_and_counts_it(assets, tmp_path, caplog):
    folder = latin1_caption_folder(assets, str(tmp_path / "photos"))
    with open(os.path.join(folder, "0000.txt"), "w") as f:
        f.write("a red circle\na photo of a red circle\nred\n")
    with open(os.path.join(folder, "0002.txt"), "w") as f:
        f.write("\n")
    with caplog.at_level("INFO", logger="sdtrain"):
        rows = read(folder, "--skip_bad_captions")
    assert "0003.png" not in rows and len(rows) == 9
    assert "left out 1 of 10 images, their caption files are not UTF-8: more/0003.txt" in caplog.text
    assert "captions: 9 from .txt files, 1 empty, 1 with alternatives (3 each)" in caplog.text


def test_a_run_refuses_a_caption_file_that_is_not_utf8(launch, assets, tmp_path):
    folder = latin1_caption_folder(assets, str(tmp_path / "photos"))
    args = base_args(assets, str(tmp_path / "run"), "--max_train_steps 1")
    args[args.index("--train_data_dir") + 1] = folder
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0
    assert "0003.txt is not UTF-8: byte offset 5" in result.output and "--skip_bad_captions" in result.output


def test_a_metadata_file_that_is_not_utf8_is_named_with_its_byte_offset(assets, tmp_path):
    folder = shutil.copytree(assets["images"], tmp_path / "latin1")
    rows = metadata_rows(assets["images"])
    rows[2]["text"] = "a café"
    (folder / "metadata.jsonl").write_bytes(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("latin-1")
    )
    with pytest.raises(UserError, match=r"metadata.jsonl is not UTF-8: byte offset \d+ is 0xe9 .*re-save it as UTF-8"):
        read(str(folder))


def test_caption_files_beside_no_readable_image_are_named(tmp_path):
    (tmp_path / "photo.heic").write_bytes(b"not an image Pillow reads")
    (tmp_path / "photo.txt").write_text("a caption")
    with pytest.raises(UserError, match=r"has \.txt caption files but no image that Pillow reads"):
        captions.caption_file_dataset(str(tmp_path), "image", "text")

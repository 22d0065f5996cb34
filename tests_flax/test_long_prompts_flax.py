"""train_text_to_image_flax.py with captions longer than 77 tokens (--max_token_length, issue 32): the dataset's ids and
its warning about captions the default window cuts, in-process. The launched run is
test_flax_scripts.py::test_text_to_image_flax_writes_the_sdxl_single_file_diffusers_reads; the encoding's parity with
PyTorch is test_parity.py::test_long_prompts_encode_alike."""

import json
import logging
import os
import shutil

from parity_cases import LONG_PROMPTS
from PIL import Image

from devkit.command_line import command_line
from sdtrain.families import SDXL

LONG_CAPTION = LONG_PROMPTS[1]  # 200 tokens


def with_long_captions(images, folder):
    """A copy of an imagefolder (devkit/tiny_sd.py write_imagefolder) whose captions are 200 tokens longer."""
    shutil.copytree(images, folder)
    path = os.path.join(folder, "metadata.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    with open(path, "w") as f:
        f.writelines(json.dumps({**row, "text": f"{row['text']} {LONG_CAPTION}"}) + "\n" for row in rows)
    return str(folder)


def test_the_flax_dataset_chunks_long_captions_and_logs_the_ones_the_window_cuts(sdxl_pipeline, tmp_path, caplog):
    import datasets
    from transformers import CLIPTokenizerFast

    import train_text_to_image_flax as t2i

    path = str(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    rows = datasets.Dataset.from_dict({"image": [path] * 2, "text": [LONG_CAPTION, "a red circle"]})
    tokenizers = [CLIPTokenizerFast.from_pretrained(sdxl_pipeline, subfolder=n) for n in ("tokenizer", "tokenizer_2")]

    def dataset(*flags):
        args = t2i.parse_args(
            command_line("--pretrained_model_name_or_path p --train_data_dir d --resolution 32", *flags)
        )
        data = t2i.ImageCaptionDataset(rows, tokenizers, args, seed=0, family=SDXL)
        data.image_sizes = [(32, 32)] * 2
        return data

    with caplog.at_level(logging.WARNING, logger="sdtrain.long_prompts"):
        assert dataset()[(0, 0)]["input_ids"].shape == (2, 77)
        assert "1 of 2 captions are longer than 75 tokens and are cut to it (the longest has 200 tokens" in caplog.text
        caplog.clear()
        long = dataset("--max_token_length 225")
        assert "captions are longer" not in caplog.text
    ids = long[(0, 0)]["input_ids"]
    assert ids.shape == (2, 231) and str(ids.dtype) == "int32"
    assert (ids[1].reshape(3, 77)[:, 0] == tokenizers[1].bos_token_id).all()
    # The short caption's second and third chunks are the empty caption's ids (each tokenizer's own pad: '!' in the
    # second).
    empty = long[(0, 1)]["input_ids"].reshape(2, 3, 77)[:, 2]
    assert [row.tolist() for row in empty] == [t("", padding="max_length", max_length=77).input_ids for t in tokenizers]

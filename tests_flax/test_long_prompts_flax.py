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


def test_the_flax_text_cache_holds_the_long_embeddings(sdxl_pipeline, tmp_path):
    """--cache_text_embeddings with --max_token_length on SDXL: each caption's cached hidden states and pooled
    embedding are what encoding its chunked ids in the step gives."""
    import types

    import datasets
    import jax
    import jax.numpy as jnp
    import numpy as np

    import train_text_to_image_flax as t2i
    from sdtrain.jax import models as jax_models
    from sdtrain.jax.family import family_code
    from sdtrain.jax.long_prompts import long_prompt_code

    path = str(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    rows = datasets.Dataset.from_dict({"image": [path] * 2, "text": [LONG_CAPTION, "a red circle"]})
    flags = "--resolution 32 --max_token_length 150 --cache_text_embeddings"
    args = t2i.parse_args(command_line("--pretrained_model_name_or_path p --train_data_dir d", flags))
    code = family_code(SDXL)
    tokenizers = code.load_tokenizers(sdxl_pipeline)
    code = long_prompt_code(code, tokenizers, 150)
    encoders = [jax_models.load_flax_text_encoder(sdxl_pipeline, None, jnp.float32, n) for n in SDXL.text_encoders]
    frozen = types.SimpleNamespace(code=code, text_encoders=encoders, text_encoder_params=[e.params for e in encoders])
    plain, cached = (t2i.ImageCaptionDataset(rows, tokenizers, args, seed=0, family=SDXL) for _ in range(2))
    plain.image_sizes = cached.image_sizes = [(32, 32)] * 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    t2i.build_caches(cached, frozen, args, len(jax.devices()), sharding)
    for row in range(2):
        ids = plain[(0, row)]["input_ids"][None]
        hidden, pooled = code.encode_text(encoders, frozen.text_encoder_params, jnp.asarray(ids))
        got = cached[(0, row)]
        assert got["encoder_hidden_states"].shape == (154, 64)
        np.testing.assert_allclose(got["encoder_hidden_states"], np.asarray(hidden[0]), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["pooled_text_embeds"], np.asarray(pooled[0]), rtol=0, atol=1e-5)
    # The validation renderer's conditioning reads the same chunks: the whole prompt, and an empty prompt of the same
    # shape for guidance.
    from sdtrain.jax.validation import text_conditioning
    from sdtrain.long_prompts import caption_token_ids

    conditioning = text_conditioning(code, encoders, tokenizers, (32, 32))
    prompt_ids = jnp.asarray(caption_token_ids(tokenizers, [LONG_CAPTION], 150))
    states, _ = conditioning({"text_encoders": frozen.text_encoder_params}, prompt_ids)
    assert states.shape == (2, 154, 64)
    hidden, _ = code.encode_text(encoders, frozen.text_encoder_params, jnp.asarray(plain[(0, 0)]["input_ids"][None]))
    np.testing.assert_allclose(np.asarray(states[1]), np.asarray(hidden[0]), rtol=0, atol=1e-5)

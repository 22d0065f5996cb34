"""Captions longer than 77 tokens (--max_token_length, issue 32): the 75-token chunks (sdtrain.long_prompts), their
encoding (sdtrain.torch.long_prompts), and the warning about captions the default window cuts. The launched run is
test_train_text_to_image.py::test_dataset_folder_with_list_captions; the PyTorch/JAX parity is in tests_flax."""

import logging
import os

import numpy as np
import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import train_text_to_image
from sdtrain.families import SD, SDXL
from sdtrain.long_prompts import caption_token_ids, chunk_ids, log_cut_captions
from sdtrain.torch.family import family_code
from sdtrain.torch.long_prompts import encode_text_chunks, long_prompt_code, token_ids

# 200 tokens: every word is a whole token of the tiny vocabulary (devkit/tiny_sd.py VOCAB_WORDS).
LONG_CAPTION = " ".join(["a", "red", "circle", "on", "a", "blue", "square"] * 28 + ["with", "a", "toy", "cat"])


def with_long_captions(saved_dataset, folder):
    """A copy of devkit/tiny_sd.py's saved dataset whose rows' first captions are 200 tokens long (the row's own
    caption first, so rows still differ), for the launched runs of --max_token_length."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = os.path.join("data", "train-00000-of-00001.parquet")
    table = pq.read_table(os.path.join(saved_dataset, name))
    column = table.schema.get_field_index("captions")
    captions = [[f"{first} {LONG_CAPTION}", *rest] for first, *rest in table.column(column).to_pylist()]
    table = table.set_column(column, table.schema.field(column), pa.array(captions, table.schema.field(column).type))
    os.makedirs(os.path.join(folder, "data"))
    pq.write_table(table, os.path.join(folder, name))
    return str(folder)


def test_chunk_ids_wraps_every_chunk_and_pads_short_captions_with_empty_chunks():
    bos, eos, pad = 100, 101, 0
    assert chunk_ids([1, 2, 3, 4, 5], 3, 5, bos, eos, pad) == [
        *(bos, 1, 2, 3, eos),
        *(bos, 4, 5, eos, pad),
        *(bos, eos, pad, pad, pad),
    ]
    assert chunk_ids(list(range(1, 11)), 2, 5, bos, eos, pad) == [bos, 1, 2, 3, eos, bos, 4, 5, 6, eos]  # cut at 6


@pytest.fixture(scope="module")
def tokenizers(assets, sdxl_pipeline):
    """SD's tokenizer (pads with its end token) and SDXL's second (pads with '!'), from the tiny pipelines."""
    sd = CLIPTokenizer.from_pretrained(assets["pipeline"], subfolder="tokenizer")
    sdxl_2 = CLIPTokenizer.from_pretrained(sdxl_pipeline, subfolder="tokenizer_2")
    assert sd.pad_token_id == sd.eos_token_id and sdxl_2.pad_token_id != sdxl_2.eos_token_id
    return sd, sdxl_2


def test_long_captions_tokenize_into_wrapped_chunks_with_each_tokenizers_pad(tokenizers):
    text = tokenizers[0](LONG_CAPTION, add_special_tokens=False).input_ids
    assert len(text) == 200
    ids = caption_token_ids(tokenizers, [LONG_CAPTION, "a red circle"], 225)
    assert ids.shape == (2, 2, 231) and ids.dtype == np.int32
    for tokenizer, row in zip(tokenizers, ids[0], strict=True):
        chunks = row.reshape(3, 77)
        assert (chunks[:, 0] == tokenizer.bos_token_id).all()
        assert chunks[0, 1:76].tolist() == text[:75] and chunks[1, 1:76].tolist() == text[75:150]
        assert chunks[2, 1:51].tolist() == text[150:] and chunks[2, 51] == tokenizer.eos_token_id
        assert (chunks[2, 52:] == tokenizer.pad_token_id).all()
    # A short caption: its first chunk is what the usual tokenization gives, and the rest are empty captions' chunks.
    usual = caption_token_ids(tokenizers, ["a red circle", ""], None)
    assert usual.shape == (2, 2, 77)
    np.testing.assert_array_equal(ids[1].reshape(2, 3, 77)[:, 0], usual[0])
    np.testing.assert_array_equal(ids[1].reshape(2, 3, 77)[:, 1], usual[1])
    # --max_token_length 75 is the usual window; 150 keeps 150 tokens of the 200.
    np.testing.assert_array_equal(caption_token_ids(tokenizers, ["a red circle"], 75), usual[:1])
    cut = caption_token_ids(tokenizers[:1], [LONG_CAPTION], 150)[0, 0].reshape(2, 77)
    assert cut[1, 1:76].tolist() == text[75:150] and cut[1, 76] == tokenizers[0].eos_token_id


def test_cut_captions_are_logged_with_the_longest(tokenizers, caplog):
    captions = [["a red circle", LONG_CAPTION], ["a blue square " * 40]]  # each row's list
    with caplog.at_level(logging.WARNING, logger="sdtrain.long_prompts"):
        note = log_cut_captions(tokenizers[0], captions, None)
    assert note in caplog.text
    assert "2 of 3 captions are longer than 75 tokens" in note and "the longest has 200 tokens" in note
    assert "'a red circle on a blue square" in note and "..." in note and len(note) < 400
    assert "1 of 3 captions are longer than 150 tokens" in log_cut_captions(tokenizers[0], captions, 150)
    assert log_cut_captions(tokenizers[0], captions, 225) is None


@pytest.mark.parametrize("family", [SD, SDXL], ids=lambda family: family.name)
def test_chunks_encode_as_separate_captions_joined_along_the_sequence(assets, sdxl_pipeline, family):
    folder = assets["pipeline"] if family is SD else sdxl_pipeline
    classes = [CLIPTextModel, CLIPTextModelWithProjection]
    encoders = [
        cls.from_pretrained(folder, subfolder=name).eval()
        for cls, name in zip(classes, family.text_encoders, strict=False)
    ]
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=name) for name in family.tokenizers]
    code = long_prompt_code(family_code(family), tokenizers, 225)
    ids = token_ids(tokenizers, [LONG_CAPTION, "a red circle"], 225)
    with torch.no_grad():
        hidden, pooled = code.encode_text(encoders, ids)
        assert hidden.shape[:2] == (2, 231)
        for chunk in range(3):
            alone, alone_pooled = family_code(family).encode_text(encoders, ids[..., chunk * 77 : (chunk + 1) * 77])
            torch.testing.assert_close(hidden[:, chunk * 77 : (chunk + 1) * 77], alone, rtol=0, atol=1e-6)
            if chunk == 0 and family is SDXL:  # the pooled embedding is the first chunk's
                torch.testing.assert_close(pooled, alone_pooled, rtol=0, atol=1e-6)
    assert (pooled is None) == (family is SD)
    assert encode_text_chunks(family_code(family), encoders, ids[..., :77], 77)[0].shape[1] == 77


def test_the_dataset_logs_the_captions_the_window_cuts(assets, tmp_path, caplog):
    import datasets
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "red.png")
    rows = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "red.png")] * 3, "text": ["a red circle", LONG_CAPTION, "a cat"]}
    )
    tokenizers = [CLIPTokenizer.from_pretrained(assets["pipeline"], subfolder="tokenizer")]
    argv = [
        "--pretrained_model_name_or_path",
        assets["pipeline"],
        "--train_data_dir",
        str(tmp_path),
        "--resolution",
        "32",
    ]
    with caplog.at_level(logging.WARNING, logger="sdtrain.long_prompts"):
        train_text_to_image.ImageCaptionDataset(rows, tokenizers, train_text_to_image.parse_args(argv), seed=0)
        assert "1 of 3 captions are longer than 75 tokens and are cut to it" in caplog.text
        caplog.clear()
        args = train_text_to_image.parse_args(argv + ["--max_token_length", "225"])
        dataset = train_text_to_image.ImageCaptionDataset(rows, tokenizers, args, seed=0)
        assert "captions are longer" not in caplog.text
    assert dataset[0, 1, 1.0]["input_ids"].shape == (1, 231)


def test_max_token_length_takes_kohyas_values(capsys):
    argv = ["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", "--max_token_length", "100"]
    with pytest.raises(SystemExit) as raised:
        train_text_to_image.parse_args(argv)
    assert raised.value.code != 0 and "--max_token_length" in capsys.readouterr().err


@pytest.mark.parametrize("family", [SD, SDXL], ids=lambda family: family.name)
def test_validation_prompts_past_77_tokens_reach_the_unet(assets, sdxl_pipeline, family):
    """The pipelines cut a prompt to 77 tokens themselves; long_prompt_pipeline encodes it as the captions are (with
    classifier-free guidance: the negative embeddings, or SDXL's zeros, take the long shape)."""
    from sdtrain.torch.long_prompts import long_prompt_pipeline

    folder = assets["pipeline"] if family is SD else sdxl_pipeline
    pipeline = family_code(family).pipeline_class.from_pretrained(folder, **family_code(family).validation_components())
    pipeline.set_progress_bar_config(disable=True)
    tokenizers = [getattr(pipeline, name) for name in family.tokenizers]
    code = long_prompt_code(family_code(family), tokenizers, 225)

    def render(pipe, last_word):
        generator = torch.Generator().manual_seed(0)
        options = dict(num_inference_steps=1, height=64, width=64, output_type="latent", generator=generator)
        return pipe(f"{LONG_CAPTION} {last_word}", **options).images

    assert torch.equal(render(pipeline, "red"), render(pipeline, "blue"))  # cut at 77: the ends are not seen
    long = long_prompt_pipeline(pipeline, code)
    assert not torch.equal(render(long, "red"), render(long, "blue"))
    assert long_prompt_pipeline(pipeline, family_code(family)) is pipeline


def test_the_text_cache_holds_the_long_embeddings(assets, tmp_path):
    """--cache_text_embeddings with --max_token_length: every sample's cached conditioning is what encoding its
    chunked ids in the loop gives (a row's list of captions, long and short, and a dropped caption)."""
    import datasets
    from accelerate import Accelerator
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "red.png")
    texts = [[LONG_CAPTION, "a red circle"], [f"a cat {LONG_CAPTION}"]]
    rows = datasets.Dataset.from_dict({"image": [str(tmp_path / "red.png")] * 2, "text": texts})
    folder = assets["pipeline"]
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
    text_encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()]
    argv = ["--pretrained_model_name_or_path", folder, "--train_data_dir", str(tmp_path), "--resolution", "32"]
    argv += ["--max_token_length", "150", "--cache_text_embeddings", "--proportion_empty_prompts", "0.3"]
    args = train_text_to_image.parse_args(argv)
    plain, cached = (train_text_to_image.ImageCaptionDataset(rows, tokenizers, args, seed=0) for _ in range(2))
    code = long_prompt_code(family_code(SD), tokenizers, 150)
    train_text_to_image.build_caches(cached, None, text_encoders, code, Accelerator(cpu=True), args, num_workers=0)
    assert cached.text_cache[2].shape[1:] == (154, 32)
    seen = set()
    for key in [(epoch, row, 1.0) for epoch in range(6) for row in range(2)]:
        with torch.no_grad():
            hidden = code.encode_text(text_encoders, plain[key]["input_ids"][None])[0][0]
        torch.testing.assert_close(cached[key]["encoder_hidden_states"], hidden, rtol=0, atol=1e-5)
        seen.add(int((plain[key]["input_ids"][0] != tokenizers[0].pad_token_id).sum()))
    assert len(seen) >= 3, "the check must see long, short and dropped captions"

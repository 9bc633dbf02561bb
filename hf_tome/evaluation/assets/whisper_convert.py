"""CTranslate2 (faster-whisper) Whisper folders converted to Hugging Face ``WhisperForConditionalGeneration``.

The CTranslate2 variables are mapped to the names of :class:`transformers.WhisperForConditionalGeneration` (fused
projections split, float16 widened to float32); the folder written is a regular Hugging Face one (weights, config,
generation config, feature extractor and tokenizer) that loads offline with ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hf_tome.evaluation.assets.ctranslate2_file import read_ctranslate2_header, read_ctranslate2_model

# Whisper's timestamp tokens <|0.00|> .. <|30.00|> sit after the special tokens; CTranslate2's tokenizer.json omits
# them, but the model's vocabulary (and the Hugging Face tokenizer) includes them.
_NUM_TIMESTAMP_TOKENS = 1501
_TIME_PRECISION = 0.02


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    count = 0
    while f"{stack}/layer_{count}/ffn/linear_0/weight" in variables:
        count += 1
    return count


def _map_whisper_weights(variables: dict[str, np.ndarray], d_model: int) -> dict[str, np.ndarray]:
    """Rename CTranslate2 Whisper variables to ``WhisperForConditionalGeneration`` state-dict keys (float32)."""
    out: dict[str, np.ndarray] = {}

    def put(hf_name: str, array: np.ndarray) -> None:
        out[hf_name] = np.ascontiguousarray(array, dtype=np.float32)

    def norm(ct2: str, hf: str) -> None:
        put(f"{hf}.weight", variables[f"{ct2}/gamma"])
        put(f"{hf}.bias", variables[f"{ct2}/beta"])

    def linear(ct2: str, hf: str) -> None:
        put(f"{hf}.weight", variables[f"{ct2}/weight"])
        put(f"{hf}.bias", variables[f"{ct2}/bias"])

    def split_fused(ct2: str, hf: str, parts: tuple[str, ...]) -> None:
        # CTranslate2 concatenates the projections along the output dimension; Whisper's k_proj has no bias, so
        # CTranslate2 stores zeros in its slot, which are dropped here.
        weight, bias = variables[f"{ct2}/weight"], variables[f"{ct2}/bias"]
        for index, part in enumerate(parts):
            rows = slice(index * d_model, (index + 1) * d_model)
            put(f"{hf}.{part}.weight", weight[rows])
            if part == "k_proj":
                if np.any(bias[rows] != 0):
                    raise ValueError(f"{ct2}: expected a zero key bias, Whisper's k_proj has none")
            else:
                put(f"{hf}.{part}.bias", bias[rows])

    def feed_forward(ct2: str, hf: str) -> None:
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")

    def self_attention(ct2: str, hf: str) -> None:
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        split_fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
        linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    put("model.encoder.embed_positions.weight", variables["encoder/position_encodings/encodings"])
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(_count_layers(variables, "encoder")):
        self_attention(f"encoder/layer_{i}", f"model.encoder.layers.{i}")
        feed_forward(f"encoder/layer_{i}", f"model.encoder.layers.{i}")

    put("model.decoder.embed_tokens.weight", variables["decoder/embeddings/weight"])
    put("model.decoder.embed_positions.weight", variables["decoder/position_encodings/encodings"])
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(_count_layers(variables, "decoder")):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        self_attention(ct2, hf)
        norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        split_fused(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
        linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        feed_forward(ct2, hf)
    return out


def _check_supported_spec(variables: dict[str, np.ndarray]) -> None:
    """Refuse variants this mapping does not handle instead of producing a silently wrong model."""
    expectations = {
        "decoder/activation": 3,  # CTranslate2 ActivationType.GELU (exact erf GELU, as in Whisper)
        "decoder/pre_norm": 1,
        "decoder/scale_embeddings": 0,
        "decoder/alibi": 0,
    }
    for name, value in expectations.items():
        if name in variables and int(variables[name]) != value:
            raise ValueError(f"unsupported Whisper variant: {name}={int(variables[name])}, expected {value}")
    projection = variables.get("decoder/projection/weight")
    if projection is not None and projection is not variables["decoder/embeddings/weight"]:
        raise ValueError("the output projection is not tied to the embeddings; this converter assumes it is")


def _build_tokenizer(tokenizer_json: Path, vocab_size: int):
    """Load the packaged ``tokenizer.json`` as a Whisper tokenizer, registering the Whisper special tokens."""
    from transformers import AddedToken, WhisperTokenizer

    added = json.loads(tokenizer_json.read_text(encoding="utf-8"))["added_tokens"]
    specials = [token["content"] for token in sorted(added, key=lambda token: token["id"]) if token["special"]]
    # Registering every <|...|> token as special makes skip_special_tokens drop them and lets the tokenizer find
    # the timestamp range (it starts right after the last special id).
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tokenizer_json),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=specials,
    )
    missing = vocab_size - len(tokenizer)
    if 0 < missing <= _NUM_TIMESTAMP_TOKENS:
        timestamps = [f"<|{i * _TIME_PRECISION:.2f}|>" for i in range(missing)]
        tokenizer.add_tokens(
            [AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False) for t in timestamps]
        )
    if len(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model vocabulary has {vocab_size}")
    return tokenizer


def _generation_config(tokenizer, ct2_config: dict, num_decoder_layers: int, multilingual: bool):
    from transformers import GenerationConfig

    token_id = tokenizer.convert_tokens_to_ids
    settings: dict = {
        "decoder_start_token_id": token_id("<|startoftranscript|>"),
        "bos_token_id": token_id("<|startoftranscript|>"),
        "eos_token_id": token_id("<|endoftext|>"),
        "pad_token_id": token_id("<|endoftext|>"),
        "no_timestamps_token_id": token_id("<|notimestamps|>"),
        "prev_sot_token_id": token_id("<|startofprev|>"),
        "is_multilingual": multilingual,
        "max_length": 448,
        "return_timestamps": False,
        # The suppress lists are the ones openai-whisper uses; CTranslate2 stored them next to the weights.
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [220, token_id("<|endoftext|>")])),
    }
    heads = ct2_config.get("alignment_heads")
    if heads:
        settings["alignment_heads"] = [list(pair) for pair in heads]
    else:
        # openai-whisper's default: all heads of the upper half of the decoder.
        settings["alignment_heads"] = [[layer, 0] for layer in range(num_decoder_layers // 2, num_decoder_layers)]
    if multilingual:
        # Language and task tokens only exist as prompts for the multilingual checkpoints; .en models take neither.
        lang_ids = ct2_config.get("lang_ids", [])
        settings["lang_to_id"] = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
        settings["task_to_id"] = {"transcribe": token_id("<|transcribe|>"), "translate": token_id("<|translate|>")}
    return GenerationConfig(**settings)


def convert_whisper_from_ctranslate2(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a CTranslate2 Whisper folder (``model.bin``, ``tokenizer.json``, ``config.json``) to Hugging Face.

    Writes ``WhisperForConditionalGeneration`` weights (float32 safetensors), its config and generation config, and a
    ``WhisperProcessor`` (feature extractor + tokenizer) into ``out_dir`` and returns it. Architecture sizes are read
    from the weights, so any Whisper size converts; only the English-only (``.en``) path has been checked end to end.
    """
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _, spec_name, _ = read_ctranslate2_header(model_dir / "model.bin")
    if spec_name != "WhisperSpec":
        raise ValueError(f"{model_dir / 'model.bin'} holds a {spec_name}, not a WhisperSpec")
    variables = read_ctranslate2_model(model_dir / "model.bin")
    _check_supported_spec(variables)
    ct2_config_path = model_dir / "config.json"
    ct2_config = json.loads(ct2_config_path.read_text()) if ct2_config_path.exists() else {}

    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    num_mel_bins = variables["encoder/conv1/weight"].shape[1]
    encoder_layers = _count_layers(variables, "encoder")
    decoder_layers = _count_layers(variables, "decoder")
    # Whisper's vocabulary is 51864 entries for the English-only models and 51865+ for the multilingual ones.
    multilingual = vocab_size >= 51865

    tokenizer = _build_tokenizer(model_dir / "tokenizer.json", vocab_size)
    token_id = tokenizer.convert_tokens_to_ids
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(num_mel_bins),
        d_model=int(d_model),
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=token_id("<|endoftext|>"),
        bos_token_id=token_id("<|startoftranscript|>"),
        eos_token_id=token_id("<|endoftext|>"),
        decoder_start_token_id=token_id("<|startoftranscript|>"),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, token_id("<|endoftext|>")])),
    )
    model = WhisperForConditionalGeneration(config)
    state = {name: torch.from_numpy(array) for name, array in _map_whisper_weights(variables, int(d_model)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # proj_out is tied to the decoder embeddings, so it is the only key allowed to be absent.
    missing = [key for key in missing if key != "proj_out.weight"]
    if missing or unexpected:
        raise ValueError(f"weight mapping mismatch: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = _generation_config(tokenizer, ct2_config, decoder_layers, multilingual)

    feature_extractor = WhisperFeatureExtractor(
        feature_size=int(num_mel_bins), sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    )
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir

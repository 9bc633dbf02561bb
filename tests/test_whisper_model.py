"""Token merging in the Whisper encoder (tiny random configs), and one check on real Whisper tiny.en."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import hf_tome
from hf_tome.core.schedule import merge_schedule, tokens_per_layer
from hf_tome.evaluation.assets.cache import AssetUnavailableError

MEL, TOKENS = 16, 32  # 64 input frames -> 32 encoder tokens (conv2 has stride 2)
TINY = dict(vocab_size=100, num_mel_bins=MEL, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=TOKENS,
            max_target_positions=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            begin_suppress_tokens=None, suppress_tokens=None)
CLASSES = {"model": T.WhisperModel, "generation": T.WhisperForConditionalGeneration}


def make_whisper(kind: str = "generation", attn_implementation: str = "sdpa", **overrides) -> torch.nn.Module:
    """A tiny random Whisper in eval mode (deterministic weights)."""
    config = T.WhisperConfig(**{**TINY, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return CLASSES[kind](config).eval()


def run(model: torch.nn.Module, features: torch.Tensor, decoder_ids: torch.Tensor, **kwargs):
    with torch.no_grad():
        return model(features, decoder_input_ids=decoder_ids, **kwargs)


def decoder_output(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.fixture
def features() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, MEL, 2 * TOKENS)


@pytest.fixture
def decoder_ids() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.cat([torch.ones(4, 1, dtype=torch.long), torch.randint(3, 100, (4, 5))], dim=1)


@pytest.mark.compat
@pytest.mark.parametrize("kind", list(CLASSES))
def test_r0_equals_unpatched(kind, features, decoder_ids):
    model = make_whisper(kind)
    reference = run(model, features, decoder_ids)
    hf_tome.apply(model, r=0)
    patched = run(model, features, decoder_ids)
    assert hf_tome.is_patched(model)
    torch.testing.assert_close(patched.encoder_last_hidden_state, reference.encoder_last_hidden_state, atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(decoder_output(patched), decoder_output(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("r,inflect", [(5, 0.0), (6, -1.0), (100, 0.0)])
def test_encoder_token_counts_follow_schedule_and_clamp(kind, r, inflect, features, decoder_ids):
    model = make_whisper(kind)
    hf_tome.apply(model, r=r, inflect=inflect)
    encoder = model.encoder if kind == "model" else model.model.encoder
    seen: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
             for layer in encoder.layers]
    out = run(model, features, decoder_ids)
    for hook in hooks:
        hook.remove()
    expected = tokens_per_layer(TOKENS, merge_schedule(r, 2, inflect), 0)
    assert seen == expected[:2]
    assert out.encoder_last_hidden_state.shape[1] == expected[2]
    report = hf_tome.compute_report(model)
    assert report.tokens_in == expected[:2] and report.tokens_out == expected[1:]
    if r == 100:  # no protected tokens: clamped to half of all tokens every layer
        assert expected == [32, 16, 8]
    encoded = encoder(features)
    assert torch.equal(encoded.token_sizes.sum(dim=(1, 2)), torch.full((4,), float(TOKENS)))


def test_compute_report_counts_conv_front_end():
    model = make_whisper("model")
    report = hf_tome.compute_report(model, (MEL, 2 * TOKENS))
    # conv1 (kernel 3, two frames per token) + conv2 (kernel 3, stride 2), per encoder token
    assert report.embedding_macs == TOKENS * (2 * 3 * MEL * 32 + 3 * 32 * 32)
    assert report.head_macs == 0
    assert report.layer_macs[0] == hf_tome.block_macs(32, 64, TOKENS, TOKENS)
    hf_tome.apply(model, r=8)
    merged = hf_tome.compute_report(model)
    assert merged.tokens_in == [32, 24] and merged.total_macs < report.total_macs
    with pytest.raises(ValueError, match=r"Whisper's encoder takes \(num_mel_bins, frames\) = \(16, 64\)"):
        hf_tome.compute_report(model, (MEL, 100))


@pytest.mark.compat
def test_batch_invariance(features, decoder_ids):
    model = make_whisper()
    hf_tome.apply(model, r=7)
    batched = run(model, features, decoder_ids).logits
    single = torch.cat([run(model, features[i : i + 1], decoder_ids[i : i + 1]).logits for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


@pytest.mark.compat
@pytest.mark.parametrize("kind", list(CLASSES))
def test_eager_equals_sdpa_with_proportional_attention(kind, features, decoder_ids):
    sdpa, eager = make_whisper(kind, "sdpa"), make_whisper(kind, "eager")
    for model in (sdpa, eager):
        hf_tome.apply(model, r=6, inflect=-0.5, prop_attn=True)
    out_sdpa, out_eager = run(sdpa, features, decoder_ids), run(eager, features, decoder_ids)
    torch.testing.assert_close(out_sdpa.encoder_last_hidden_state, out_eager.encoder_last_hidden_state, atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(decoder_output(out_sdpa), decoder_output(out_eager), atol=1e-5, rtol=0)


@pytest.mark.compat
def test_cross_attention_is_proportional(features, decoder_ids):
    """A token of size s must weigh in cross-attention exactly like s copies of itself (and only with prop_attn)."""
    model = make_whisper()
    hf_tome.apply(model, r=8)
    with torch.no_grad():
        encoded = model.model.encoder(features)
        assert encoded.token_sizes is not None and encoded.token_sizes.max() > 1
        merged = model(encoder_outputs=encoded, decoder_input_ids=decoder_ids).logits
        # Unmerging repeats every token once per frame it holds; a plain tuple carries no sizes, so no bias.
        copies = hf_tome.unmerge(encoded.last_hidden_state, encoded.token_positions)
        duplicated = model(encoder_outputs=(copies,), decoder_input_ids=decoder_ids).logits
        torch.testing.assert_close(merged, duplicated, atol=1e-5, rtol=0)
        model.set_tome(r=8, prop_attn=False)
        unweighted = model(encoder_outputs=encoded, decoder_input_ids=decoder_ids).logits
        plain = model(encoder_outputs=(encoded.last_hidden_state,), decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(unweighted, plain, atol=0, rtol=0)
    assert (unweighted - merged).abs().max() > 1e-4


@pytest.mark.compat
def test_generate_r0_matches_unpatched_and_merged_generate_uses_sizes(features):
    model = make_whisper()
    with torch.no_grad():
        reference = model.generate(features, max_new_tokens=6)
        hf_tome.apply(model, r=0)
        assert torch.equal(model.generate(features, max_new_tokens=6), reference)
        hf_tome.apply(model, r=6)
        generated = model.generate(features, max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
        # Every cached decoding step must equal a full forward pass, which rebuilds the sizes from scratch.
        full = model(features, decoder_input_ids=generated.sequences).logits
        beams = model.generate(features, max_new_tokens=4, num_beams=2)
    assert generated.sequences.shape[0] == 4 and beams.shape[0] == 4
    for step, logits in enumerate(generated.logits):
        torch.testing.assert_close(logits, full[:, step], atol=1e-5, rtol=0)


def test_token_timestamps_refused_while_merging(features):
    model = make_whisper()
    hf_tome.apply(model, r=4)
    with pytest.raises(ValueError, match="return_token_timestamps needs one encoder token per frame"):
        model.generate(features, return_token_timestamps=True)


@pytest.mark.compat
def test_save_load_round_trip(tmp_path, features, decoder_ids):
    model = make_whisper()
    hf_tome.apply(model, r=5, inflect=-0.5)
    model.save_pretrained(tmp_path)
    reloaded = hf_tome.AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.tome_config == hf_tome.ToMeConfig(r=5, inflect=-0.5)
    torch.testing.assert_close(run(reloaded, features, decoder_ids).logits, run(model, features, decoder_ids).logits,
                               atol=1e-6, rtol=0)
    plain = T.AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path).eval()
    assert type(plain) is T.WhisperForConditionalGeneration
    hf_tome.remove(model)
    torch.testing.assert_close(run(plain, features, decoder_ids).logits, run(model, features, decoder_ids).logits,
                               atol=1e-6, rtol=0)


@pytest.mark.compat
def test_remove_restores_original_forward(features, decoder_ids):
    model = make_whisper()
    stock_classes = {name: type(module) for name, module in model.named_modules()}
    reference = run(model, features, decoder_ids).logits
    hf_tome.apply(model, r=6)
    assert not torch.equal(run(model, features, decoder_ids).logits, reference)
    hf_tome.remove(model)
    assert {name: type(module) for name, module in model.named_modules()} == stock_classes
    assert torch.equal(run(model, features, decoder_ids).logits, reference)


def test_bare_encoder_and_recorded_outputs(features):
    model = make_whisper("model")
    encoder = model.encoder
    hf_tome.apply(encoder, r=8, trace_source=True)
    with torch.no_grad():
        out = encoder(features, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [32, 24, 16]
    assert torch.equal(out.token_source.sum(-1, keepdim=True), out.token_sizes)
    assert torch.equal(out.token_source.argmax(1), out.token_positions)


@pytest.mark.parametrize("model_class", [T.WhisperForAudioClassification, T.WhisperForCausalLM])
def test_unsupported_whisper_variants_raise(model_class):
    model = model_class(T.WhisperConfig(**TINY))
    with pytest.raises(ValueError, match=f"hf_tome does not support {model_class.__name__}: expected one of .*"
                                         "WhisperForConditionalGeneration"):
        hf_tome.apply(model, r=4)


@pytest.mark.compat
def test_recorded_attentions_follow_merged_lengths(features, decoder_ids):
    model = make_whisper(attn_implementation="eager")
    hf_tome.apply(model, r=6)
    out = run(model, features, decoder_ids, output_attentions=True)
    assert [a.shape[-1] for a in out.encoder_attentions] == [32, 26]
    assert [a.shape[-1] for a in out.cross_attentions] == [20, 20]
    assert all(a.shape[-1] == decoder_ids.shape[1] for a in out.decoder_attentions)


def test_backward_and_gradient_checkpointing(features, decoder_ids):
    grads = []
    for checkpointing in (False, True):
        model = make_whisper(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
        hf_tome.apply(model, r=6)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(features, labels=decoder_ids).loss.backward()
        missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == []
        grads.append(model.model.encoder.conv1.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.real_weights
def test_real_whisper_tiny_wer_with_merging():
    """Real tiny.en on espeak-ng speech: r=231 (1.5x fewer encoder MACs) keeps the WER below 0.35 and within 0.05
    of the unmerged model's."""
    from transformers import WhisperProcessor

    from hf_tome.evaluation.assets.speech import SENTENCES, speech_dataset, word_error_rate
    from hf_tome.evaluation.assets.whisper import whisper_tiny_en_path

    try:
        folder = whisper_tiny_en_path()
        dataset = speech_dataset(SENTENCES[:4])
    except AssetUnavailableError as error:  # includes a missing espeak-ng binary
        pytest.skip(f"real Whisper tiny.en or its speech set unavailable: {error}")
    processor = WhisperProcessor.from_pretrained(folder)
    model = hf_tome.AutoModelForSpeechSeq2Seq.from_pretrained(folder, tome_r=231).eval()
    assert hf_tome.compute_report(model).tokens_in == [1500, 1269, 1038, 807]
    features = processor(list(dataset["audio"]), sampling_rate=16000, return_tensors="pt").input_features
    wers = {}
    for r in (0, 231):
        model.set_tome(r=r)
        with torch.inference_mode():
            hypotheses = processor.batch_decode(model.generate(features), skip_special_tokens=True)
        wers[r] = word_error_rate(list(dataset["text"]), hypotheses)
    # Measured: 0.163 at both r=0 and r=231 (the clips are mostly padding silence, which merges first).
    assert wers[231] < 0.35 and wers[231] <= wers[0] + 0.05, f"WER by r: {wers}; last hypotheses {hypotheses}"


@pytest.mark.compat
def test_beam_search_r0_equals_stock_and_runs_with_merging(features):
    model = make_whisper()
    beam = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, return_dict_in_generate=True,
                output_scores=True)
    with torch.no_grad():
        reference = model.generate(features, **beam)
        hf_tome.apply(model, r=0)
        patched = model.generate(features, **beam)
        hf_tome.apply(model, r=6)
        merged = model.generate(features, **beam)
        alone = model.generate(features[1:2], **beam)
    assert torch.equal(patched.sequences, reference.sequences)
    torch.testing.assert_close(patched.sequences_scores, reference.sequences_scores, atol=1e-5, rtol=0)
    assert merged.sequences.shape[0] == 4 * 2
    # Beams of one clip do not depend on the other clips of the batch (sizes are expanded with the beams).
    assert torch.equal(merged.sequences[2:4, :alone.sequences.shape[1]], alone.sequences)
    torch.testing.assert_close(merged.sequences_scores[2:4], alone.sequences_scores, atol=1e-5, rtol=0)


def test_decoder_batch_other_than_encoder_batch_with_merging(features, decoder_ids):
    """The stock cross-attention regroups encoder tokens into the decoder's batch; the log-size bias follows."""
    model = make_whisper("model")
    hf_tome.apply(model, r=6)
    with torch.no_grad():
        encoded = model.encoder(features[:1])
        tokens = encoded.last_hidden_state.shape[1]
        out = model(encoder_outputs=encoded, decoder_input_ids=decoder_ids[:2])
        regrouped = type(encoded)(last_hidden_state=encoded.last_hidden_state.reshape(2, tokens // 2, -1),
                                  token_sizes=encoded.token_sizes.reshape(2, tokens // 2, 1))
        reference = model(encoder_outputs=regrouped, decoder_input_ids=decoder_ids[:2])
        with pytest.raises(ValueError, match=r"decoder batch \(3\) does not fit the merged encoder output"):
            model(encoder_outputs=encoded, decoder_input_ids=decoder_ids[:3])
    assert tokens % 2 == 0
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state, atol=1e-6, rtol=0)


def test_stock_arguments_are_passed_by_name():
    """Overrides bind calls to the installed stock signature, so a renamed cache argument cannot shift the rest."""
    from hf_tome.integration.stock_calls import CACHE_ARGUMENTS, named_parameters, stock_arguments

    layer_forward = T.models.whisper.modeling_whisper.WhisperDecoderLayer.forward
    cache_name = next(name for name in CACHE_ARGUMENTS if name in named_parameters(layer_forward))
    named = stock_arguments(layer_forward, object(), ("h", "mask", "enc", "enc_mask", "cache-object"),
                            {"output_attentions": True})
    assert named == {"hidden_states": "h", "attention_mask": "mask", "encoder_hidden_states": "enc",
                     "encoder_attention_mask": "enc_mask", cache_name: "cache-object", "output_attentions": True}


def test_patched_model_forward_shows_the_stock_parameters():
    """transformers inspects ``forward`` (e.g. for a ``cache`` parameter); the override shows the stock signature."""
    import inspect

    model = make_whisper("model")
    stock = list(inspect.signature(model.forward).parameters)
    hf_tome.apply(model, r=2)
    assert list(inspect.signature(model.forward).parameters) == stock


def test_a_cache_passed_under_the_old_name_reaches_the_decoder_only(features, decoder_ids):
    """``past_key_values=`` (renamed ``cache`` in transformers 5.24) goes to the decoder, as in stock Whisper."""
    import warnings

    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    def empty_cache(model):
        text_config = model.config.get_text_config(decoder=True)
        return EncoderDecoderCache(DynamicCache(config=text_config), DynamicCache(config=text_config))

    stock = make_whisper("model")
    patched = hf_tome.apply(make_whisper("model"), r=0)
    outputs = []
    for model in (stock, patched):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            outputs.append(model(features, decoder_input_ids=decoder_ids, use_cache=True,
                                 past_key_values=empty_cache(model)))
    torch.testing.assert_close(outputs[1].last_hidden_state, outputs[0].last_hidden_state, atol=1e-6, rtol=0)
    cache = outputs[1].cache if hasattr(outputs[1], "cache") else outputs[1].past_key_values
    assert cache.get_seq_length() == decoder_ids.shape[1]

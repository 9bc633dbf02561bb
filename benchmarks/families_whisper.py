"""Throughput row for the Whisper tiny encoder (read by ``benchmarks/throughput.py``).

What is timed: the ENCODER alone (``WhisperEncoder``, conv front end + 4 blocks + final norm) of Whisper tiny's
architecture (d_model 384, 6 heads, MLP 1536, 1500 tokens) with random weights, on 80 mel bins x 3000 frames
(Whisper's fixed 30 s window). ``hf_tome`` supports a bare ``WhisperEncoder``, so the builder returns it as is and
calling it with ``input_features`` runs exactly what is timed; the decoder is left out because its cost depends on
the transcript length. r values: the smallest constant r reaching about 1.5x and 2x fewer encoder MACs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# Whisper tiny (and tiny.en) encoder sizes.
TINY_ENCODER = dict(num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                    max_source_positions=1500)

SETTINGS: dict[str, dict | None] = {
    "unpatched": None,
    "r=100": {"r": 100},
    "r=231 (1.5x MACs)": {"r": 231},
    "r=378 (2x MACs)": {"r": 378},
}


def whisper_tiny_encoder() -> torch.nn.Module:
    """Whisper tiny's encoder with random weights, in eval mode."""
    torch.manual_seed(0)
    return WhisperEncoder(T.WhisperConfig(**TINY_ENCODER)).eval()


def log_mel_inputs(batch: int) -> torch.Tensor:
    """Random features shaped like Whisper's log-mel input: [batch, 80, 3000]."""
    torch.manual_seed(1)
    return torch.randn(batch, TINY_ENCODER["num_mel_bins"], 2 * TINY_ENCODER["max_source_positions"])


Family = tuple[Callable[[], torch.nn.Module], Callable[[int], torch.Tensor], dict[str, dict | None]]


def families() -> dict[str, Family]:
    """``name -> (builder, inputs_fn(batch), settings)`` for ``benchmarks/throughput.py``."""
    return {"Whisper tiny encoder": (whisper_tiny_encoder, log_mel_inputs, SETTINGS)}

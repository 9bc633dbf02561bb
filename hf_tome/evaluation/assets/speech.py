"""A small English speech test set synthesised locally with espeak-ng, plus text normalisation and a WER helper.

The clips are robotic but real speech-like audio with known transcripts, so a speech model can be checked end to end
without downloading a corpus. espeak-ng (Debian package ``espeak-ng``) writes 22050 Hz wav files; they are resampled
to 16 kHz mono in numpy, so nothing beyond the espeak-ng binary is needed.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import soundfile

from hf_tome.evaluation.assets.cache import AssetUnavailableError, cache_dir

SAMPLE_RATE = 16000
DEFAULT_VOICE = "en-us"
DEFAULT_WORDS_PER_MINUTE = 150

# Plain words only: no digits, abbreviations or names whose spelling a recogniser could legitimately vary, so a
# mismatch after normalisation is a recognition error rather than a formatting choice.
SENTENCES: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "Please remember to close the window before you leave the house.",
    "The train to the city was delayed because of heavy snow.",
    "She bought fresh bread and a bottle of milk at the market.",
    "Our meeting has been moved to the large room on the second floor.",
    "The children played in the garden until the sun went down.",
    "He forgot his umbrella and got completely wet on the way home.",
    "Water boils faster when you put a lid on the pot.",
    "The library will be closed on Monday for cleaning.",
    "A strong wind blew the leaves across the empty street.",
    "I would like a cup of coffee with a little sugar.",
    "The doctor told him to drink more water and sleep longer.",
    "Our team finished the project a week earlier than planned.",
    "The old bridge over the river needs to be repaired soon.",
    "They watched the stars from the top of the hill.",
    "Turn left at the next corner and walk straight ahead.",
    "The price of fruit went up again this summer.",
    "My brother is learning to play the piano at night.",
    "The museum has a new exhibition about ancient ships.",
    "Make sure the printer has enough paper before you start.",
    "The cat slept on the warm blanket near the fire.",
    "We need to buy new tires for the car before winter.",
    "The teacher asked the students to read the first chapter.",
    "Heavy rain is expected across the north later this evening.",
]


class EspeakNotFoundError(AssetUnavailableError):
    """Raised when the espeak-ng binary needed to synthesise the speech test set is not installed."""


def _espeak_binary() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise EspeakNotFoundError(
            "espeak-ng is not installed; it is needed to synthesise the speech test set. "
            "Install it with `apt-get install espeak-ng` (Debian/Ubuntu) and try again."
        )
    return binary


def resample(audio: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of a mono clip by truncating (or zero-padding) its spectrum.

    The FFT treats the clip as periodic; espeak-ng clips start and end in silence, so the wrap-around causes no
    audible artefacts, and the spectral cut is an ideal anti-aliasing filter for downsampling.
    """
    if orig_rate == new_rate:
        return audio.astype(np.float32, copy=False)
    new_length = int(round(len(audio) * new_rate / orig_rate))
    spectrum = np.fft.rfft(audio.astype(np.float64))
    kept = min(len(spectrum), new_length // 2 + 1)
    resized = np.zeros(new_length // 2 + 1, dtype=np.complex128)
    resized[:kept] = spectrum[:kept]
    # irfft normalises by the output length, so rescale to keep the original amplitude.
    return (np.fft.irfft(resized, new_length) * (new_length / len(audio))).astype(np.float32)


def _clip_name(index: int, sentence: str, voice: str, words_per_minute: int) -> str:
    # The hash covers everything that changes the audio, so an edited sentence never reuses a stale clip.
    digest = hashlib.sha1(f"{voice}|{words_per_minute}|{sentence}".encode()).hexdigest()[:10]
    return f"{index:03d}-{digest}.wav"


def synthesize(
    sentences: Iterable[str],
    out_dir: str | Path,
    voice: str = DEFAULT_VOICE,
    words_per_minute: int = DEFAULT_WORDS_PER_MINUTE,
) -> list[Path]:
    """Speak each sentence with espeak-ng and write 16 kHz mono 16-bit wav files into ``out_dir``.

    Returns the paths in sentence order. Clips already present (same sentence, voice and speed) are reused.
    Raises :class:`EspeakNotFoundError` when espeak-ng is missing.
    """
    binary = _espeak_binary()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, sentence in enumerate(sentences):
        path = out_dir / _clip_name(index, sentence, voice, words_per_minute)
        if not path.exists():
            with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
                raw = Path(scratch) / "raw.wav"
                command = [binary, "-v", voice, "-s", str(words_per_minute), "-w", str(raw), sentence]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0 or not raw.exists():
                    raise RuntimeError(f"espeak-ng failed on {sentence!r}: {result.stderr.strip()}")
                audio, rate = soundfile.read(raw, dtype="float32", always_2d=True)
                mono = resample(audio.mean(axis=1), rate, SAMPLE_RATE)
                # Write then rename, so an interrupted run never leaves a truncated clip that looks cached.
                staged = Path(scratch) / "clip.wav"
                soundfile.write(staged, np.clip(mono, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
                staged.replace(path)
        paths.append(path)
    return paths


def speech_dataset(sentences: Sequence[str] | None = None, voice: str = DEFAULT_VOICE):
    """Return a ``datasets.Dataset`` with columns ``audio`` (float32 array, 16 kHz) and ``text``.

    Defaults to :data:`SENTENCES`. The clips are synthesised once into ``cache_dir()/speech/<voice>/`` and reused.
    """
    from datasets import Dataset

    sentences = list(SENTENCES if sentences is None else sentences)
    paths = synthesize(sentences, cache_dir() / "speech" / voice, voice=voice)
    audio = [soundfile.read(path, dtype="float32")[0] for path in paths]
    dataset = Dataset.from_dict({"audio": audio, "text": sentences})
    # Arrow would otherwise widen the samples to float64 on the way back out.
    return dataset.with_format("numpy", columns=["audio"], output_all_columns=True)


def normalize_text(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces and collapse whitespace."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> float:
    """Corpus word error rate: total word edits divided by the total number of reference words.

    Both sides go through :func:`normalize_text` first unless ``normalize`` is false.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if normalize:
        references = [normalize_text(text) for text in references]
        hypotheses = [normalize_text(text) for text in hypotheses]
    if not any(text.split() for text in references):
        raise ValueError("references contain no words")
    # The packaged evaluate metric does the counting, so the benchmarks and this helper share one definition.
    from hf_tome.evaluation.metrics import load_metric

    return float(load_metric("wer").compute(predictions=list(hypotheses), references=list(references))["wer"])

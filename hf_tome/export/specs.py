"""What the export of one model reads and writes: its task, its input, its outputs, their axes and dummy inputs.

Built on Optimum's core (``ExporterConfig``, ``TasksManager``, its normalized configs and dummy input generators),
the pieces its ONNX and OpenVINO backends build their own export configs on. Token counts per layer are fixed by
the reduction plan, so the only dynamic axis of a merged model is the batch: every other shape is static.
"""

from __future__ import annotations

from collections.abc import Sequence

import transformers
from optimum.exporters.base import ExporterConfig
from optimum.exporters.tasks import TasksManager
from optimum.utils.input_generators import DummyAudioInputGenerator, DummyVisionInputGenerator
from optimum.utils.normalized_config import NormalizedConfig, NormalizedVisionConfig

from hf_tome.export.options import DEFAULT_ATOL

BATCH_AXIS = "batch_size"
# Optimum's file names: one model, or the encoder of an encoder-decoder (whose decoder is not exported here).
MODEL_FILE = "model.onnx"
ENCODER_FILE = "encoder_model.onnx"
CLASSIFICATION_TASKS = ("image-classification", "audio-classification", "video-classification")
# Class name endings -> task, for heads Optimum's TasksManager does not list (DeiT's teacher head, video).
_TASK_OF_HEAD = {"ForImageClassificationWithTeacher": "image-classification",
                 "ForVideoClassification": "video-classification"}


class ToMeExporterConfig(ExporterConfig):
    """Input and output names of a merged encoder with a dynamic batch axis only (Optimum's ``ExporterConfig``).

    ``outputs`` are what the model returns for the task (``logits``, or ``last_hidden_state`` and, once tokens
    merge, ``token_sizes``, which a consumer needs to pool or cross-attend to merged tokens correctly).
    """

    INPUT_NAME = "pixel_values"
    ATOL_FOR_VALIDATION = DEFAULT_ATOL

    def __init__(self, config, task: str, outputs: Sequence[str] = ("logits",), int_dtype: str = "int64",
                 float_dtype: str = "fp32"):
        super().__init__(config, task, int_dtype=int_dtype, float_dtype=float_dtype)
        self._output_names = tuple(outputs)

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        return {self.INPUT_NAME: {0: BATCH_AXIS}}

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        return {name: {0: BATCH_AXIS} for name in self._output_names}

    def with_outputs(self, outputs: Sequence[str]) -> ToMeExporterConfig:
        return type(self)(self._config, self.task, outputs, self.int_dtype, self.float_dtype)


class VisionExporterConfig(ToMeExporterConfig):
    """ViT, DeiT, DINOv2 (with registers), Swin: ``pixel_values`` [B, C, H, W] at the config's image size."""

    NORMALIZED_CONFIG_CLASS = NormalizedVisionConfig
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyVisionInputGenerator,)


class _VideoInputGenerator(DummyVisionInputGenerator):
    """``pixel_values`` [B, T, C, H, W] of a video model (VideoMAE, ViViT)."""

    def __init__(self, task, normalized_config, **kwargs):
        super().__init__(task, normalized_config, **kwargs)
        self.num_frames = normalized_config.config.num_frames

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
        shape = [self.batch_size, self.num_frames, self.num_channels, self.height, self.width]
        return self.random_float_tensor(shape, framework=framework, dtype=float_dtype)


class VideoExporterConfig(ToMeExporterConfig):
    NORMALIZED_CONFIG_CLASS = NormalizedVisionConfig
    DUMMY_INPUT_GENERATOR_CLASSES = (_VideoInputGenerator,)


class _SpectrogramInputGenerator(DummyAudioInputGenerator):
    """AST's ``input_values``: a log-mel spectrogram [B, max_length, num_mel_bins] (not a waveform)."""

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
        config = self.normalized_config.config
        shape = [self.batch_size, config.max_length, config.num_mel_bins]
        return self.random_float_tensor(shape, min_value=-1, max_value=1, framework=framework, dtype=float_dtype)


class ASTExporterConfig(ToMeExporterConfig):
    INPUT_NAME = "input_values"
    NORMALIZED_CONFIG_CLASS = NormalizedConfig
    DUMMY_INPUT_GENERATOR_CLASSES = (_SpectrogramInputGenerator,)


class WhisperEncoderExporterConfig(ToMeExporterConfig):
    """The Whisper encoder: ``input_features`` [B, num_mel_bins, 2 * max_source_positions]."""

    INPUT_NAME = "input_features"
    NORMALIZED_CONFIG_CLASS = NormalizedConfig.with_args(feature_size="num_mel_bins", allow_new=True)
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyAudioInputGenerator,)

    def _create_dummy_input_generator_classes(self, **kwargs):
        kwargs.setdefault("nb_max_frames", 2 * self._config.max_source_positions)
        return super()._create_dummy_input_generator_classes(**kwargs)


EXPORTER_CONFIGS: dict[str, type[ToMeExporterConfig]] = {
    "vit": VisionExporterConfig,
    "deit": VisionExporterConfig,
    "dinov2": VisionExporterConfig,
    "dinov2_with_registers": VisionExporterConfig,
    "swin": VisionExporterConfig,
    "videomae": VideoExporterConfig,
    "vivit": VideoExporterConfig,
    "audio-spectrogram-transformer": ASTExporterConfig,
    "whisper": WhisperEncoderExporterConfig,
}
"""``config.model_type`` -> how its export reads its input (the families hf_tome merges)."""


def infer_task(model_class: type) -> str:
    """Optimum's task name for a transformers model class (and for the heads it does not list)."""
    for ending, task in _TASK_OF_HEAD.items():
        if model_class.__name__.endswith(ending):
            return task
    return TasksManager.infer_task_from_model(model_class)


def model_class_for(config, task: str | None) -> type:
    """The transformers class to load: the checkpoint's architecture, or Optimum's class for an explicit task."""
    if task is None:
        architectures = getattr(config, "architectures", None) or []
        if architectures and hasattr(transformers, architectures[0]):
            return getattr(transformers, architectures[0])
        task = "feature-extraction"
    if task == "video-classification":
        auto_class = transformers.AutoModelForVideoClassification
    else:
        auto_class = TasksManager.get_model_class_for_task(task, framework="pt", library="transformers")
    return auto_class._model_mapping[type(config)]


def exporter_config_for(config, task: str, outputs: Sequence[str]) -> ToMeExporterConfig:
    """The :class:`ToMeExporterConfig` of ``config``'s family for ``task``, returning ``outputs``."""
    config_class = EXPORTER_CONFIGS.get(config.model_type)
    if config_class is None:
        raise ValueError(f"hf-tome export: model_type {config.model_type!r} is not supported: expected one of "
                         f"{sorted(EXPORTER_CONFIGS)}")
    return config_class(config, task, outputs)


def task_outputs(task: str) -> tuple[str, ...]:
    """The outputs an export of ``task`` returns, before knowing whether tokens merge (sizes added then)."""
    if task in CLASSIFICATION_TASKS:
        return ("logits",)
    return ("last_hidden_state", "token_sizes")


def encoder_only(config) -> bool:
    """An encoder-decoder (Whisper): only its merged encoder is exported, as Optimum's ``encoder_model.onnx``."""
    return bool(getattr(config, "is_encoder_decoder", False))


def file_name(config) -> str:
    return ENCODER_FILE if encoder_only(config) else MODEL_FILE

"""ViT family adapter: ViT and DeiT (same block layout; DeiT adds a protected distillation token).

Block: ``x = x + attn(layernorm_before(x)); x = reduce(x); x = x + mlp(layernorm_after(x))``, where reduce is
ToMe merging or, with kept counts, prune + merge by class attention.
"""

import torch
from transformers.models.deit import modeling_deit as deit
from transformers.models.vit import modeling_vit as vit
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from hf_tome.core.macs import EncoderShape
from hf_tome.core.plan import ReductionPlan
from hf_tome.integration.encoder import (
    KeyMetricAttentionMixin,
    PreNormReduceLayerMixin,
    TokenMergeOutput,
    encode_and_pool,
)
from hf_tome.integration.mixin import ToMeModelMixin
from hf_tome.integration.registry import Adapter, register_adapter


class _ViTStyleModelMixin(ToMeModelMixin):
    """Forward of ``ViTModel``/``DeiTModel`` running hf_tome's encoder loop."""

    _tome_plan: ReductionPlan

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor | None = None, bool_masked_pos: torch.BoolTensor | None = None,
                interpolate_pos_encoding: bool | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> TokenMergeOutput:
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        embedding_output = self.embeddings(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos,
                                           interpolate_pos_encoding=interpolate_pos_encoding)
        return encode_and_pool(self, embedding_output, attention_mask,
                               lambda sequence: self.pooler(sequence) if self.pooler is not None else None, **kwargs)


# ViT
class ToMeViTAttention(KeyMetricAttentionMixin, vit.ViTAttention):
    _eager_attention = staticmethod(vit.eager_attention_forward)


class ToMeViTLayer(PreNormReduceLayerMixin, vit.ViTLayer):
    pass


class ToMeViTModel(_ViTStyleModelMixin, vit.ViTModel):
    pass


class ToMeViTForImageClassification(ToMeModelMixin, vit.ViTForImageClassification):
    pass


# DeiT: class token at 0 and distillation token at 1 are both protected, so both heads read them unchanged.
class ToMeDeiTAttention(KeyMetricAttentionMixin, deit.DeiTAttention):
    _eager_attention = staticmethod(deit.eager_attention_forward)


class ToMeDeiTLayer(PreNormReduceLayerMixin, deit.DeiTLayer):
    pass


class ToMeDeiTModel(_ViTStyleModelMixin, deit.DeiTModel):
    pass


class ToMeDeiTForImageClassification(ToMeModelMixin, deit.DeiTForImageClassification):
    pass


class ToMeDeiTForImageClassificationWithTeacher(ToMeModelMixin, deit.DeiTForImageClassificationWithTeacher):
    pass


def _image_size(config) -> tuple[int, int]:
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _encoder_shape(model, image_size: tuple[int, int] | None, protected: int) -> EncoderShape:
    config = model.config
    height, width = image_size or _image_size(config)
    patch = config.patch_size
    classifiers = [m for name, m in model.named_children() if "classifier" in name and hasattr(m, "out_features")]
    return EncoderShape(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_patches=(height // patch) * (width // patch),
        protected=protected,
        patch_macs_per_patch=config.num_channels * patch * patch * config.hidden_size,
        head_macs=sum(m.in_features * m.out_features for m in classifiers),
    )


def _loop_module(model):
    return model if isinstance(model, vit.ViTModel | deit.DeiTModel) else model.base_model


register_adapter(Adapter(
    family="vit",
    class_map={
        vit.ViTAttention: ToMeViTAttention,
        vit.ViTLayer: ToMeViTLayer,
        vit.ViTModel: ToMeViTModel,
        vit.ViTForImageClassification: ToMeViTForImageClassification,
    },
    supported=(vit.ViTModel, vit.ViTForImageClassification),
    protected_tokens=lambda config: 1,
    loop_module=_loop_module,
    encoder_shape=lambda model, image_size: _encoder_shape(model, image_size, 1),
    supports_pruning=True,
))

register_adapter(Adapter(
    family="deit",
    class_map={
        deit.DeiTAttention: ToMeDeiTAttention,
        deit.DeiTLayer: ToMeDeiTLayer,
        deit.DeiTModel: ToMeDeiTModel,
        deit.DeiTForImageClassification: ToMeDeiTForImageClassification,
        deit.DeiTForImageClassificationWithTeacher: ToMeDeiTForImageClassificationWithTeacher,
    },
    supported=(deit.DeiTModel, deit.DeiTForImageClassification, deit.DeiTForImageClassificationWithTeacher),
    protected_tokens=lambda config: 2,
    loop_module=_loop_module,
    encoder_shape=lambda model, image_size: _encoder_shape(model, image_size, 2),
    supports_pruning=True,
))

"""Model families built from explicit architecture specs (README.md, "Models").

A spec is a frozen dataclass of widths/depths; ``build_model(spec, rngs=...)`` returns a Flax NNX
module mapping NHWC float32 images to logits (batch, num_classes). A pruned model is the same
class built from a smaller spec.
"""

from __future__ import annotations

from flax import nnx

from models.cnn import MLP, VGG, ResNet50, ResNetCifar
from models.specs import (FAMILIES, VGG_CFGS, VIT_CONFIGS, MLPSpec, ResNet50Spec, ResNetCifarSpec,
                          Spec, VGGSpec, ViTSpec, input_shape, make_spec, spec_from_dict,
                          spec_from_shapes, spec_to_dict)
from models.vit import ViT

_MODEL_CLASSES = {MLPSpec: MLP, VGGSpec: VGG, ResNetCifarSpec: ResNetCifar,
                  ResNet50Spec: ResNet50, ViTSpec: ViT}


def build_model(spec: Spec, *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model described by ``spec`` (freshly initialised; BN in train mode)."""
    cls = _MODEL_CLASSES.get(type(spec))
    if cls is None:
        raise ValueError(f"not a model spec: {spec!r}")
    return cls(spec, rngs=rngs)


__all__ = [
    "build_model", "spec_to_dict", "spec_from_dict", "spec_from_shapes", "make_spec", "input_shape", "FAMILIES",
    "Spec", "MLPSpec", "VGGSpec", "ResNetCifarSpec", "ResNet50Spec", "ViTSpec", "VGG_CFGS",
    "VIT_CONFIGS", "MLP", "VGG", "ResNetCifar", "ResNet50", "ViT",
]

"""Architecture specs: frozen dataclasses of widths/depths that round-trip through JSON.

A spec fully determines a model's structure. Every width that structured pruning can shrink is
stored explicitly (per layer / per block), so a pruned model is the same class built from a
smaller spec. Specs validate themselves on construction and raise ``ValueError`` naming the
offending field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Union

# Named VGG configurations (CIFAR VGG-BN). vgg19 follows the paper's released code: no max-pool
# after the last block of convolutions (the 2x2 map is average-pooled instead).
VGG_CFGS: dict[str, tuple[Union[int, str], ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512),
}

# Named ViT configurations: (image_size, patch_size, hidden_dim, num_layers, heads, mlp_dim, classes).
VIT_CONFIGS: dict[str, dict[str, int]] = {
    "vit_b16": dict(image_size=224, patch_size=16, hidden_dim=768, num_layers=12, num_heads=12,
                    mlp_dim=3072, num_classes=1000),
    "vit_small_cifar": dict(image_size=32, patch_size=4, hidden_dim=256, num_layers=6, num_heads=8,
                            mlp_dim=512, num_classes=10),
    "vit_tiny_test": dict(image_size=32, patch_size=8, hidden_dim=64, num_layers=2, num_heads=4,
                          mlp_dim=128, num_classes=10),
}


def _err(family: str, field: str, msg: str) -> ValueError:
    return ValueError(f"{family} spec: field '{field}' {msg}")


def _as_tuple(value: Any, depth: int) -> Any:
    """Converts (nested) lists to (nested) tuples down to ``depth`` levels (JSON gives lists)."""
    if depth == 0 or not isinstance(value, (list, tuple)):
        return value
    return tuple(_as_tuple(v, depth - 1) for v in value)


def _positive_int(family: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _err(family, field, f"must be a positive int, got {value!r}")


def _positive_ints(family: str, field: str, values: Any, length: int | None = None) -> None:
    if not isinstance(values, tuple):
        raise _err(family, field, f"must be a tuple of positive ints, got {values!r}")
    if length is not None and len(values) != length:
        raise _err(family, field, f"must have length {length}, got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _err(family, field, f"must contain only positive ints, got {v!r}")


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """Flatten -> [Linear + ReLU] per hidden width -> Linear(num_classes); all with bias."""

    in_features: int = 784
    hidden: tuple[int, ...] = (256, 128)
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (28, 28, 1)
    family: str = dataclasses.field(default="mlp", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", _as_tuple(self.hidden, 1))
        object.__setattr__(self, "image_shape", _as_tuple(self.image_shape, 1))
        _positive_int("mlp", "in_features", self.in_features)
        _positive_ints("mlp", "hidden", self.hidden)
        _positive_int("mlp", "num_classes", self.num_classes)
        _positive_ints("mlp", "image_shape", self.image_shape, 3)
        h, w, c = self.image_shape
        if h * w * c != self.in_features:
            raise _err("mlp", "in_features",
                       f"must equal prod(image_shape)={h * w * c}, got {self.in_features}")


@dataclasses.dataclass(frozen=True)
class VGGSpec:
    """CIFAR VGG-BN: each int = 3x3 conv (no bias) + BN + ReLU, 'M' = 2x2 max-pool; GAP + Linear."""

    cfg: tuple[Union[int, str], ...] = VGG_CFGS["vgg19"]
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    family: str = dataclasses.field(default="vgg", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfg", _as_tuple(self.cfg, 1))
        if not isinstance(self.cfg, tuple) or not any(isinstance(v, int) for v in self.cfg):
            raise _err("vgg", "cfg", f"must be a tuple containing at least one width, got {self.cfg!r}")
        for v in self.cfg:
            if v != "M" and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise _err("vgg", "cfg", f"entries must be positive ints or 'M', got {v!r}")
        _positive_int("vgg", "num_classes", self.num_classes)
        _positive_int("vgg", "in_channels", self.in_channels)
        _positive_int("vgg", "image_size", self.image_size)
        pools = sum(1 for v in self.cfg if v == "M")
        if self.image_size % (2 ** pools):
            raise _err("vgg", "image_size", f"must be divisible by 2**{pools} (number of 'M' pools)")


@dataclasses.dataclass(frozen=True)
class ResNetCifarSpec:
    """CIFAR ResNet with basic blocks; stage i has stride 1 (i=0) or 2.

    ``stage_widths[s]``: residual-stream width of stage s (the stem outputs ``stage_widths[0]``).
    ``block_widths[s][b]``: output width of conv1 inside block b of stage s.
    """

    stage_widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: tuple[int, ...] = (5, 5, 5)
    block_widths: tuple[tuple[int, ...], ...] = ((16,) * 5, (32,) * 5, (64,) * 5)
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    family: str = dataclasses.field(default="resnet_cifar", init=False)

    def __post_init__(self) -> None:
        f = "resnet_cifar"
        for name, depth in (("stage_widths", 1), ("blocks_per_stage", 1), ("block_widths", 2)):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), depth))
        _positive_ints(f, "stage_widths", self.stage_widths)
        _positive_ints(f, "blocks_per_stage", self.blocks_per_stage, len(self.stage_widths))
        if not isinstance(self.block_widths, tuple) or len(self.block_widths) != len(self.stage_widths):
            raise _err(f, "block_widths", f"must have one tuple per stage ({len(self.stage_widths)})")
        for s, (n, widths) in enumerate(zip(self.blocks_per_stage, self.block_widths)):
            _positive_ints(f, f"block_widths[{s}]", widths, n)
        _positive_int(f, "num_classes", self.num_classes)
        _positive_int(f, "in_channels", self.in_channels)
        _positive_int(f, "image_size", self.image_size)
        if self.image_size % (2 ** (len(self.stage_widths) - 1)):
            raise _err(f, "image_size", "must be divisible by 2**(num_stages-1)")


@dataclasses.dataclass(frozen=True)
class ResNet50Spec:
    """ImageNet bottleneck ResNet (torchvision v1.5 layout: stride on the 3x3 conv).

    ``stage_widths[s]``: residual-stream width of stage s (output of each block's conv3).
    ``block_widths[s][b] = (mid1, mid2)``: outputs of conv1 (1x1) and conv2 (3x3) of block b.
    """

    stem_width: int = 64
    stage_widths: tuple[int, ...] = (256, 512, 1024, 2048)
    blocks_per_stage: tuple[int, ...] = (3, 4, 6, 3)
    block_widths: tuple[tuple[tuple[int, int], ...], ...] = (
        ((64, 64),) * 3, ((128, 128),) * 4, ((256, 256),) * 6, ((512, 512),) * 3)
    num_classes: int = 1000
    in_channels: int = 3
    image_size: int = 224
    family: str = dataclasses.field(default="resnet50", init=False)

    def __post_init__(self) -> None:
        f = "resnet50"
        for name, depth in (("stage_widths", 1), ("blocks_per_stage", 1), ("block_widths", 3)):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), depth))
        _positive_int(f, "stem_width", self.stem_width)
        _positive_ints(f, "stage_widths", self.stage_widths)
        _positive_ints(f, "blocks_per_stage", self.blocks_per_stage, len(self.stage_widths))
        if not isinstance(self.block_widths, tuple) or len(self.block_widths) != len(self.stage_widths):
            raise _err(f, "block_widths", f"must have one tuple per stage ({len(self.stage_widths)})")
        for s, (n, blocks) in enumerate(zip(self.blocks_per_stage, self.block_widths)):
            if not isinstance(blocks, tuple) or len(blocks) != n:
                raise _err(f, f"block_widths[{s}]", f"must have {n} (mid1, mid2) pairs")
            for b, pair in enumerate(blocks):
                _positive_ints(f, f"block_widths[{s}][{b}]", pair, 2)
        _positive_int(f, "num_classes", self.num_classes)
        _positive_int(f, "in_channels", self.in_channels)
        _positive_int(f, "image_size", self.image_size)


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """Vision Transformer (torchvision layout) with separate q/k/v/out projections.

    Per-layer ``num_heads``, ``head_dim`` and ``mlp_dim`` so heads, head dims and MLP units can be
    pruned per layer; ``hidden_dim`` is the residual-stream width shared by all layers.
    ``value_head_dim`` (default: ``head_dim``) is the per-head width of the values (and of the
    out-projection's input), which prunes separately from the query/key width; ``score_dim`` (default:
    ``head_dim``) is the d of the attention scale 1/√d, kept at the unpruned width when head dims are
    pruned so that the pruned model computes exactly what the masked one does.
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    hidden_dim: int = 768
    num_layers: int = 12
    num_heads: tuple[int, ...] = (12,) * 12
    head_dim: tuple[int, ...] = (64,) * 12
    mlp_dim: tuple[int, ...] = (3072,) * 12
    num_classes: int = 1000
    value_head_dim: tuple[int, ...] | None = None
    score_dim: tuple[int, ...] | None = None
    family: str = dataclasses.field(default="vit", init=False)

    def __post_init__(self) -> None:
        f = "vit"
        for name in ("num_heads", "head_dim", "mlp_dim", "value_head_dim", "score_dim"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), 1))
        for name in ("image_size", "patch_size", "in_channels", "hidden_dim", "num_layers",
                     "num_classes"):
            _positive_int(f, name, getattr(self, name))
        for name in ("num_heads", "head_dim", "mlp_dim"):
            _positive_ints(f, name, getattr(self, name), self.num_layers)
        for name in ("value_head_dim", "score_dim"):
            if getattr(self, name) is not None:
                _positive_ints(f, name, getattr(self, name), self.num_layers)
        if self.image_size % self.patch_size:
            raise _err(f, "image_size", f"must be divisible by patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        """Number of image tokens (excluding the class token)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def value_dims(self) -> tuple[int, ...]:
        return self.head_dim if self.value_head_dim is None else self.value_head_dim

    @property
    def score_dims(self) -> tuple[int, ...]:
        return self.head_dim if self.score_dim is None else self.score_dim


Spec = Union[MLPSpec, VGGSpec, ResNetCifarSpec, ResNet50Spec, ViTSpec]

SPEC_CLASSES: dict[str, type] = {
    "mlp": MLPSpec, "vgg": VGGSpec, "resnet_cifar": ResNetCifarSpec, "resnet50": ResNet50Spec,
    "vit": ViTSpec,
}
FAMILIES: tuple[str, ...] = tuple(SPEC_CLASSES)


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """JSON-able dict of a spec (tuples become lists), including its ``"family"``."""
    if type(spec) not in SPEC_CLASSES.values():
        raise ValueError(f"not a model spec: {spec!r}")

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    return {f.name: plain(getattr(spec, f.name)) for f in dataclasses.fields(spec)}


def spec_from_dict(d: dict[str, Any]) -> Spec:
    """Inverse of :func:`spec_to_dict`; raises ``ValueError`` naming a missing/unknown key."""
    if "family" not in d:
        raise ValueError(f"spec dict has no 'family' key; expected one of {FAMILIES}")
    family = d["family"]
    if family not in SPEC_CLASSES:
        raise ValueError(f"spec dict: unknown 'family' {family!r}; expected one of {FAMILIES}")
    cls = SPEC_CLASSES[family]
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - allowed - {"family"})
    if unknown:
        raise ValueError(f"{family} spec dict: unknown key(s) {unknown}; allowed {sorted(allowed)}")
    return _construct(cls, {k: v for k, v in d.items() if k != "family"})


def _construct(cls: type, fields: dict[str, Any]) -> Spec:
    """``cls(**fields)`` with unknown field names reported as ``ValueError`` instead of TypeError."""
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        family = cls.__dataclass_fields__["family"].default
        raise ValueError(f"{family} spec: unknown field(s) {unknown}; allowed {sorted(allowed)}")
    return cls(**fields)


def _resnet_cifar(depth: int | None = None, width_multiplier: int = 1, **overrides: Any) -> ResNetCifarSpec:
    if depth is None:
        return _construct(ResNetCifarSpec, overrides)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise _err("resnet_cifar", "depth", f"must be 6n+2 with n >= 1 (20, 32, 56, ...), got {depth!r}")
    _positive_int("resnet_cifar", "width_multiplier", width_multiplier)
    n = (depth - 2) // 6
    widths = tuple(w * width_multiplier for w in (16, 32, 64))
    fields = dict(stage_widths=widths, blocks_per_stage=(n,) * 3,
                  block_widths=tuple((w,) * n for w in widths))
    fields.update(overrides)
    return _construct(ResNetCifarSpec, fields)


def _vit(config_name: str | None = None, **overrides: Any) -> ViTSpec:
    base: dict[str, Any] = {}
    if config_name is not None:
        if config_name not in VIT_CONFIGS:
            raise _err("vit", "config_name", f"unknown {config_name!r}; expected one of {sorted(VIT_CONFIGS)}")
        base = dict(VIT_CONFIGS[config_name])
    base.update(overrides)
    layers = base.get("num_layers", 12)
    hidden = base.get("hidden_dim", 768)
    # Scalars are broadcast to every layer; head_dim defaults to hidden_dim / num_heads.
    if isinstance(base.get("num_heads", 12), int):
        heads = base.get("num_heads", 12)
        base["num_heads"] = (heads,) * layers
        if "head_dim" not in base and hidden % heads == 0:
            base["head_dim"] = (hidden // heads,) * layers
    for name in ("head_dim", "mlp_dim"):
        if isinstance(base.get(name), int):
            base[name] = (base[name],) * layers
    return _construct(ViTSpec, base)


def make_spec(family: str, **overrides: Any) -> Spec:
    """Builds a spec of ``family`` from named configs / shorthands plus explicit field overrides.

    - ``mlp``: fields of :class:`MLPSpec`.
    - ``vgg``: ``cfg_name`` (vgg11/13/16/19) or ``cfg``, plus other fields.
    - ``resnet_cifar``: ``depth`` (6n+2) and ``width_multiplier``, or explicit fields.
    - ``resnet50``: fields of :class:`ResNet50Spec`.
    - ``vit``: ``config_name`` (vit_b16 / vit_small_cifar / vit_tiny_test) and/or fields; int
      ``num_heads``/``head_dim``/``mlp_dim`` are broadcast to every layer.
    """
    if family == "mlp":
        if "image_shape" in overrides and "in_features" not in overrides:
            h, w, c = overrides["image_shape"]
            overrides["in_features"] = h * w * c
        return _construct(MLPSpec, overrides)
    if family == "vgg":
        cfg_name = overrides.pop("cfg_name", None)
        if cfg_name is not None:
            if "cfg" in overrides:
                raise _err("vgg", "cfg_name", "cannot be given together with 'cfg'")
            if cfg_name not in VGG_CFGS:
                raise _err("vgg", "cfg_name", f"unknown {cfg_name!r}; expected one of {sorted(VGG_CFGS)}")
            overrides["cfg"] = VGG_CFGS[cfg_name]
        return _construct(VGGSpec, overrides)
    if family == "resnet_cifar":
        return _resnet_cifar(**overrides)
    if family == "resnet50":
        return _construct(ResNet50Spec, overrides)
    if family == "vit":
        return _vit(**overrides)
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def _width(shapes: Mapping[str, Sequence[int]], path: str, axis: int = -1) -> int:
    if path not in shapes:
        raise ValueError(f"spec_from_shapes: no parameter {path!r} among the shapes given")
    return int(shapes[path][axis])


def spec_from_shapes(spec: Spec, shapes: Mapping[str, Sequence[int]],
                     num_heads: Sequence[int] | None = None) -> Spec:
    """The spec of the same family whose model has parameters of these `shapes` (`{path: shape}`,
    paths relative to the `nnx.Param` state, as `models` names them): the smaller spec a structurally
    pruned parameter tree implies. For a ViT, `num_heads` gives the heads per layer (the shapes alone
    do not split `heads × head_dim`); by default they are the spec's."""
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
    if isinstance(spec, MLPSpec):
        fields["hidden"] = tuple(_width(shapes, f"layers/{i}/kernel") for i in range(len(spec.hidden)))
    elif isinstance(spec, VGGSpec):
        widths = iter(_width(shapes, f"layers/{i}/conv/kernel") for i in range(sum(v != "M" for v in spec.cfg)))
        fields["cfg"] = tuple(v if v == "M" else next(widths) for v in spec.cfg)
    elif isinstance(spec, ResNetCifarSpec):
        fields["stage_widths"] = tuple(_width(shapes, f"stages/{s}/blocks/0/conv2/kernel")
                                       for s in range(len(spec.stage_widths)))
        fields["block_widths"] = tuple(tuple(_width(shapes, f"stages/{s}/blocks/{b}/conv1/kernel") for b in range(n))
                                       for s, n in enumerate(spec.blocks_per_stage))
    elif isinstance(spec, ResNet50Spec):
        fields["stem_width"] = _width(shapes, "conv1/kernel")
        fields["stage_widths"] = tuple(_width(shapes, f"stages/{s}/blocks/0/conv3/kernel")
                                       for s in range(len(spec.stage_widths)))
        fields["block_widths"] = tuple(
            tuple((_width(shapes, f"stages/{s}/blocks/{b}/conv1/kernel"), _width(shapes, f"stages/{s}/blocks/{b}/conv2/kernel"))
                  for b in range(n)) for s, n in enumerate(spec.blocks_per_stage))
    elif isinstance(spec, ViTSpec):
        heads = tuple(spec.num_heads if num_heads is None else (int(h) for h in num_heads))
        dims = {}
        for name, proj in (("head_dim", "query"), ("value_head_dim", "value")):
            inner = [_width(shapes, f"layers/{i}/attention/{proj}/kernel") for i in range(spec.num_layers)]
            bad = [i for i, (w, h) in enumerate(zip(inner, heads)) if w % h]
            if bad:
                raise ValueError(f"spec_from_shapes: layer {bad[0]}'s {proj} width {inner[bad[0]]} is not a multiple "
                                 f"of its {heads[bad[0]]} heads")
            dims[name] = tuple(w // h for w, h in zip(inner, heads))
        fields.update(hidden_dim=_width(shapes, "conv_proj/kernel"), num_heads=heads, head_dim=dims["head_dim"],
                      value_head_dim=None if dims["value_head_dim"] == dims["head_dim"] else dims["value_head_dim"],
                      mlp_dim=tuple(_width(shapes, f"layers/{i}/mlp_in/kernel") for i in range(spec.num_layers)))
        score = spec.score_dims
        fields["score_dim"] = None if score == fields["head_dim"] else score
    else:
        raise ValueError(f"not a model spec: {spec!r}")
    return type(spec)(**fields)


def input_shape(spec: Spec) -> tuple[int, int, int]:
    """(H, W, C) of the NHWC images the model built from ``spec`` expects."""
    if isinstance(spec, MLPSpec):
        return tuple(spec.image_shape)  # type: ignore[return-value]
    if isinstance(spec, ViTSpec):
        return (spec.image_size, spec.image_size, spec.in_channels)
    if isinstance(spec, (VGGSpec, ResNetCifarSpec, ResNet50Spec)):
        return (spec.image_size, spec.image_size, spec.in_channels)
    raise ValueError(f"not a model spec: {spec!r}")

"""MLP, CIFAR VGG-BN, CIFAR ResNet (basic blocks) and ImageNet ResNet-50 (bottlenecks)."""

from __future__ import annotations

import jax
from flax import nnx

from models.layers import batch_norm, conv, global_avg_pool, linear, max_pool
from models.specs import MLPSpec, ResNet50Spec, ResNetCifarSpec, Spec, VGGSpec, spec_from_shapes


class SpecModel(nnx.Module):
    """A zoo model: built from `self.spec`; `spec_from_shapes` is the spec its (resized) parameters imply."""

    spec: Spec

    def spec_from_shapes(self, shapes) -> Spec:
        return spec_from_shapes(self.spec, shapes)


class MLP(SpecModel):
    """Flatten -> [Linear + ReLU] per ``spec.hidden`` -> ``head`` Linear. Paths: layers/i, head."""

    def __init__(self, spec: MLPSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        widths = (spec.in_features,) + spec.hidden
        self.layers = nnx.List([linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.head = linear(widths[-1], spec.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


class ConvBN(nnx.Module):
    """Bias-free conv followed by BatchNorm (no activation). Paths: conv, bn."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, *,
                 padding: int | None = None, rngs: nnx.Rngs):
        self.conv = conv(in_ch, out_ch, kernel, stride, padding=padding, rngs=rngs)
        self.bn = batch_norm(out_ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class VGG(SpecModel):
    """CIFAR VGG-BN: conv3x3+BN+ReLU per int of ``cfg``, 2x2 max-pool per 'M', GAP, ``fc``.

    Paths: layers/i/conv, layers/i/bn (i counts convs only), fc. Global average pooling equals the
    paper's AvgPool(2) on the final 2x2 map of a 32x32 input.
    """

    def __init__(self, spec: VGGSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        layers, ch = [], spec.in_channels
        for v in spec.cfg:
            if v != "M":
                layers.append(ConvBN(ch, v, 3, rngs=rngs))
                ch = v
        self.layers = nnx.List(layers)
        self.fc = linear(ch, spec.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        i = 0
        for v in self.spec.cfg:
            if v == "M":
                x = max_pool(x, 2, 2)
            else:
                x = nnx.relu(self.layers[i](x))
                i += 1
        return self.fc(global_avg_pool(x))


class BasicBlock(nnx.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); shortcut = identity or 1x1 conv + BN."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = conv(in_ch, mid_ch, 3, stride, rngs=rngs)
        self.bn1 = batch_norm(mid_ch, rngs=rngs)
        self.conv2 = conv(mid_ch, out_ch, 3, rngs=rngs)
        self.bn2 = batch_norm(out_ch, rngs=rngs)
        # Option-B shortcut of the paper's code: projection whenever the shape changes.
        self.downsample = (ConvBN(in_ch, out_ch, 1, stride, rngs=rngs)
                           if stride != 1 or in_ch != out_ch else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(y + shortcut)


class Stage(nnx.Module):
    """A sequence of residual blocks. Path: blocks/i."""

    def __init__(self, blocks: list[nnx.Module]):
        self.blocks = nnx.List(blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class ResNetCifar(SpecModel):
    """CIFAR ResNet: stem conv3x3+BN+ReLU, stages of basic blocks (stride 1, 2, 2, ...), GAP, fc.

    Paths: conv1, bn1, stages/s/blocks/b/{conv1,bn1,conv2,bn2,downsample/{conv,bn}}, fc.
    """

    def __init__(self, spec: ResNetCifarSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        ch = spec.stage_widths[0]
        self.conv1 = conv(spec.in_channels, ch, 3, rngs=rngs)
        self.bn1 = batch_norm(ch, rngs=rngs)
        stages = []
        for s, (width, mids) in enumerate(zip(spec.stage_widths, spec.block_widths)):
            blocks = []
            for b, mid in enumerate(mids):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(ch, mid, width, stride, rngs=rngs))
                ch = width
            stages.append(Stage(blocks))
        self.stages = nnx.List(stages)
        self.fc = linear(ch, spec.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return self.fc(global_avg_pool(x))


class Bottleneck(nnx.Module):
    """torchvision v1.5 bottleneck: 1x1 -> 3x3 (stride) -> 1x1, each + BN, ReLU; residual add."""

    def __init__(self, in_ch: int, mid1: int, mid2: int, out_ch: int, stride: int,
                 downsample: bool, *, rngs: nnx.Rngs):
        self.conv1 = conv(in_ch, mid1, 1, rngs=rngs)
        self.bn1 = batch_norm(mid1, rngs=rngs)
        self.conv2 = conv(mid1, mid2, 3, stride, rngs=rngs)
        self.bn2 = batch_norm(mid2, rngs=rngs)
        self.conv3 = conv(mid2, out_ch, 1, rngs=rngs)
        self.bn3 = batch_norm(out_ch, rngs=rngs)
        self.downsample = ConvBN(in_ch, out_ch, 1, stride, rngs=rngs) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(y + shortcut)


class ResNet50(SpecModel):
    """ImageNet bottleneck ResNet: 7x7/2 stem + BN + ReLU + 3x3/2 max-pool, 4 stages, GAP, fc.

    Paths: conv1, bn1, stages/s/blocks/b/{conv1..3,bn1..3,downsample/{conv,bn}}, fc. The first
    block of every stage has a projection shortcut (as torchvision), whatever the widths, so a
    pruned spec never changes the block structure.
    """

    def __init__(self, spec: ResNet50Spec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.conv1 = conv(spec.in_channels, spec.stem_width, 7, 2, padding=3, rngs=rngs)
        self.bn1 = batch_norm(spec.stem_width, rngs=rngs)
        ch, stages = spec.stem_width, []
        for s, (width, pairs) in enumerate(zip(spec.stage_widths, spec.block_widths)):
            blocks = []
            for b, (mid1, mid2) in enumerate(pairs):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(Bottleneck(ch, mid1, mid2, width, stride, b == 0, rngs=rngs))
                ch = width
            stages.append(Stage(blocks))
        self.stages = nnx.List(stages)
        self.fc = linear(ch, spec.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = max_pool(x, 3, 2, padding=1)
        for stage in self.stages:
            x = stage(x)
        return self.fc(global_avg_pool(x))

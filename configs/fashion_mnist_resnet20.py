"""The evidence benchmarks' residual network (README "Results"): ResNet-20 (stage widths 16/32/64, option-B
shortcuts, BN after every conv) on the embedded Fashion-MNIST, then OBA one-shot structured pruning to ops
ratio 0.5 with a short fine-tune. Residual sums join paths of different depth, so here OBA is *not* a
per-layer multiple of Taylor (README "When OBA is a multiple of Taylor").

    python train.py --config configs/fashion_mnist_resnet20.py --workdir runs/fm_resnet20/dense
    python bench/fidelity.py --config configs/fashion_mnist_resnet20.py --pretrained runs/fm_resnet20/dense --out bench/results/resnet20
    python bench/compare.py --config configs/fashion_mnist_resnet20.py --pretrained runs/fm_resnet20/dense --out bench/results/resnet20
"""

from configs.fashion_mnist import get_config as _fashion_vgg


def get_config():
    config = _fashion_vgg()
    config.model.family = "resnet_cifar"
    config.model.spec = {"depth": 20, "in_channels": 1, "image_size": 28, "num_classes": 10}
    config.train.epochs = 3
    config.prune.n_m_exclude = ("conv1",)   # 2:4 skips it: the stem conv reads 3×3×1 = 9 inputs, which 4 does not divide
    return config

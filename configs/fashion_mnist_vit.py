"""The evidence benchmarks' attention network (README "Results"): a small ViT (7×7 patches → 16 tokens + class
token, width 64, 4 layers of 4 heads, MLP 128) on the embedded Fashion-MNIST, then OBA one-shot structured
pruning to ops ratio 0.5 with a short fine-tune. Attention multiplies two layers' outputs (parallel
products), where OBA's parallel term is not Taylor's.

    python train.py --config configs/fashion_mnist_vit.py --workdir runs/fm_vit/dense
    python bench/fidelity.py --config configs/fashion_mnist_vit.py --pretrained runs/fm_vit/dense --out bench/results/vit
    python bench/compare.py --config configs/fashion_mnist_vit.py --pretrained runs/fm_vit/dense --out bench/results/vit
"""

from configs.fashion_mnist import get_config as _fashion_vgg


def get_config():
    config = _fashion_vgg()
    config.model.family = "vit"
    config.model.spec = {"image_size": 28, "patch_size": 7, "in_channels": 1, "hidden_dim": 64, "num_layers": 4,
                         "num_heads": 4, "head_dim": 16, "mlp_dim": 128, "num_classes": 10}
    config.train.epochs = 8
    # MLP units, heads and head dims (ops ratio 0.15 is out of reach with MLP units alone: 0.56 at 5% of them);
    # the residual stream (the patch embedding's width) stays
    config.prune.kinds = ("hidden", "heads", "head_dim")
    config.prune.n_m_exclude = ("conv_proj",)   # 2:4 skips it: the patch embedding reads 7×7×1 = 49 inputs, which 4 does not divide
    return config

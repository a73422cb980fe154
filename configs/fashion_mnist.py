"""Embedded default: a small BN CNN on Fashion-MNIST (>= 90% test top-1 in a few CPU minutes), then OBA
structured pruning to ops ratio 0.5 and three epochs of fine-tuning (what `make demo` runs).

    python prune.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist
    python prune.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist_unstructured \
        --config.prune.mode=unstructured --config.prune.pretrained=runs/fashion_mnist/dense
    python train.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist/dense   # the dense model alone
"""

from oba_jax.experiment.config import default_sections, finetune_section, prune_section


def get_config():
    config = default_sections()
    config.model.family = "vgg"
    # Three bias-free conv3x3+BN+ReLU stages on 28x28x1, GAP, one Dense: ~43 k parameters, small
    # because XLA's CPU conv weight-gradient is slow (DESIGN.md) and the demo must stay short.
    config.model.spec.cfg = (16, "M", 32, "M", 128)
    config.model.spec.in_channels = 1
    config.model.spec.image_size = 28
    config.model.spec.num_classes = 10

    config.data.name = "fashion_mnist"
    config.data.augment = False  # a few epochs are too few for crop/flip to pay off
    config.data.synthetic.image_shape = (28, 28, 1)

    config.optim.lr = 0.1
    config.optim.weight_decay = 1e-4
    config.optim.schedule = "cosine"

    config.train.epochs = 6
    config.train.batch_size = 128
    config.train.eval_batch_size = 1000
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 500

    # --config.prune.mode=unstructured: OBA's progressive schedule to keep ratio 0.1 against taylor and magnitude,
    # and a one-shot 2:4 point (the first conv reads one channel, so 2:4 skips it)
    config.prune = prune_section(mode="oneshot", importance="oba", ops_ratios=(0.5,), steps=50, score_batches=10,
                                 score_batch_size=64, keep_ratio=0.1, compare=("taylor", "magnitude"), n_m=(2, 4),
                                 n_m_exclude=("layers/0/conv",))
    config.finetune = finetune_section(epochs=3.0, lr=0.01, schedule="cosine", weight_decay=1e-4)
    return config

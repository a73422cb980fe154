"""Wide ResNet-32 on CIFAR-10, iterative OBA pruning (OBA_SPEC.md §5): R = 0.955; each time the ops ratio
drops below the next target (0.6 … 0.05) the model is fine-tuned (100 epochs) and pruning continues from it.

    python prune.py --config configs/cifar10_resnet32_iterative.py --workdir runs/cifar10_resnet32_iterative
"""

from oba_jax.experiment.config import cifar_iterative_finetune, cifar_wide_resnet32, prune_section


def get_config():
    config = cifar_wide_resnet32("cifar10")
    config.prune = prune_section(mode="iterative", importance="oba", ops_ratios=(0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05),
                                 final_ratio=0.955, steps=50, score_batches=200, score_batch_size=64)
    config.finetune = cifar_iterative_finetune()
    return config

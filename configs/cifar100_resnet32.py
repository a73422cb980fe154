"""Wide ResNet-32 (stage widths 64/128/256) on CIFAR-100: the paper's pretraining recipe, then OBA one-shot to ops
ratio 0.5 (OBA_SPEC.md §5, §8).

    python prune.py --config configs/cifar100_resnet32.py --workdir runs/cifar100_resnet32
"""

from oba_jax.experiment.config import cifar_oneshot_finetune, cifar_wide_resnet32, prune_section


def get_config():
    config = cifar_wide_resnet32("cifar100")
    config.prune = prune_section(mode="oneshot", importance="oba", ops_ratios=(0.5,), steps=50, score_batches=200,
                                 score_batch_size=64)
    config.finetune = cifar_oneshot_finetune()
    return config

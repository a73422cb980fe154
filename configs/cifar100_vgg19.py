"""VGG-19-BN on CIFAR-100: the paper's pretraining recipe, then OBA one-shot to ops ratio 0.14 (OBA_SPEC.md §5, §8).

    python prune.py --config configs/cifar100_vgg19.py --workdir runs/cifar100_vgg19
    python train.py --config configs/cifar100_vgg19.py --workdir runs/cifar100_vgg19/dense   # the dense model alone
"""

from oba_jax.experiment.config import cifar_oneshot_finetune, cifar_pretraining_recipe, default_sections, prune_section


def get_config():
    config = default_sections()
    config.model.family = "vgg"
    config.model.spec.cfg_name = "vgg19"
    config.model.spec.image_size = 32
    config = cifar_pretraining_recipe(config, "cifar100")
    config.prune = prune_section(mode="oneshot", importance="oba", ops_ratios=(0.14,), steps=50, score_batches=200,
                                 score_batch_size=64)
    config.finetune = cifar_oneshot_finetune()
    return config

"""Wide ResNet-32 (stage widths 64/128/256) on CIFAR10 with the paper's pretraining recipe (OBA_SPEC.md §8)."""

from oba_jax.experiment.config import cifar_pretraining_recipe, default_sections


def get_config():
    config = default_sections()
    config.model.family = "resnet_cifar"
    config.model.spec.depth = 32
    config.model.spec.width_multiplier = 4
    config.model.spec.image_size = 32
    return cifar_pretraining_recipe(config, "cifar10")

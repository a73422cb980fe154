"""VGG-19-BN on CIFAR10 with the paper's pretraining recipe (OBA_SPEC.md §8)."""

from oba_jax.experiment.config import cifar_pretraining_recipe, default_sections


def get_config():
    config = default_sections()
    config.model.family = "vgg"
    config.model.spec.cfg_name = "vgg19"
    config.model.spec.image_size = 32
    return cifar_pretraining_recipe(config, "cifar10")

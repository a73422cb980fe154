"""ResNet-50 on ImageNet-1k with the paper's fine-tuning recipe (OBA_SPEC.md §8)."""

from oba_jax.experiment.config import default_sections, imagenet_finetune_recipe


def get_config():
    config = default_sections()
    config.model.family = "resnet50"
    config.model.spec.image_size = 224
    config.model.spec.num_classes = 1000
    return imagenet_finetune_recipe(config)

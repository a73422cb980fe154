"""The authors' unstructured setting (OBA_SPEC.md §6): ResNet-20 (stage widths 16/32/64) on CIFAR-10, pretrained
with the paper's recipe but without augmentation, then OBA's progressive schedule to keep ratio 0.1 (49 steps,
~201 batches of 64 per step) and no fine-tuning; taylor and magnitude through the same schedule for comparison.

    python prune.py --config configs/cifar10_resnet20_unstructured.py --workdir runs/cifar10_resnet20_unstructured
"""

from oba_jax.experiment.config import cifar_pretraining_recipe, default_sections, finetune_section, prune_section


def get_config():
    config = default_sections()
    config.model.family = "resnet_cifar"
    config.model.spec.depth = 20
    config.model.spec.image_size = 32
    config = cifar_pretraining_recipe(config, "cifar10")
    config.data.augment = False
    config.prune = prune_section(mode="unstructured", importance="oba", keep_ratio=0.1, unstructured_steps=49,
                                 score_batches=201, score_batch_size=64, compare=("taylor", "magnitude"))
    config.finetune = finetune_section(epochs=0.0)   # the authors do not fine-tune; set epochs to do so
    return config

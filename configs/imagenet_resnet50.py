"""ResNet-50 on ImageNet-1k: OBA one-shot to ops ratio 0.51 with importance from 350 batches of 2 images,
then the paper's fine-tuning (OBA_SPEC.md §5, §8), streaming ImageNet from disk (8 Grain workers crop and flip;
bf16 compute). From the downloaded tars and torchvision's ImageNet weights (no TensorFlow, no torch needed; a timm
.safetensors works too), with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in ~/imagenet/manual:

    python -m oba_jax.experiment.imagenet prepare --manual-dir ~/imagenet/manual --data-dir ~/imagenet/tfds
    curl -LO https://download.pytorch.org/models/resnet50-0676ba61.pth
    python -m oba_jax.experiment.pretrained --family resnet50 --weights resnet50-0676ba61.pth --workdir runs/imagenet_resnet50_dense
    python prune.py --config configs/imagenet_resnet50.py --workdir runs/imagenet_resnet50 --config.prune.pretrained=runs/imagenet_resnet50_dense --config.data.data_dir=~/imagenet/tfds
"""

from oba_jax.experiment.config import default_sections, imagenet_finetune, imagenet_finetune_recipe, prune_section


def get_config():
    config = default_sections()
    config.model.family = "resnet50"
    config.model.spec.image_size = 224
    config.model.spec.num_classes = 1000
    config = imagenet_finetune_recipe(config)
    config.prune = prune_section(mode="oneshot", importance="oba", ops_ratios=(0.51,), steps=50, score_batches=350,
                                 score_batch_size=2)
    config.finetune = imagenet_finetune()
    return config

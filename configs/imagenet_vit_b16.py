"""ViT-B/16 on ImageNet-1k: OBA one-shot to ops ratio 0.51 (MLP hidden units only, as the authors) with importance from 350 batches of 2 images,
then the paper's fine-tuning (OBA_SPEC.md §5, §8), streaming ImageNet from disk (8 Grain workers crop and flip;
bf16 compute). From the downloaded tars and torchvision's ImageNet weights (no TensorFlow, no torch needed; a timm
.safetensors works too), with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in ~/imagenet/manual:

    python -m oba_jax.experiment.imagenet prepare --manual-dir ~/imagenet/manual --data-dir ~/imagenet/tfds
    curl -LO https://download.pytorch.org/models/vit_b_16-c867db91.pth
    python -m oba_jax.experiment.pretrained --family vit --weights vit_b_16-c867db91.pth --workdir runs/imagenet_vit_b16_dense
    python prune.py --config configs/imagenet_vit_b16.py --workdir runs/imagenet_vit_b16 --config.prune.pretrained=runs/imagenet_vit_b16_dense --config.data.data_dir=~/imagenet/tfds
"""

from oba_jax.experiment.config import default_sections, imagenet_finetune, imagenet_finetune_recipe, prune_section


def get_config():
    config = default_sections()
    config.model.family = "vit"
    config.model.spec.config_name = "vit_b16"
    config.model.spec.image_size = 224
    config.model.spec.num_classes = 1000
    config = imagenet_finetune_recipe(config)
    config.prune = prune_section(mode="oneshot", importance="oba", ops_ratios=(0.51,), steps=50, score_batches=350,
                                 score_batch_size=2, kinds=("hidden",))
    config.finetune = imagenet_finetune()
    return config

"""Every configs/*.py loads, validates, trains 2 steps and runs its pruning pipeline on synthetic data of
its shapes (the ImageNet ones on a tiny streamed imagenet2012); bad overrides are rejected with a message naming
the key."""

from __future__ import annotations

import glob
import json
import os

import pytest

from oba_jax.experiment import config as config_lib, pipelines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))

# The full-size models would take minutes to compile on CPU, so the largest keep their family and
# the rest of their recipe but get narrow widths (and ImageNet ones 32x32 images) in this smoke test.
SHRINK = {
    "cifar10_vgg19": [("model.spec.cfg_name", "None"), ("model.spec.cfg", "(8, 'M', 8, 'M', 16, 'M', 16, 'M', 16)")],
    "cifar100_vgg19": [("model.spec.cfg_name", "None"), ("model.spec.cfg", "(8, 'M', 8, 'M', 16, 'M', 16, 'M', 16)")],
    "cifar10_resnet32": [("model.spec.width_multiplier", "1")],
    # one stage: the recipe runs through the iterative path; going on from each fine-tuned model over two stages
    # is test_prune_pipeline.py::test_iterative_continues_from_each_fine_tuned_model's (a second stage cost 10 s)
    "cifar10_resnet32_iterative": [("model.spec.width_multiplier", "1"), ("model.spec.depth", "8"),
                                   ("prune.ops_ratios", "(0.6,)")],
    "cifar10_resnet20_unstructured": [("model.spec.depth", "8"), ("prune.compare", "()")],
    "cifar100_resnet32": [("model.spec.width_multiplier", "1"), ("model.spec.depth", "8")],
    # the ImageNet configs start from torchvision weights: the committed narrow fixtures (tests/test_pretrained.py)
    "imagenet_resnet50": [("model.spec.image_size", "32"), ("model.spec.stem_width", "64"),
                          ("model.spec.stage_widths", "(16, 32, 64, 128)"),
                          ("model.spec.blocks_per_stage", "(1, 2, 1, 1)"),
                          ("model.spec.block_widths", "(((4, 4),), ((8, 8), (8, 8)), ((16, 16),), ((32, 32),))"),
                          ("model.spec.num_classes", "10"), ("data.synthetic.num_classes", "10")],
    "imagenet_vit_b16": [("model.spec.image_size", "32"), ("model.spec.num_layers", "2"),
                         ("model.spec.hidden_dim", "32"), ("model.spec.num_heads", "2"),
                         # MLP-heavy as ViT-B/16 is, so pruning MLP units alone can reach ops ratio 0.51
                         ("model.spec.mlp_dim", "256"), ("model.spec.patch_size", "8"),
                         ("model.spec.num_classes", "10"), ("data.synthetic.num_classes", "10")],
}


PRETRAINED = {"imagenet_resnet50": ("resnet50", "tv_resnet50_narrow.pth", None),
              "imagenet_vit_b16": ("vit", "tv_vit_tiny.pth", 2)}


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
    """`pretrained_workdir(config)`: its torchvision fixture imported as `python -m oba_jax.experiment.pretrained`
    would, once per test process (each import costs a compile: only the one a test needs)."""
    from oba_jax.experiment import pretrained
    out: dict[str, str] = {}

    def workdir(config: str) -> str:
        if config not in out:
            family, weights, heads = PRETRAINED[config]
            out[config] = str(tmp_path_factory.mktemp(config))
            pretrained.import_weights(family, os.path.join(REPO, "tests", "fixtures", "pretrained", weights),
                                      out[config], num_heads=heads, image_size=32)
        return out[config]
    return workdir


# A config that is another with only the dataset and its class count changed runs no pipeline of its own
# here: its twin's run covers it (test_twins_differ_only_in_the_dataset keeps that true).
TWINS = {"cifar10_vgg19": "cifar100_vgg19", "cifar10_resnet32": "cifar100_resnet32"}
DATASET_KEYS = {"data.name", "data.synthetic.num_classes", "model.spec.num_classes"}
# The evidence benchmarks' architectures (README "Results") are the demo config with another model (and the
# model's epochs / prunable kinds): their families' pipelines run here through the CIFAR and ImageNet configs.
MODEL_VARIANTS = {"fashion_mnist_resnet20": "fashion_mnist", "fashion_mnist_vit": "fashion_mnist"}
MODEL_KEYS = ("model.", "train.epochs", "prune.kinds", "prune.n_m_exclude")
PIPELINES = [p for p in CONFIGS if _name(p) not in TWINS and _name(p) not in MODEL_VARIANTS]


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_the_required_configs_exist():
    names = {_name(p) for p in CONFIGS}
    assert {"fashion_mnist", "cifar10_resnet20_unstructured", "cifar10_vgg19", "cifar100_vgg19", "cifar10_resnet32", "cifar100_resnet32",
            "imagenet_resnet50", "imagenet_vit_b16"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_validates_as_written(path):
    config = config_lib.load_config(path, num_devices=1)
    spec = config_lib.model_spec(config)
    assert spec.family == config.model.family


def test_paper_recipes():
    c = config_lib.load_config(os.path.join(REPO, "configs", "cifar100_resnet32.py"), num_devices=1)
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.train.batch_size, c.train.epochs) == (0.1, 0.9, 5e-4, 64, 200)
    assert tuple(c.optim.milestones) == (60, 100, 150) and c.data.augment
    assert config_lib.model_spec(c).stage_widths == (64, 128, 256)
    assert config_lib.model_spec(c).num_classes == 100
    i = config_lib.load_config(os.path.join(REPO, "configs", "imagenet_vit_b16.py"), num_devices=1)
    assert (i.optim.lr, i.optim.weight_decay, i.train.epochs, tuple(i.optim.milestones)) == (0.001, 1e-4, 100, (30, 60, 80))


@pytest.mark.parametrize("name, twin", sorted(TWINS.items()))
def test_twins_differ_only_in_the_dataset(name, twin):
    a, b = (_flat(json.loads(config_lib.load_config(os.path.join(REPO, "configs", f"{n}.py"), num_devices=1)
                             .to_json_best_effort())) for n in (name, twin))
    differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert differ <= DATASET_KEYS, (f"{name} is no longer {twin} on another dataset ({sorted(differ - DATASET_KEYS)}): "
                                    "take it out of TWINS so that its own pipeline runs")


@pytest.mark.parametrize("name, base", sorted(MODEL_VARIANTS.items()))
def test_model_variants_differ_only_in_the_model(name, base):
    a, b = (_flat(json.loads(config_lib.load_config(os.path.join(REPO, "configs", f"{n}.py"), num_devices=1)
                             .to_json_best_effort())) for n in (name, base))
    differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert differ and all(k.startswith(MODEL_KEYS) for k in differ), sorted(differ)


@pytest.mark.parametrize("path", PIPELINES, ids=_name)
def test_config_trains_and_prunes_on_synthetic_data(path, tmp_path, request):
    """The whole prune.py pipeline of every config on synthetic data of its shapes: dense training (two
    steps, checkpointed), the schedule, the shrink, evaluation and the report (fine-tuning stops at 0
    steps: its train step is the dense run's, compiled once here already). The ImageNet configs start from
    imported torchvision weights (`prune.pretrained`) instead of dense training, as their docstrings say."""
    base = config_lib.load_config(path, num_devices=1)
    imagenet = _name(path).startswith("imagenet")
    # the ImageNet configs stream a tiny imagenet2012 in TFDS' real format (conftest.fake_imagenet), the others
    # train on synthetic data of their shapes
    dataset = ([("data.data_dir", request.getfixturevalue("fake_imagenet")), ("data.num_workers", "0")] if imagenet
               else [("data.name", "synthetic"), ("data.synthetic.num_train", "16"), ("data.synthetic.num_test", "8")])
    overrides = SHRINK.get(_name(path), []) + dataset + [
        ("train.batch_size", "4"), ("train.eval_batch_size", "4"), ("train.max_steps", "2"),
        ("train.progress_bar", "false"), ("prune.steps", "3"), ("prune.score_batches", "1"),
        ("prune.score_batch_size", "4"), ("prune.latency_repeats", "1"), ("finetune.max_steps", "0"),
        ("prune.unstructured_steps", "2"),
        ("plot.enabled", "false")]
    if imagenet:
        overrides.append(("prune.pretrained", request.getfixturevalue("pretrained_workdir")(_name(path))))
    if _name(path).startswith("cifar10_resnet32"):
        overrides.append(("model.spec.depth", "8"))   # the recipe is the same; 15 blocks only cost time here
    config = config_lib.load_config(path, overrides, num_devices=1)
    report = pipelines.run(config, str(tmp_path))
    assert pipelines.load_report(str(tmp_path)) == report      # the schema round-trips through report.json
    if config.prune.pretrained is None:
        assert os.path.isdir(tmp_path / "dense" / "checkpoints" / "2")     # two dense training steps
    assert report.importance == base.prune.importance
    if config.prune.mode == "unstructured":
        final = report.results[config.prune.importance].final
        assert final.kept == round(config.prune.keep_ratio * final.size)
        return
    targets = [t.target_ops_ratio for t in report.targets]
    assert targets == sorted(config.prune.ops_ratios, reverse=config.prune.mode == "iterative")
    assert all(t.ops_ratio <= t.target_ops_ratio for t in report.targets), report.targets
    if imagenet:   # evaluated on the 6 streamed validation images
        assert all(abs(a * 6 - round(a * 6)) < 1e-6 for t in report.targets for a in (t.acc_dense, t.acc_pruned)), report.targets
    else:
        assert tuple(config.data.synthetic.image_shape) == tuple(base.data.synthetic.image_shape)


@pytest.mark.parametrize("key, value, fragment", [
    ("optim.lr", "-1", "optim.lr"),
    ("nope", "1", "nope"),
    ("optim.nope", "1", "optim.nope"),
    ("optim.schedule", "linear", "optim.schedule"),
    ("data.name", "mnist", "data.name"),
    ("model.family", "alexnet", "model.family"),
    ("train.batch_size", "abc", "train.batch_size"),
    ("train.batch_size", "0", "train.batch_size"),
    ("data.augment", "maybe", "data.augment"),
    ("model.spec.hidden", "(0,)", "model.spec"),
    ("optim.milestones", "(100, 60)", "optim.milestones"),
    ("data.host_transform", "crop", "data.host_transform"),
    ("data.host_transform", "imagenet", "data.host_transform"),     # only a stream's workers transform images
    ("data.num_workers", "-1", "data.num_workers"),
])
def test_bad_overrides_are_rejected_naming_the_key(key, value, fragment):
    path = os.path.join(REPO, "configs", "fashion_mnist.py")
    if key == "model.spec.hidden":
        overrides = [("model.family", "mlp"), ("model.spec.cfg", "None"), ("model.spec.in_channels", "None"),
                     ("model.spec.image_size", "None"), ("model.spec.image_shape", "(28, 28, 1)"), (key, value)]
        with pytest.raises(config_lib.ConfigError, match="config.model.spec"):
            config_lib.load_config(path, overrides, num_devices=1)
        return
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load_config(path, [(key, value)], num_devices=1)
    assert fragment in str(info.value)


@pytest.mark.parametrize("config, overrides, key", [
    ("imagenet_resnet50", [("data.stream", "false")], "data.stream"),
    ("fashion_mnist", [("data.stream", "true"), ("data.download", "true")], "data.download"),
    ("synthetic_mlp", [("data.stream", "true")], "data.stream"),
])
def test_stream_settings_that_cannot_work_are_rejected(config, overrides, key):
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        config_lib.load_config(os.path.join(REPO, "configs", f"{config}.py"), overrides, num_devices=1)


def test_batch_size_must_divide_device_count():
    path = os.path.join(REPO, "configs", "fashion_mnist.py")
    with pytest.raises(config_lib.ConfigError, match="train.batch_size.*device count 3"):
        config_lib.load_config(path, num_devices=3)


def test_overrides_keep_types():
    path = os.path.join(REPO, "configs", "fashion_mnist.py")
    config = config_lib.load_config(path, [
        ("optim.lr", "1"), ("train.epochs", "4"), ("data.augment", "true"), ("optim.milestones", "(1, 2)"),
        ("train.max_steps", "7"), ("data.data_dir", "/x"), ("model.spec.cfg", "(8, 'M', 16)")], num_devices=1)
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.train.epochs == 4 and config.data.augment is True
    assert config.optim.milestones == (1, 2) and config.train.max_steps == 7 and config.data.data_dir == "/x"
    assert config_lib.model_spec(config).cfg == (8, "M", 16)
    again = config_lib.load_config(path, [("train.max_steps", "7"), ("train.max_steps", "None")], num_devices=1)
    assert again.train.max_steps is None


def test_split_override_args():
    rest, overrides = config_lib.split_override_args(
        ["--config", "c.py", "--config.optim.lr=0.5", "--workdir", "w", "--config.train.epochs", "3"])
    assert rest == ["--config", "c.py", "--workdir", "w"]
    assert overrides == [("optim.lr", "0.5"), ("train.epochs", "3")]

"""A tiny MLP on synthetic 8×8 images: the whole CLI path (training, pruning, scoring, failures) in seconds.

    python train.py --config configs/synthetic_mlp.py --workdir /tmp/mlp
    python prune.py --config configs/synthetic_mlp.py --workdir /tmp/mlp_pruned

scripts/failure_cases.py and tests/test_reliability.py run their bad inputs on it.
"""
from oba_jax.experiment.config import default_sections


def get_config():
    c = default_sections()
    c.model.family = "mlp"
    c.model.spec.image_shape = (8, 8, 1)
    c.model.spec.hidden = (16,)
    c.data.synthetic.update(num_train=64, num_test=32, image_shape=(8, 8, 1))
    c.train.update(batch_size=16, eval_batch_size=32, progress_bar=False)
    c.prune.update(score_batches=1, score_batch_size=16)
    return c

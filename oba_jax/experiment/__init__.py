"""Layer 5: everything that touches files, datasets or the model zoo — configs, data, checkpoints,
training. Import the modules (`oba_jax.experiment.training`, …); this package imports nothing eagerly."""

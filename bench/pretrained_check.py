"""The full-size check of the weights importer: every weights file in DIR (with DIR/logits.npz, written by
`tests/fixtures/make_pretrained_fixtures.py --full DIR` in a venv with torch) is imported with
`python -m oba_jax.experiment.pretrained` into a scratch workdir, restored with `restore_model`, and its logits
on the same inputs compared with torch's.

    python bench/pretrained_check.py --dir DIR
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from oba_jax.experiment.checkpoint import restore_model
    logits = np.load(os.path.join(args.dir, "logits.npz"))
    names = [k for k in logits.files if not k.endswith(":x")]
    worst = 0.0
    print("| file | family | import s | spec | max rel. diff of logits |\n|---|---|---|---|---|")
    for name in names:
        family = "vit" if "vit" in name else "resnet50"
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "oba_jax.experiment.pretrained", "--family", family, "--weights",
                            os.path.join(args.dir, name), "--workdir", os.path.join(tmp, "w")], check=True,
                           env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True)
            seconds = time.perf_counter() - start
            model, _ = restore_model(os.path.join(tmp, "w"))
        x = jnp.asarray(logits[name + ":x"]).transpose(0, 2, 3, 1)
        with jax.default_matmul_precision("highest"):
            out = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
        ref = logits[name]
        rel = float(np.abs(out - ref).max() / np.abs(ref).max())
        worst = max(worst, rel)
        spec = type(model.spec).__name__
        print(f"| {name} | {family} | {seconds:.1f} | {spec} | {rel:.1e} |", flush=True)
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())

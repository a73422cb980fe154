"""How fast the streaming input decodes and augments ImageNet images: per worker, and through Grain with worker
processes or threads.

    python bench/input_speed.py                       # 512 images, workers 0 1 2, table to stdout
    python bench/input_speed.py --images 2048 --workers 0 1 2 4 8 --out bench/results/input_speed.md

It writes ImageNet-like tars (JPEGs of ImageNet's mean size, 500×375 — smooth scenes with noise, about as large
as ImageNet's files), prepares them as `imagenet2012` with `python -m oba_jax.experiment.imagenet prepare`'s
code, and times:

- one process: the training transform (decode, RandomResizedCrop, flip, 224×224) and the evaluation transform
  (decode, resize 256, centre crop 224), computing batches one after another (`MapDataset[step]`), i.e. what one
  worker delivers;
- the training stream through Grain (`streaming.StepIterator`) with N worker processes, and the same batches
  read by N threads of one process, after a first batch that is not timed (it pays the workers' start).

The last column says how many workers the measured rate needs to feed a GPU that trains ResNet-50 at
`--target` images/s (default 2470: NVIDIA's published single-A100-80GB mixed-precision rate, DeepLearningExamples
PyTorch ResNet50 v1.5 README, "Training performance: NVIDIA DGX A100", pytorch-21.03 container; that table has
no H100 row — an H100 trains faster, so it needs proportionally more).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oba_jax.experiment import imagenet, streaming  # noqa: E402

BATCH = 32
PUBLISHED_A100_IMG_S = 2470.0


def _scene(rng: np.random.Generator, height: int = 375, width: int = 500) -> bytes:
    """A JPEG about as large as an ImageNet photo: smooth colour gradients plus texture noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(20, 80) + c) * np.cos(y / rng.uniform(20, 80) - c) for c in range(3)], -1)
    image = np.clip(127 + 90 * base + rng.normal(0, 18, (height, width, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_tars(manual: str, count: int, seed: int = 0) -> float:
    """ImageNet's two tars with `count` training JPEGs (2 synsets) and 64 validation ones; the mean JPEG size (KB)."""
    rng = np.random.default_rng(seed)
    os.makedirs(manual, exist_ok=True)
    sizes = []
    with tarfile.open(os.path.join(manual, imagenet.TRAIN_TAR), "w") as outer:
        for s, synset in enumerate(("n01440764", "n01443537")):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for k in range(count // 2):
                    payload = _scene(rng)
                    sizes.append(len(payload))
                    _add(t, f"{synset}_{k}.JPEG", payload)
            _add(outer, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual, imagenet.VAL_TAR), "w") as tar:
        for k in range(1, 65):
            _add(tar, f"ILSVRC2012_val_{k:08d}.JPEG", _scene(rng))
    return float(np.mean(sizes)) / 1024


def one_process(ds: streaming.StreamingDataset, steps: int) -> tuple[float, float]:
    """Images/s of the training and of the evaluation transform, computed here one batch after another."""
    train = streaming.train_batches(ds, seed=0, global_batch=BATCH, steps_per_epoch=ds.num_train // BATCH,
                                    num_steps=steps)
    start = time.perf_counter()
    for step in range(steps):
        train[step]
    train_rate = steps * BATCH / (time.perf_counter() - start)
    evals = streaming.eval_batches(ds, global_batch=BATCH)
    start = time.perf_counter()
    for k in range(len(evals)):
        evals[k]
    return train_rate, len(evals) * BATCH / (time.perf_counter() - start)


def through_grain(ds: streaming.StreamingDataset, steps: int, workers: int, processes: bool) -> float:
    """Images/s of the training stream after its first batch (which pays the workers' start)."""
    batches = streaming.train_batches(ds, seed=0, global_batch=BATCH, steps_per_epoch=ds.num_train // BATCH,
                                      num_steps=steps + 1)
    if processes:
        iterator = streaming.StepIterator(batches, 0, workers)
    else:
        iterator = streaming.iterate(batches, 0, workers, processes=False)
    next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    rate = steps * BATCH / (time.perf_counter() - start)
    iterator.close()
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="training JPEGs written (a multiple of 64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=PUBLISHED_A100_IMG_S,
                        help="the GPU's training rate, images/s (default: NVIDIA's published A100 rate)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("--keep", default=None, help="write the tars and the prepared dataset here and keep them "
                        "(default: a temporary directory, deleted)")
    args = parser.parse_args(argv)
    if args.images < 2 * BATCH or args.images % (2 * BATCH):
        parser.error(f"--images must be a positive multiple of {2 * BATCH}")

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        kb = write_tars(os.path.join(tmp, "manual"), args.images)
        start = time.perf_counter()
        imagenet.prepare(os.path.join(tmp, "manual"), os.path.join(tmp, "tfds"))
        prepared = (args.images + 64) / (time.perf_counter() - start)
        ds = streaming.open_stream("imagenet2012", os.path.join(tmp, "tfds"), image_shape=(224, 224, 3),
                                   host_transform="imagenet", num_workers=0, mean=(0.5,), std=(0.5,))
        steps = args.images // BATCH
        train_rate, eval_rate = one_process(ds, steps)
        rows = [("one process, training transform", train_rate, 1), ("one process, evaluation transform", eval_rate, 1)]
        for workers in sorted(set(args.workers)):
            if workers > 0:
                rows.append((f"Grain, {workers} worker process(es)", through_grain(ds, steps - 1, workers, True),
                             workers))
        for threads in sorted({max(w, 1) for w in args.workers}):   # (0 workers: one thread of this process)
            rows.append((f"Grain, {threads} thread(s) in this process", through_grain(ds, steps - 1, threads, False),
                         threads))

    lines = [f"Input speed: {args.images} ImageNet-like JPEGs (500×375, {kb:.0f} KB on average), batches of {BATCH}, "
             f"224×224 output; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. "
             f"`imagenet prepare` wrote {prepared:.0f} images/s.", "",
             f"| reader | images/s | workers to feed {args.target:.0f} images/s |", "|---|---|---|"]
    for name, rate, workers in rows:
        per = rate / workers
        lines.append(f"| {name} | {rate:.0f} | {args.target / per:.0f} at {per:.0f} per worker |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

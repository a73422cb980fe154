"""The failure table of issue 17: each hostile input, fault or interruption, its exit status and the first
line of the CLI's message, run against a checkout (this one by default).

    python scripts/failure_cases.py [--repo DIR] [--only NAME,...] > table.md

Every case runs `train.py` / `prune.py` of `--repo` in a fresh scratch directory on tiny synthetic data (or
small generated dataset files), so the table of the landed code and of a change come from the same cases.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

TINY = ["--config.data.name=synthetic", "--config.data.synthetic.num_train=256", "--config.data.synthetic.num_test=64",
        "--config.train.epochs=1", "--config.train.batch_size=32", "--config.train.eval_batch_size=64",
        "--config.train.progress_bar=false", "--config.model.spec.cfg=(8,'M',128)", "--config.prune.score_batches=2",
        "--config.prune.score_batch_size=16", "--config.finetune.max_steps=4", "--config.prune.latency_repeats=3"]
FM = ["--config", "configs/fashion_mnist.py"]
# the generated dataset files hold a few images: batch sizes they fill, two steps
SMALL_DATA = ["--config.train.batch_size=2", "--config.train.eval_batch_size=2", "--config.train.max_steps=2",
              "--config.train.progress_bar=false"]


class Runner:
    def __init__(self, repo: str, scratch: str):
        self.repo, self.scratch = os.path.abspath(repo), scratch
        self.env = dict(os.environ, PYTHONPATH=self.repo)

    def path(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *args], cwd=self.repo, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, *args: str) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, *args], cwd=self.repo, env=self.env, capture_output=True, text=True,
                              timeout=600)
        return proc.returncode, proc.stderr


def first_line(stderr: str) -> str:
    """The CLI's message: the first line that is neither absl's start-up noise nor a progress line."""
    skip = ("WARNING:absl", "train ", "train:", "prune to", "oba scores", "magnitude scores", "random scores")
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(skip)]
    if any("Traceback" in ln for ln in lines):
        return "Traceback … " + lines[-1][:160]
    return lines[0][:200] if lines else "(nothing)"


def idx(array) -> bytes:
    array = np.asarray(array, np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()


def fashion_dir(path: str, test_labels=(1, 2, 3), shape=(28, 28)) -> str:
    os.makedirs(path)
    images = idx(np.zeros((3, *shape)))
    for name, payload in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", idx([0, 1, 2])),
                          ("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", idx(test_labels))):
        with open(os.path.join(path, name), "wb") as f:
            f.write(payload)
    return path


def cifar_dir(path: str) -> str:
    folder = os.path.join(path, "cifar-10-batches-bin")
    os.makedirs(folder)
    rows = lambda labels: b"".join(bytes([lab]) + bytes(3072) for lab in labels)   # noqa: E731
    for i in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{i}.bin"), "wb") as f:
            f.write(rows([1, 2]))
    with open(os.path.join(folder, "test_batch.bin"), "wb") as f:
        f.write(rows([3, 57]))
    return path


def config_file(r: Runner, name: str, text: str) -> str:
    path = r.path(name)
    with open(path, "w") as f:
        f.write(text)
    return path


# absolute: a --repo checkout without this config (the landed code, say) runs it too
MLP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic_mlp.py")


def signalled(r: Runner, args: list[str], ready: str, signals: list[int]) -> tuple[int, str]:
    """Starts the command, waits until it is `ready` (a path that exists, or a text on its stderr), then sends
    `signals` 50 ms apart."""
    import threading
    proc = r.popen(*args)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(ready) or any(ready in line for line in list(seen)):
            for s in signals:
                proc.send_signal(s)
                time.sleep(0.05)
            break
        time.sleep(0.05)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    return proc.returncode, "".join(seen)


def cases(r: Runner):
    """(name, what, thunk -> (status, stderr))."""
    a, b = r.path("dense_a"), r.path("dense_b")

    def two_dense():
        if not os.path.isdir(a):
            r.run("train.py", *FM, *TINY, "--workdir", a)
            r.run("train.py", *FM, *TINY, "--workdir", b, "--config.train.seed=1")

    def other_pretrained():
        two_dense()
        w = r.path("w_pretrained")
        r.run("prune.py", *FM, *TINY, "--workdir", w, f"--config.prune.pretrained={a}")
        return r.run("prune.py", *FM, *TINY, "--workdir", w, f"--config.prune.pretrained={b}")

    def other_importance():
        two_dense()
        w = r.path("w_importance")
        r.run("prune.py", *FM, *TINY, "--workdir", w, f"--config.prune.pretrained={a}", "--config.prune.importance=magnitude")
        return r.run("prune.py", *FM, *TINY, "--workdir", w, f"--config.prune.pretrained={a}", "--config.prune.importance=random")

    def locked_pretrained():
        two_dense()
        holder = r.popen("-c", f"from oba_jax.experiment.lock import workdir_lock\nimport time\n"
                               f"with workdir_lock({a!r}):\n    print('held', flush=True); time.sleep(120)")
        holder.stdout.readline()
        try:
            return r.run("prune.py", *FM, *TINY, "--workdir", r.path("w_locked"), f"--config.prune.pretrained={a}")
        finally:
            holder.kill()

    def torn_metrics():
        two_dense()
        w = r.path("torn")
        shutil.copytree(a, w)
        with open(os.path.join(w, "metrics.jsonl"), "a") as f:
            f.write('{"kind": "train", "st')
        return r.run("train.py", *FM, *TINY, "--workdir", w)

    def broken(name, text, *extra):
        return lambda: r.run("prune.py", "--config", config_file(r, name + ".py", text), "--workdir",
                             r.path("w_" + name), *extra)

    def mlp(*extra, prog="prune.py"):
        workdir = r.path("w_mlp_" + "_".join(e.split(".")[-1] for e in extra).replace("=", "-"))   # one per case
        return lambda: r.run(prog, "--config", MLP, "--workdir", workdir, *extra)

    def round_to():
        two_dense()
        return r.run("prune.py", *FM, *TINY, "--workdir", r.path("w_round"), f"--config.prune.pretrained={a}",
                     "--config.prune.round_to=4096")

    def structured_magnitude():
        two_dense()
        return r.run("prune.py", *FM, *TINY, "--workdir", r.path("w_mag"), f"--config.prune.pretrained={a}",
                     "--config.prune.importance=magnitude")

    def sigterm():
        return signalled(r, ["train.py", "--config", MLP, "--workdir", r.path("w_term"),
                             "--config.train.epochs=100000", "--config.train.checkpoint_every_steps=20"],
                         r.path("w_term/checkpoints"), [signal.SIGTERM])

    def double_sigint():
        return signalled(r, ["train.py", "--config", MLP, "--workdir", r.path("w_int"),
                             "--config.train.epochs=100000", "--config.train.checkpoint_every_steps=20"],
                         r.path("w_int/checkpoints"), [signal.SIGINT, signal.SIGINT])

    def score_interrupted():
        two_dense()
        if os.path.exists(os.path.join(r.repo, "oba_jax", "experiment", "pipelines", "score.py")):
            args = ["prune.py", *FM, *TINY, "--workdir", r.path("w_score"), "--config.prune.mode=score",
                    f"--config.prune.pretrained={a}", "--config.prune.score_batches=8"]
        else:
            args = ["prune.py", "score", "--checkpoint", a, "--num-batches", "8", "--batch-size", "16"]
        return signalled(r, args, "scores:", [signal.SIGINT])

    return [
        ("1 other pretrained", "rerun in a workdir with prune.pretrained=B after A", other_pretrained),
        ("1 other importance", "rerun with importance=random after magnitude", other_importance),
        ("1 duplicate targets", "prune.ops_ratios=(0.5, 0.4999999)",
         lambda: r.run("prune.py", *FM, *TINY, "--workdir", r.path("w_dup"), "--config.prune.ops_ratios=(0.5, 0.4999999)")),
        ("2 Fashion labels 200", "train.py on IDX files whose test labels hold 200",
         lambda: r.run("train.py", *FM, "--workdir", r.path("w_fl"), *SMALL_DATA,
                       f"--config.data.data_dir={fashion_dir(r.path('fm_labels'), test_labels=(1, 200, 3))}")),
        ("2 CIFAR labels 57", "train.py on CIFAR-10 batches whose test labels hold 57",
         lambda: r.run("train.py", "--config", "configs/cifar10_vgg19.py", "--workdir", r.path("w_cl"), *SMALL_DATA,
                       f"--config.data.data_dir={cifar_dir(r.path('cifar'))}")),
        ("3 pretrained in use", "prune.pretrained held by a running train.py (its lock)", locked_pretrained),
        ("4 torn metrics.jsonl", "rerun of a workdir whose metrics.jsonl ends mid-line", torn_metrics),
        ("5 get_config raises", "get_config() raises RuntimeError",
         broken("raises", "def get_config():\n    raise RuntimeError('boom')\n")),
        ("5 get_config(arg)", "get_config(size) with a required argument", broken("arg", "def get_config(size):\n    return None\n")),
        ("5 no prune section", "a config without `prune` given to prune.py",
         broken("noprune", "from oba_jax.experiment.config import default_sections\ndef get_config():\n"
                           "    c = default_sections()\n    del c['prune']\n    return c\n")),
        ("5 sys.exit at import", "a config that calls sys.exit(0) at import", broken("exits", "import sys\nsys.exit(0)\n")),
        ("5 finetune.epochs=inf", "", mlp("--config.finetune.epochs=inf")),
        ("5 optim.lr=inf", "", mlp("--config.optim.lr=inf")),
        ("5 finetune.lr=inf", "", mlp("--config.finetune.lr=inf")),
        ("5 train.epochs=0.0001", "train.py", mlp("--config.train.epochs=0.0001", prog="train.py")),
        ("6 num_train < batch", "data.synthetic.num_train=8, batch 16", mlp("--config.data.synthetic.num_train=8", prog="train.py")),
        ("6 num_train=0", "", mlp("--config.data.synthetic.num_train=0", prog="train.py")),
        ("6 num_test=0", "", mlp("--config.data.synthetic.num_test=0", prog="train.py")),
        ("6 misspelt synthetic key", "data.synthetic.num_trian=64", mlp("--config.data.synthetic.num_trian=64", prog="train.py")),
        ("7 out of memory (XLA)", "model.spec.hidden=(2**36,)", mlp("--config.model.spec.hidden=(68719476736,)", prog="train.py")),
        ("7 SIGTERM", "SIGTERM during training", sigterm),
        ("7 SIGINT twice", "a second Ctrl-C 50 ms after the first", double_sigint),
        ("8 round_to=4096", "", round_to),
        ("8 IDX wrong dims", "images (3, 14, 56): the right byte count",
         lambda: r.run("train.py", *FM, "--workdir", r.path("w_dims"), *SMALL_DATA,
                       f"--config.data.data_dir={fashion_dir(r.path('fm_dims'), shape=(14, 56))}")),
        ("8 structured magnitude", "shipped config, importance=magnitude (compare holds magnitude)", structured_magnitude),
        ("8 --workdir ''", "", lambda: r.run("train.py", *FM, *TINY, "--workdir", "")),
        ("8 Ctrl-C while scoring", "score mode (landed: prune.py score)", score_interrupted),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--only", default="", help="comma-separated case names (a prefix each)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="failure_cases_")
    r = Runner(args.repo, scratch)
    rows = []
    print("| case | input | status | first line |\n|---|---|---|---|")
    try:
        for name, what, thunk in cases(r):
            if args.only and not any(name.startswith(o) for o in args.only.split(",")):
                continue
            status, stderr = thunk()
            rows.append({"case": name, "input": what, "status": status, "first_line": first_line(stderr)})
            print(f"| {name} | {what} | {status} | `{rows[-1]['first_line']}` |", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

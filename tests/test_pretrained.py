"""torchvision / timm weights into the zoo (`python -m oba_jax.experiment.pretrained`), without torch: the
committed fixtures (tests/fixtures/pretrained, written by make_pretrained_fixtures.py with the libraries' own
classes) import into workdirs whose restored models compute the torch logits, and every bad input is one
message with a documented status."""
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax.experiment import pretrained
from oba_jax.experiment.checkpoint import restore_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "pretrained")
# (file, family, --num-heads, --image-size)
CASES = {"tv_resnet50_narrow.pth": ("resnet50", None, 32), "timm_resnet50_narrow.safetensors": ("resnet50", None, 64),
         "tv_vit_tiny.pth": ("vit", 2, None), "timm_vit_tiny.safetensors": ("vit", 3, None)}


@nnx.jit
def _forward(model, x):
    return model(x)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{fixture file: workdir} for every fixture, imported in this process."""
    out = {}
    for name, (family, heads, size) in CASES.items():
        workdir = str(tmp_path_factory.mktemp(name.replace(".", "_")))
        pretrained.import_weights(family, os.path.join(FIXTURES, name), workdir, num_heads=heads, image_size=size)
        out[name] = workdir
    return out


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def test_every_fixture_restores_to_the_torch_logits(imported):
    logits = np.load(os.path.join(FIXTURES, "logits.npz"))
    for name, workdir in imported.items():
        model, meta = restore_model(workdir)
        x = jnp.asarray(logits[name + ":x"]).transpose(0, 2, 3, 1)            # NCHW → NHWC
        assert _rel(_forward(model, x), logits[name]) < 1e-5, name
        assert meta["pretrained"]["family"] == CASES[name][0] and meta["step"] == 0
        record = json.load(open(os.path.join(workdir, pretrained.PROVENANCE)))
        assert record["weights"].endswith(name) and len(record["sha256"]) == 64
    tv = restore_model(imported["tv_resnet50_narrow.pth"])[0].spec
    assert (tv.stem_width, tv.stage_widths, tv.blocks_per_stage, tv.num_classes) == (64, (16, 32, 64, 128), (1, 2, 1, 1), 10)
    vit = restore_model(imported["timm_vit_tiny.safetensors"])[0].spec
    assert (vit.patch_size, vit.hidden_dim, vit.num_heads, vit.head_dim, vit.image_size) == (8, 24, (3, 3), (8, 8), 32)


def test_the_command_writes_a_workdir(tmp_path):
    cmd = [sys.executable, "-m", "oba_jax.experiment.pretrained", "--family", "vit", "--num-heads", "2",
           "--weights", os.path.join(FIXTURES, "tv_vit_tiny.pth"), "--workdir", str(tmp_path / "w")]
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote" in out.stdout and (tmp_path / "w" / "checkpoints" / "0").is_dir()
    assert restore_model(str(tmp_path / "w"))[0].spec.mlp_dim == (256, 256)


def _safetensors(path, arrays):
    """A .safetensors written by hand (the format: u64 header length, JSON header, raw bytes)."""
    header, offset, body = {}, 0, b""
    for k, a in arrays.items():
        raw = np.ascontiguousarray(a, np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        offset, body = offset + len(raw), body + raw
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)
    return str(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _status(capsys, *args):
    status = pretrained.main(list(args))
    return status, capsys.readouterr().err


def test_bad_weights_are_one_message_and_a_status(tmp_path, capsys, monkeypatch, imported):
    monkeypatch.chdir(tmp_path)
    tv_vit = os.path.join(FIXTURES, "tv_vit_tiny.pth")
    state = pretrained.read_state_dict(os.path.join(FIXTURES, "timm_resnet50_narrow.safetensors"))
    w = lambda name: ["--workdir", str(tmp_path / name)]  # noqa: E731
    # another architecture: 4, naming the key it lacks
    status, err = _status(capsys, "--family", "resnet50", "--weights", tv_vit, *w("a"))
    assert status == 4 and "not a resnet50 state dict: it has no 'conv1.weight'" in err
    # an extra key (a head this importer does not know) and a missing one: 4, naming them
    extra = _safetensors(tmp_path / "extra.safetensors", {**state, "fc2.weight": np.ones((2, 2))})
    status, err = _status(capsys, "--family", "resnet50", "--weights", extra, *w("b"))
    assert status == 4 and "fc2.weight" in err and "not part of a resnet50" in err
    missing = _safetensors(tmp_path / "missing.safetensors",
                           {k: v for k, v in state.items() if k != "layer3.1.bn2.running_var"})
    status, err = _status(capsys, "--family", "resnet50", "--weights", missing, *w("c"))
    assert status == 4 and "layer3.1.bn2.running_var" in err
    # truncated files: 2, naming the file
    for name in ("timm_resnet50_narrow.safetensors", "tv_resnet50_narrow.pth"):
        data = open(os.path.join(FIXTURES, name), "rb").read()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        status, err = _status(capsys, "--family", "resnet50", "--weights", str(cut), *w("d" + name))
        assert status == 2 and str(cut) in err and "\n" not in err.strip(), err
    # a .pth whose pickle would run code: refused, nothing run
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"conv1.weight": _Evil()}))
    status, err = _status(capsys, "--family", "resnet50", "--weights", str(evil), *w("e"))
    assert status == 2 and "is not allowed in a state dict" in err and not (tmp_path / "pwned").exists()
    # arguments: a file that does not exist, heads that do not divide the width
    status, err = _status(capsys, "--family", "vit", "--weights", str(tmp_path / "nope.pth"), *w("f"))
    assert status == 2 and "is not a file" in err
    status, err = _status(capsys, "--family", "vit", "--num-heads", "5", "--weights", tv_vit, *w("g"))
    assert status == 2 and "--num-heads 5 does not divide the hidden width 32" in err
    assert not any((tmp_path / d / "checkpoints").exists() for d in "abcdefg")      # nothing half-written
    # a workdir that already holds a model
    status, err = _status(capsys, "--family", "vit", "--num-heads", "2", "--weights", tv_vit,
                          "--workdir", imported["tv_vit_tiny.pth"])
    assert status == 2 and "already holds checkpoints" in err

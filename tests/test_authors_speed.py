"""`bench/authors_speed.py` refuses what it cannot run with one clear line (the side-by-side run itself needs
torch and the authors' checkout, neither of which the suite has)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "authors_speed.py")


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_unknown_model_and_bad_repeats_are_usage_errors(tmp_path):
    out = _run("--authors-dir", str(tmp_path), "--models", "resnet50")
    assert out.returncode == 2 and "--models: choose from ['resnet32', 'vgg19']" in out.stderr


def test_missing_torch_or_checkout_is_one_clear_line(tmp_path):
    out = _run("--authors-dir", str(tmp_path), "--models", "vgg19")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    try:
        import torch  # noqa: F401
        assert "is not a checkout of https://github.com/NEU-REAL/OBA" in out.stderr
    except ImportError:
        assert "torch is not installed: pip install -e '.[compare]'" in out.stderr

"""`bench/score_speed.py --quick` runs end to end and prints its table."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_score_speed_quick_prints_a_table():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "score_speed.py"), "--quick",
                          "--rows", "grad,fastoba,oba"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("| model, batch | method | s / batch") for line in lines)
    rows = [line for line in lines if line.startswith("| resnet8, 4 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["grad", "fastoba", "oba"]
    assert all(float(r.split("|")[3]) > 0 for r in rows)

"""The benches run end to end and print their tables: `bench/score_speed.py --quick`, `bench/families.py`,
`bench/input_speed.py`."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_score_speed_quick_prints_a_table():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "score_speed.py"), "--quick",
                          "--rows", "oba"],   # one row: a second would only add its compile (3.5 s) to the suite
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("| model, batch | method | s / batch") for line in lines)
    rows = [line for line in lines if line.startswith("| resnet8, 4 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["oba"]
    assert all(float(r.split("|")[3]) > 0 for r in rows)


def test_families_prints_a_row_of_checks_and_refuses_an_unknown_family(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "families.py"), "--families", "width_scaled",
                          "--out", str(tmp_path / "t.md")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| attention")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].startswith("finite, 4/4 leaves") and cells[3] == "2/4 (head_dim)"
    assert float(cells[4].split(";")[0]) < 1e-12 and cells[5].startswith("runs, differs by")
    assert cells[6].startswith("equal") and float(cells[7]) < 1e-12
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "families.py"), "--families", "nope"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "unknown families ['nope']" in bad.stderr


def test_input_speed_prints_its_table(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "input_speed.py"), "--images", "64",
                          "--workers", "0", "--out", str(tmp_path / "t.md")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["one process, training transform",
                                                       "one process, evaluation transform",
                                                       "Grain, 1 thread(s) in this process"]
    assert all(float(r.split("|")[2]) > 0 for r in rows)

"""The README's code example runs as written."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_examples_run(tmp_path):
    """The first example (scores in your own code) and 'Pruning your own model' (a Flax linen model shrunk,
    exported with a symbolic batch and reloaded; then a plain function), one after the other in one interpreter."""
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    (shrink,) = [b for b in blocks if "shrink_program" in b]
    script = tmp_path / "example.py"
    script.write_text(blocks[0] + "\n" + shrink)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 parameter layers" in proc.stdout
    assert (tmp_path / "graph.dot").read_text().startswith("digraph")
    diff = float(re.search(r"max \|shrunk - masked\| = (\S+)", proc.stdout).group(1))
    assert diff < 1e-4 and "reloaded, batch 3: (3, 10)" in proc.stdout, proc.stdout
    assert (tmp_path / "pruned.stablehlo").stat().st_size > 0
    assert "(4, 3) (5, 3)" in proc.stdout, proc.stdout          # the plain-function model, reloaded

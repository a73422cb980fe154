"""README "Results": the cross-architecture tables, from the outputs of `bench/fidelity.py` and `bench/compare.py`.

    python bench/summarise_results.py bench/results/vgg bench/results/resnet20 bench/results/vit

Each argument is an `--out` directory of both scripts (its name labels the column). Prints markdown; reads only
`fidelity.json` and `compare.json` (a directory without one gets "–" in those tables).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence


def _load(directory: str, name: str) -> dict | None:
    path = os.path.join(directory, name)
    return json.load(open(path)) if os.path.isfile(path) else None


def _cell(value) -> str:
    return "–" if value is None or value != value else f"{value:.2f}"


def fidelity_table(dirs: Sequence[str]) -> list[str]:
    data = {os.path.basename(d.rstrip("/")): _load(d, "fidelity.json") for d in dirs}
    methods: list[str] = []
    for f in data.values():
        for m in (f or {}).get("channels_by_method", {}):
            methods += [m] if m not in methods else []
    names = list(data)
    head = ("| method | " + " | ".join(f"per-group ρ {n}" for n in names) + " | "
            + " | ".join(f"lowest 25%/group Δloss {n}" for n in names) + " | "
            + " | ".join(f"weight sets ρ {n}" for n in names) + " |")
    lines = [head, "|---|" + "---|" * (3 * len(names))]
    for m in methods:
        cells = []
        for key in ("group", "set", "weights"):
            for n in names:
                f = data[n]
                if f is None or m not in f["channels_by_method"]:
                    cells.append("–")
                elif key == "group":
                    cells.append(_cell(f["channels_by_method"][m]["per_group_mean"]["spearman"]))
                elif key == "set":
                    cells.append(_cell(f["sets"][m].get("per group 0.25")))
                else:
                    w = f.get("weights", {}).get("methods", {}).get(m)
                    cells.append(_cell(w["sets"]["spearman"]) if w else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def compare_tables(dirs: Sequence[str]) -> list[str]:
    data = {os.path.basename(d.rstrip("/")): _load(d, "compare.json") for d in dirs}
    names = [n for n, c in data.items() if c]
    if not names:
        return []
    methods = data[names[0]]["methods"]
    targets = list(next(iter(data[names[0]]["structured"].values())))
    lines = ["| method | " + " | ".join(f"{n} ops {t}" for n in names for t in targets) + " |",
             "|---|" + "---|" * (len(names) * len(targets))]
    for m in methods:
        cells = []
        for n in names:
            rows = data[n].get("structured", {}).get(m, {})
            cells += [f"{rows[t]['acc_finetuned']['mean']:.1f} ± {rows[t]['acc_finetuned']['std']:.1f}" if t in rows
                      else "–" for t in targets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    cols = ["keep 0.5", "keep 0.3", "keep 0.1, fine-tuned", "2:4, fine-tuned"]
    lines += ["", "| method | " + " | ".join(f"{n} {c}" for n in names for c in cols) + " |",
              "|---|" + "---|" * (len(names) * len(cols))]
    for m in methods:
        cells = []
        for n in names:
            row = data[n].get("unstructured", {}).get(m, {})
            cells += [f"{row[c]['mean']:.1f} ± {row[c]['std']:.1f}" if c in row else "–" for c in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    dirs = list(sys.argv[1:] if argv is None else argv)
    if not dirs:
        raise SystemExit("give one or more --out directories of bench/fidelity.py and bench/compare.py")
    missing = [d for d in dirs if not os.path.isdir(d)]
    if missing:
        raise SystemExit(f"not a directory: {missing}")
    print("\n".join(fidelity_table(dirs) + [""] + compare_tables(dirs)))


if __name__ == "__main__":
    main()

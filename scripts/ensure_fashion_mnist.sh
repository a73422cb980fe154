#!/usr/bin/env bash
# Makes sure Fashion-MNIST is on this machine without downloading it at run time:
# the Debian package `dataset-fashion-mnist` puts the official IDX files in /usr/share/datasets/fashion-mnist.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [[ -f "$dir/train-images-idx3-ubyte.gz" || -n "${OBA_JAX_DATA:-}" ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "Fashion-MNIST not found: installing the Debian package dataset-fashion-mnist" >&2
  apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y dataset-fashion-mnist >/dev/null; }
  exit 0
fi
cat >&2 <<MSG
Fashion-MNIST was not found in $dir.
Provide it in one of these ways, then run the command again:
  - sudo apt-get install dataset-fashion-mnist          (Debian/Ubuntu)
  - put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
    t10k-labels-idx1-ubyte.gz in a folder and export OBA_JAX_DATA=/that/folder
MSG
exit 1

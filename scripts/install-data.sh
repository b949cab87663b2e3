#!/usr/bin/env bash
# Installs the offline data sets this machine's package manager offers (Debian's
# dataset-fashion-mnist). Without root or apt it explains what to do and carries on:
# tests that need the files skip and say why.
set -u
FMNIST=/usr/share/datasets/fashion-mnist
if [ -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian package dataset-fashion-mnist (Fashion-MNIST IDX files) ..."
  if apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
     || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
    echo "Fashion-MNIST installed in $FMNIST"
    exit 0
  fi
  echo "warning: apt-get could not install dataset-fashion-mnist; Fashion-MNIST tests will skip" >&2
else
  echo "note: Fashion-MNIST not found in $FMNIST; run 'sudo apt-get install dataset-fashion-mnist'" \
       "or put the four IDX .gz files in a directory and set PRFL_DATA to it" >&2
fi
exit 0

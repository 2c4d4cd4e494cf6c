#!/usr/bin/env bash
# Run HERE (the CPU machine, which reaches PyPI) before a GPU session's device call: puts the
# Python 3.12 wheels the GPU image lacks (the official sam3 package for parity/baselines and its
# imports; torch-linear-assignment, the assignment benchmark's third-party baseline, a pure-Python
# Triton wheel) into .gpu_carry/ (git-ignored), for `run(..., carry=[".gpu_carry"])`.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu_carry && mkdir -p .gpu_carry
pip download --no-deps --only-binary :all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .gpu_carry sam3==0.1.4 pycocotools iopath ftfy wcwidth torch-linear-assignment==0.1.0 >/dev/null
ls -la .gpu_carry

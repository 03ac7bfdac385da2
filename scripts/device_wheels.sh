#!/usr/bin/env bash
# Fetch the wheels scripts/device_check.sh installs on a GPU machine without a network:
# the packages salt needs beyond what such a machine's Python has (torch, h5py, numpy, PyYAML,
# tqdm, matplotlib), for CPython 3.12 on x86-64 Linux.
#
#   bash scripts/device_wheels.sh DIR     # then: bash scripts/device_check.sh --wheels DIR
set -euo pipefail
DIR=${1:?usage: scripts/device_wheels.sh DIR}
mkdir -p "$DIR"
# pure-Python wheels; antlr4 4.9.3 is the version hydra-core 1.3 pins (an sdist on PyPI: built
# into a wheel here)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR" \
    hydra-core==1.3.8 omegaconf==2.3.1 submitit==1.5.4 hydra-submitit-launcher==1.2.0 \
    GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3
python3 -m pip wheel -q --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3
# atlas-ftag-tools (the b-tagging numbers of evaluation and of the validation rejections) and
# what `import ftag` needs beyond such a machine's Python; scipy, hdf5plugin and
# charset-normalizer are compiled: chosen for CPython 3.12 whatever Python fetches them
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR" \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    atlas-ftag-tools==0.3.6 scipy==1.17.1 hdf5plugin==7.1.0 requests==2.34.2 \
    charset-normalizer==3.5.3 idna==3.20 urllib3==2.8.0 certifi==2026.10.19.post1
ls -1 "$DIR"

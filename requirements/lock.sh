#!/usr/bin/env sh
# Regenerate the hash-locked requirement files the Dockerfile installs.
# Run from anywhere after changing dependencies in pyproject.toml; commit the result.
#
#   pip install "uv==0.13.9" && requirements/lock.sh
#
# Both images run Python 3.12 (python:3.12-slim and Ubuntu 24.04's python3.12).
# The API lock is universal (amd64 and arm64 hosts); the worker lock targets
# x86_64 Linux, where PyPI's torch wheel is the CUDA build.
set -eu
cd "$(dirname "$0")/.."
common="--python-version 3.12 --generate-hashes --quiet --custom-compile-command requirements/lock.sh"
# shellcheck disable=SC2086
uv pip compile $common --universal requirements/build.in -o requirements/build.txt
# shellcheck disable=SC2086
uv pip compile $common --universal pyproject.toml -o requirements/api.txt
# shellcheck disable=SC2086
uv pip compile $common --python-platform x86_64-manylinux_2_28 --extra worker pyproject.toml \
    -o requirements/worker.txt

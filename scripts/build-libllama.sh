#!/usr/bin/env bash
# Builds llama-cpp-python with modelyard's patches to its vendored ggml and prints the wheel's path.
#
#   scripts/build-libllama.sh PYTHON VERSION   (the Makefile passes the pin from pyproject.toml)
#
# The patches (patches/llama-cpp-python/*.patch) add CPU kernels, they change no result: see
# patches/llama-cpp-python/README.md; they are made for that version and `patch` stops the build if
# one no longer applies. The wheel's version is the upstream one with a local label
# (VERSION+modelyard.<hash of the patches>), so `llama-cpp-python==VERSION` in pyproject accepts it
# and `llama_cpp.__version__` tells at run time which build is loaded.
#
# Compiling libllama takes about 8 minutes on 2 cores, so the wheel is kept per machine in
# ~/.cache/modelyard/wheels/ (or $MODELYARD_WHEEL_CACHE), one folder per patch set and CPU: the
# build uses -march=native, so a wheel built on one CPU may not run on another that shares the
# cache (a home folder on NFS, a cache restored in CI); the CPU's model and flags are in the key.
# It only appears there once complete.
set -euo pipefail

command -v patch >/dev/null || { echo "build-libllama.sh: the 'patch' program is needed (apt-get install patch)" >&2; exit 1; }

python=${1:?usage: scripts/build-libllama.sh PYTHON VERSION}
version=${2:?usage: scripts/build-libllama.sh PYTHON VERSION}
root=$(cd "$(dirname "$0")/.." && pwd)
patches=("$root"/patches/llama-cpp-python/*.patch)
key=$(cat "${patches[@]}" | sha256sum | cut -c1-12)
cpu=$( { grep -m1 '^model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; uname -m; } 2>/dev/null | sha256sum | cut -c1-8)
cache_root=${MODELYARD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelyard/wheels}
cache="$cache_root/llama-cpp-python-$version+modelyard.$key-cpu.$cpu"

if ! compgen -G "$cache/*.whl" >/dev/null; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "building llama-cpp-python $version with modelyard's patches (about 8 minutes)..." >&2
    "$python" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
    src="$work/llama_cpp_python-$version"
    for patch_file in "${patches[@]}"; do
        # No fuzz: a patch that does not apply exactly to this version stops the build.
        patch --quiet --forward --fuzz=0 -p1 -d "$src" < "$patch_file"
    done
    sed -i "s/^__version__ = \"$version\"$/__version__ = \"$version+modelyard.$key\"/" "$src/llama_cpp/__init__.py"
    grep -q "+modelyard.$key" "$src/llama_cpp/__init__.py"
    "$python" -m pip wheel --quiet --no-deps -w "$work/wheel" "$src" >&2
    mkdir -p "$cache_root"
    staging=$(mktemp -d "$cache_root/.incoming.XXXXXX")
    cp "$work"/wheel/*.whl "$staging/"
    # A complete folder or none: a cut build leaves no wheel behind (and a racing build wins once).
    mv -T "$staging" "$cache" 2>/dev/null || rm -rf "$staging"
fi
compgen -G "$cache/*.whl" | head -n 1

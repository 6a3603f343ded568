#!/usr/bin/env bash
# Creates hangar's MMDetection environment: a Python venv with torch 2.1.2, mmcv 2.1.0 (built from
# its sdist with CPU ops), mmengine 0.10.7 and mmdet 3.3.0, pinned by python/constraints.txt.
#
# Slow things are cached per user (HANGAR_CACHE, default ~/.cache/hangar) and shared by every clone:
#   pip/            pip's download cache (torch alone is ~2.7 GB of wheels)
#   wheels/         the compiled mmcv wheel (~10 min to build on 2 cores)
#   venvs/mmdet-K/  the finished venv, K = hash of the pins and env_version
# The project's `.hangar/mmdet-venv` is a link to the cached venv. Idempotent: a second run with
# a finished venv only checks it and relinks (well under a second).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${HANGAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hangar}
link=${HANGAR_MMDET_VENV_LINK:-$repo/.hangar/mmdet-venv}
python=${HANGAR_PYTHON:-python3}
constraints=$repo/python/constraints.txt

# Bump env_version when the steps below change what ends up in the venv.
env_version=1
key=$( (cat "$constraints"; echo "$env_version") | sha256sum | cut -c1-16)
venv=$cache/venvs/mmdet-$key
done_marker=$venv/.hangar-complete

log() { printf '[install-mmdet] %s\n' "$*" >&2; }

mkdir -p "$cache/venvs" "$cache/wheels" "$cache/pip" "$(dirname "$link")"
# One installer at a time per cache: two clones installing at once would corrupt the venv.
exec 9>"$cache/install.lock"
flock 9

if [ ! -f "$done_marker" ]; then
  if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
    log "error: $python is not Python 3.11 (mmcv 2.1.0 and torch 2.1.2 are pinned for cp311); set HANGAR_PYTHON"
    exit 2
  fi
  log "creating $venv (first time: ~10 min for the mmcv build, ~2 min with the wheel cached)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip=("$venv/bin/python" -m pip --cache-dir "$cache/pip" --disable-pip-version-check)
  "${pip[@]}" install -q -c "$constraints" 'setuptools<70' wheel ninja
  "${pip[@]}" install -q -c "$constraints" torch==2.1.2 torchvision==0.16.2 'numpy<2'

  if ! ls "$cache"/wheels/mmcv-2.1.0-cp311-*.whl >/dev/null 2>&1; then
    log "building the mmcv 2.1.0 wheel with CPU ops (cached in $cache/wheels afterwards)"
    build=$(mktemp -d)
    # setup.py imports torch, hence no build isolation; ninja on PATH halves the build time.
    PATH="$venv/bin:$PATH" MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "${pip[@]}" wheel -q --no-deps --no-build-isolation mmcv==2.1.0 -w "$build"
    mv "$build"/mmcv-2.1.0-*.whl "$cache/wheels/"
    rm -rf "$build"
  fi
  "${pip[@]}" install -q -c "$constraints" --find-links "$cache/wheels" mmcv==2.1.0
  "${pip[@]}" install -q -c "$constraints" mmengine==0.10.7 mmdet==3.3.0 'opencv-python<4.12' pycocotools pillow
  XDG_CACHE_HOME="$cache/runtime" MPLCONFIGDIR="$cache/runtime/matplotlib" \
    "$venv/bin/python" -c 'import mmcv.ops, mmdet, mmengine; from mmdet.apis import DetInferencer'
  touch "$done_marker"
  log "ready"
fi

ln -sfn "$venv" "$link"
printf '%s\n' "$link"

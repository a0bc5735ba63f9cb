#!/usr/bin/env bash
# Rehearse gpu.sh on this CPU machine as the device machine would run it: a fresh copy of what the
# device call sends (tracked and untracked-not-ignored files, plus the carried .gpu/), a fresh srdiff
# install, the same steps with CPU-sized cases. Nothing in this checkout or its .venv is touched.
#
#   bash benchmarks/rehearse.sh ENV_PYTHON [--call 1|2]
#     ENV_PYTHON: the python of the environment to rehearse against, e.g. .venv/bin/python (torch 2.14.1,
#     triton 3.8) or /work/venv-rehearse/bin/python (torch 2.11 + triton 3.6 + numpy < 2.4, the GPU
#     image's pair; docs/benchmarks.md says how it was made).
#
# srdiff is installed (editable, from the copy) into an overlay venv that sees ENV_PYTHON's packages
# through a .pth line, so ENV_PYTHON's own environment is never written to. Outputs: $SCRATCH/out.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ENV_PY=${1:?usage: $0 ENV_PYTHON [--call 1|2]}
shift
ENV_PY=$(cd "$(dirname "$ENV_PY")" && pwd)/$(basename "$ENV_PY")
SCRATCH=${SCRATCH:-/tmp/srdiff-rehearse-$(basename "$(dirname "$(dirname "$ENV_PY")")")}
[ ! -e "$SCRATCH" ] || [ -f "$SCRATCH/.rehearsal" ] || { echo "$SCRATCH exists and is not a rehearsal folder" >&2; exit 1; }
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH/tree" && touch "$SCRATCH/.rehearsal"

(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -C "$SCRATCH/tree" -xf -
[ -d "$ROOT/.gpu" ] && cp -r "$ROOT/.gpu" "$SCRATCH/tree/"

read -r BASE SITE < <("$ENV_PY" -c "import sys, sysconfig; print(sys._base_executable, sysconfig.get_paths()['purelib'])")
"$BASE" -m venv --without-pip "$SCRATCH/venv"
OVERLAY_SITE=$("$SCRATCH/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SITE" > "$OVERLAY_SITE/_rehearsal_base_env.pth"

cd "$SCRATCH/tree"
start=$(date +%s)
PY="$SCRATCH/venv/bin/python" OUT="$SCRATCH/out" WORK="$SCRATCH/work" bash benchmarks/gpu.sh --cpu "$@" || status=$?
echo "rehearsal against $ENV_PY: $(( $(date +%s) - start )) s wall, exit ${status:-0}; outputs in $SCRATCH/out ($(ls "$SCRATCH/out" | wc -l) files)"
exit "${status:-0}"

#!/usr/bin/env bash
# Rehearse gpu.sh on this CPU machine as the device machine would run it: in a fresh copy of what the
# device call sends (tracked and untracked-not-ignored files, plus the carried .gpu/), the same steps
# with CPU-sized cases and caps x3 (SRDIFF_GPU_CAP_SCALE). This checkout and ENV_PYTHON's environment
# are only read: gpu.sh installs nothing into an environment (peer wheels go to a --target folder).
#
#   bash benchmarks/rehearse.sh ENV_PYTHON [--call 1|2]
#     ENV_PYTHON: the python of the environment to rehearse against, e.g. .venv/bin/python (torch 2.14.1,
#     triton 3.8) or /work/venv-rehearse/bin/python (torch 2.11 + triton 3.6 + numpy < 2.4, the GPU
#     image's pair; docs/benchmarks.md says how it was made).
#
# Outputs (what $OUT would bring back): $SCRATCH/out; default SCRATCH /tmp/srdiff-rehearse-<env name>.
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
[ ! -d "$ROOT/.gpu" ] || cp -r "$ROOT/.gpu" "$SCRATCH/tree/"

cd "$SCRATCH/tree"
start=$(date +%s)
status=0
PY="$ENV_PY" OUT="$SCRATCH/out" WORK="$SCRATCH/work" bash benchmarks/gpu.sh --cpu "$@" || status=$?
echo "rehearsal against $ENV_PY: $(( $(date +%s) - start )) s wall, exit $status;" \
  "$(ls "$SCRATCH/out" | wc -l) files in $SCRATCH/out"
exit "$status"

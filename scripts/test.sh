#!/usr/bin/env bash
# Set up (idempotent: the demo's packages plus the test extras) and run the
# whole test suite. Used by .ci/run. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EDISTILL_EXTRAS=plot,test bash scripts/setup.sh
. .venv/bin/activate
# glibc's default mmap threshold makes large gRPC messages 2-3x slower.
export MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"

#!/usr/bin/env bash
# Download the wheels a GPU check machine lacks (lm-eval and its needs, evalfleet's own) into the
# ignored folder .whl/, for Python 3.12 on x86-64 Linux, and print their total size. Run it here,
# where pip reaches the registry, from the repository's virtualenv (its versions are the pins):
#     scripts/gpu/prepare.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64 --platform any)
mapfile -t WANTED < <("$PY" scripts/gpu/missing.py)
echo "wheels to fetch: ${WANTED[*]}"
for want in "${WANTED[@]}"; do
    # a distribution published as source only (rouge-score, sqlitedict, ...) is pure Python: build its wheel here
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$want" 2>/dev/null || "$PY" -m pip wheel -q --no-deps -w .whl "$want"
done
"$PY" -m pip wheel -q --no-deps -w .whl .
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
printf 'wheels: %d files, %.1f MiB; with the source tree: %.1f MiB (the device machine takes 64 MiB)\n' \
    "$(ls .whl/*.whl | wc -l)" "$(echo "$total / 1048576" | bc -l)" "$(echo "($total + $tree) / 1048576" | bc -l)"

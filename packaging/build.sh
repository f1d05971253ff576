#!/usr/bin/env bash
# Build the single-file binary: dist/moechat (dist/moechat.exe on Windows, via Git Bash).
#
# Uses the current Python environment: it must have moechat's runtime dependencies
# (pip install -e .); the onnxruntime build installed there (onnxruntime, onnxruntime-gpu
# or onnxruntime-directml) decides which execution providers the binary carries.
# torch may be installed (the dev environment): the spec excludes it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PYINSTALLER_VERSION="6.22.3"

if ! "$PYTHON" -c "import PyInstaller, sys; sys.exit(PyInstaller.__version__ != '$PYINSTALLER_VERSION')" 2>/dev/null; then
  "$PYTHON" -m pip install -q "pyinstaller==$PYINSTALLER_VERSION"
fi

start=$(date +%s)
"$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath dist --workpath build/pyinstaller packaging/moechat.spec
binary=dist/moechat
[ -f dist/moechat.exe ] && binary=dist/moechat.exe
size=$(wc -c <"$binary")
echo "built $binary: $((size / 1000000)) MB in $(($(date +%s) - start)) s"

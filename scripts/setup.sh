#!/usr/bin/env bash
# Set up cryoformer in a virtual environment: system packages (when root), the venv, torch, and
# both distributions (core + widgets) in editable mode with the test and simulation extras.
#
#   bash scripts/setup.sh [VENV_DIR]
#
# Environment:
#   CRYOFORMER_PROFILE "full" (default: everything the tests need, GUI test tooling included) or
#                     "core" (what `make demo` needs: the core alone, no widgets, no GUI system
#                     packages, no extras unless CRYOFORMER_EXTRAS names some).
#   CRYOFORMER_TORCH  "cpu" (default without an NVIDIA driver) installs torch==2.13.0, whose CPU
#                     wheel this project's machines carry; "cuda" installs PyPI's default (CUDA)
#                     torch; "skip" keeps whatever torch the venv already has.
#   CRYOFORMER_EXTRAS extras of the core to install (default "dev,sim,umap").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
PROFILE="${CRYOFORMER_PROFILE:-full}"
case "$PROFILE" in
    full) EXTRAS="${CRYOFORMER_EXTRAS-dev,sim,umap}" ;;
    core) EXTRAS="${CRYOFORMER_EXTRAS-}"; CRYOFORMER_SKIP_GUI_PACKAGES=1 ;;
    *) echo "setup: CRYOFORMER_PROFILE must be full or core" >&2; exit 1 ;;
esac

# System packages. Only what pip cannot provide; installed when we are root and apt exists.
APT_PACKAGES=()
if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
    APT_PACKAGES+=(python3-venv)
fi
# The widget tests need a virtual X server with the xcb libraries Qt 6 loads (napari's viewer)
# and Debian's Chromium (the JupyterLab browser test; Playwright drives it, no browser download).
if [ "${CRYOFORMER_SKIP_GUI_PACKAGES:-0}" != "1" ]; then
    for pkg in xvfb chromium libegl1 libgl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
               libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 \
               libxcb-xfixes0 libxcb-cursor0 libdbus-1-3 libfontconfig1; do
        dpkg -s "$pkg" >/dev/null 2>&1 || APT_PACKAGES+=("$pkg")
    done
fi
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "setup: apt-get install ${APT_PACKAGES[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PACKAGES[@]}"
    else
        echo "setup: not root; these system packages are missing (GUI tests will skip): ${APT_PACKAGES[*]}" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

mode="${CRYOFORMER_TORCH:-}"
if [ -z "$mode" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi
case "$mode" in
    cpu)  echo "setup: torch (CPU build, pinned)"; "${PIP[@]}" install -q "torch==2.13.0" ;;
    cuda) echo "setup: torch (CUDA build)"; "${PIP[@]}" install -q torch ;;
    skip) echo "setup: keeping the installed torch" ;;
    *) echo "setup: CRYOFORMER_TORCH must be cpu, cuda or skip" >&2; exit 1 ;;
esac

# The torch already installed satisfies the core's requirement, so pip adds no other torch.
core="."
[ -n "$EXTRAS" ] && core=".[$EXTRAS]"
if [ "$PROFILE" = core ]; then
    echo "setup: cryoformer${EXTRAS:+[$EXTRAS]} (editable; the core only)"
    "${PIP[@]}" install -q -e "$core"
    check="import cryoformer as c, torch"
else
    echo "setup: cryoformer${EXTRAS:+[$EXTRAS]} and cryoformer-widgets (editable)"
    "${PIP[@]}" install -q -e "$core" -e "./widgets[jupyter,napari,test]"
    check="import cryoformer as c, cryoformer_widgets, torch"
fi
"$VENV/bin/python" -c "$check; print('setup: ok, cryoformer', c.__version__, '| torch', torch.__version__, '| CUDA', torch.cuda.is_available())"

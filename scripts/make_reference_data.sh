#!/usr/bin/env bash
# Regenerate tests/data/reference/ from scratch with the real tools (RELION 3.1.3 from Debian,
# cryoDRGN from PyPI). CI does not run this: it only reads the committed outputs.
#
#   sudo bash scripts/make_reference_data.sh          # installs the tools when missing
#   SKIP_INSTALL=1 bash scripts/make_reference_data.sh
#
# Needs root for apt-get (Debian bookworm: package `relion`, which pulls in openmpi).
# cryoDRGN goes into its own venv, $CRYODRGN_VENV (default /opt/cryodrgn-venv), never into the
# project's venv; torch is installed first, pinned, so pip does not fetch a CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/tests/data/reference"
HERE="$ROOT/scripts/reference"
VENV="${CRYODRGN_VENV:-/opt/cryodrgn-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CRYODRGN_VERSION="${CRYODRGN_VERSION:-4.3.1}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

if [[ -z "${SKIP_INSTALL:-}" ]]; then
    if ! command -v relion_project >/dev/null; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y relion
    fi
    if [[ ! -x "$VENV/bin/cryodrgn" ]]; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install "torch==$TORCH_VERSION"
        "$VENV/bin/pip" install "torch==$TORCH_VERSION" "cryodrgn==$CRYODRGN_VERSION" mrcfile
    fi
fi

PY="$VENV/bin/python"
CRYODRGN="$VENV/bin/cryodrgn"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$OUT"
rm -f ./*.pkl ./*.mrcs ./proj_*.star ./ctf_cryodrgn.npz

echo "== 1-3. volume, STAR files, cryoSPARC .cs"
"$PY" "$HERE/make_inputs.py" "$OUT"

echo "== RELION reads and rewrites the 3.1-format files byte for byte"
for f in relion31 relion31_two_optics relion31_particles_first; do
    relion_star_handler --i "$f.star" --o "$WORK/$f.star" >"$WORK/$f.log" 2>&1
done
cmp relion31.star "$WORK/relion31.star"
cmp relion31_two_optics.star "$WORK/relion31_two_optics.star"
# a particles-first file comes back optics-first, with the same text otherwise
cmp relion31.star "$WORK/relion31_particles_first.star"
relion_star_handler --i relion5.star --o "$WORK/relion5.star" >"$WORK/r5.log" 2>&1
diff <(sed 's/# version 50001/# version 30001/' relion5.star) "$WORK/relion5.star"
# RELION 3.1's own conversion of the 3.0 file (optics groups, origins in Å; kept as a fixture)
relion_star_handler --i relion30.star --o relion30_converted_by_relion31.star \
    >"$WORK/r30.log" 2>&1

echo "== 4. cryoDRGN parsers"
P() { echo "+ cryodrgn $*" >>"$WORK/commands.txt"; "$CRYODRGN" "$@" >>"$WORK/cryodrgn.log" 2>&1; }
: >"$WORK/commands.txt"
# RELION 3.0: no image size or pixel size in the file -> -D (and --Apix for the CTF)
P parse_pose_star relion30.star -D 32 -o relion30.cryodrgn_poses.pkl
P parse_ctf_star relion30.star -D 32 --Apix 2.0 -o relion30.cryodrgn_ctf.pkl
P parse_ctf_star relion30.star -D 32 --Apix 2.0 --kv 200 --cs 2.0 -w 0.08 --ps 15 \
    -o relion30_overrides.cryodrgn_ctf.pkl
P parse_pose_star relion30_converted_by_relion31.star -D 32 \
    -o relion30_converted_by_relion31.cryodrgn_poses.pkl
P parse_ctf_star relion30_converted_by_relion31.star -D 32 \
    -o relion30_converted_by_relion31.cryodrgn_ctf.pkl
for f in relion31 relion31_particles_first relion31_two_optics relion5; do
    P parse_pose_star "$f.star" -o "$f.cryodrgn_poses.pkl"
    P parse_ctf_star "$f.star" -o "$f.cryodrgn_ctf.pkl"
done
P parse_pose_csparc cryosparc.cs -o cryosparc.cryodrgn_poses.pkl
P parse_ctf_csparc cryosparc.cs -o cryosparc.cryodrgn_ctf.pkl

echo "== 5. cryoDRGN compute_ctf values"
"$PY" "$HERE/cryodrgn_ctf_values.py" ctf_cryodrgn.npz

echo "== 6. RELION projections (pixel size comes from the optics table: 2.0 A)"
relion_project --i volume_D32.mrc --ang relion31.star --o proj_relion >"$WORK/proj.log" 2>&1
relion_project --i volume_D32.mrc --ang relion31.star --o proj_relion_ctf --ctf \
    >"$WORK/proj_ctf.log" 2>&1
grep -h "pixel size" "$WORK/proj.log" "$WORK/proj_ctf.log" || true
echo "== 6b. cryoDRGN-model projections at cryoDRGN's parsed poses"
"$PY" "$HERE/cryodrgn_project.py" volume_D32.mrc relion31.cryodrgn_poses.pkl proj_cryodrgn.mrcs

cp "$WORK/commands.txt" cryodrgn_commands.txt
{
    echo "cryodrgn $("$CRYODRGN" --version 2>&1 | tail -n1 | awk '{print $NF}')"
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)')"
    echo "numpy $("$PY" -c 'import numpy; print(numpy.__version__)')"
    relion_project --version 2>&1 | grep -i "version"
} >tool_versions.txt
cat tool_versions.txt
du -ch "$OUT" | tail -n1
echo "done: $OUT"

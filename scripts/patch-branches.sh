#!/usr/bin/env bash
# Branches from the patches kept in kernels/experiments/ (unmerged work outlives a checkout as `git am` patches, its
# branches do not), for scripts/gpu-ab.sh's NAME=REV sides: each NAME=PATCH[+PATCH…] becomes branch exp/NAME, the
# patches applied in order on BASE (default main); an existing exp/NAME is replaced. A patch is a path, or a name
# found under kernels/experiments/ (`deterministic-dq` for kernels/experiments/flash/deterministic-dq.patch).
#   scripts/patch-branches.sh [--base REV] NAME=PATCH[+PATCH…]…
#   e.g. scripts/patch-branches.sh det=deterministic-dq store=deterministic-dq+store-first-dq hp=head-packed-forward
#        scripts/gpu-ab.sh main det=exp/det store=exp/store hp=exp/hp cuda_flash_attention
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
base=main
if [[ ${1:-} == --base ]]; then
    base="$2"
    shift 2
fi
[[ $# -ge 1 ]] || { echo "usage: scripts/patch-branches.sh [--base REV] NAME=PATCH[+PATCH…]…" >&2; exit 2; }
find_patch() {
    if [[ -f $1 ]]; then echo "$1"; return; fi
    local found
    found="$(find kernels/experiments -name "$1.patch" | head -1)"
    [[ -n $found ]] || { echo "patch-branches: no patch $1 (a path, or NAME of kernels/experiments/**/NAME.patch)" >&2; exit 1; }
    echo "$found"
}
tmp="$(mktemp -d)"
tree="$tmp/tree"
trap 'git worktree remove --force "$tree" 2>/dev/null || true; rm -rf "$tmp"' EXIT
for spec in "$@"; do
    name="${spec%%=*}"
    patches=()
    IFS=+ read -ra names <<< "${spec#*=}"
    for p in "${names[@]}"; do patches+=("$root/$(find_patch "$p")"); done
    git worktree add -q --detach "$tree" "$base"
    if ! git -C "$tree" am -q "${patches[@]}"; then
        git -C "$tree" am --abort || true
        echo "patch-branches: ${spec#*=} does not apply on $base" >&2
        exit 1
    fi
    git branch -f "exp/$name" "$(git -C "$tree" rev-parse HEAD)"
    git worktree remove --force "$tree"
    echo "exp/$name: $(git log --oneline -1 "exp/$name")"
done

#!/usr/bin/env bash
# Builds the session image: a Debian base made with debootstrap (no registry to pull from),
# Claude Code from the npm registry, and the wrapper. Reuses every part that already exists.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
image=${CCD_IMAGE:-ccd-session:latest}
base=${CCD_BASE_IMAGE:-ccd-base:bookworm}
suite=${CCD_BASE_SUITE:-bookworm}
claude_version=$(cat "$here/CLAUDE_CODE_VERSION")
build="$here/.build"

log() { printf '[image] %s\n' "$*" >&2; }

# The Debian mirror this machine's apt already uses, so the build works wherever apt does.
apt_mirror() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '{for (i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -v security | head -n1 || true)
  fi
  [ -n "$uri" ] || { log "no Debian mirror found in /etc/apt sources; set one up for apt first"; exit 1; }
  echo "$uri"
}

build_base() {
  if docker image inspect "$base" >/dev/null 2>&1; then
    log "base $base exists, reusing it"; return
  fi
  command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install debootstrap"; exit 1; }
  local rootfs; rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' RETURN
  log "bootstrapping a minimal Debian $suite into $rootfs (about a minute)"
  debootstrap --variant=minbase --include=python3,git,ca-certificates,procps \
    "$suite" "$rootfs" "$(apt_mirror)" >"$build/debootstrap.log" 2>&1 \
    || { log "debootstrap failed, see $build/debootstrap.log"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  log "importing the root file system as $base"
  tar -C "$rootfs" -c . | docker import - "$base" >/dev/null
}

fetch_claude() {
  local bin="$build/npm/node_modules/@anthropic-ai/claude-code/bin/claude.exe"
  if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null | awk '{print $1}')" = "$claude_version" ]; then
    log "Claude Code $claude_version already downloaded"
  else
    log "installing Claude Code $claude_version from the npm registry"
    mkdir -p "$build/npm"
    npm install --prefix "$build/npm" --no-audit --no-fund --loglevel=error \
      "@anthropic-ai/claude-code@$claude_version" >&2
  fi
  # Hard link (same file system) so the build context costs no copy.
  ln -f "$bin" "$build/stage/claude" 2>/dev/null || cp "$bin" "$build/stage/claude"
}

mkdir -p "$build/stage"
build_base
fetch_claude
rm -rf "$build/stage/wrapper"
cp -r "$root/wrapper" "$build/stage/wrapper"
find "$build/stage/wrapper" -name '__pycache__' -prune -exec rm -rf {} +
log "building $image"
docker build -q -f "$here/Dockerfile" --build-arg "BASE=$base" \
  --build-arg "CLAUDE_CODE_VERSION=$claude_version" -t "$image" "$here" \
  >"$build/docker-build.log" 2>&1 || { log "docker build failed:"; tail -n 30 "$build/docker-build.log" >&2; exit 1; }
log "image $image ready"

#!/usr/bin/env bash
# The container image's CI test (called by .ci/run; README "Container"). No registry is reachable here, so
# the base is a Debian bookworm made with debootstrap; podman builds the repository's Dockerfile on it with
# the CPU torch wheel from a mounted folder (no multi-GB CUDA download; the build's apt step adds the C
# compiler and Python headers, the path a CUDA base takes too), then, inside the image:
#   1. `wanfast generate --model tiny` writes a 9-frame MP4 (decoded and counted in the container);
#   2. `wanfast serve --model tiny` (the image's entrypoint) answers /health, and the image's HEALTHCHECK
#      says healthy; a job submitted with the API key runs and its MP4 is served (decoded and counted);
#   3. the service runs as a non-root user and stops cleanly (exit 0) on `podman stop`.
# Skips, with "SKIPPED:" and exit 0, only where podman cannot run at all. Needs root (debootstrap, and the
# rootful podman settings known to work on these machines: runc, cgroupfs, --root/--runroot flags).
#
# Env: WANFAST_CONTAINER_CACHE (default ~/.cache/wanfast-container: the base tarball, the torch wheel and
# podman's image store, so a second run reuses them), DEBIAN_MIRROR, TORCH_VERSION (default 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
say() { echo "container-test: $*"; }
skip() {
    echo "================================================================"
    echo "SKIPPED: container test (scripts/container-test.sh): $*  ($((SECONDS - start)) s)"
    echo "================================================================"
    exit 0
}

# --- tools: podman (runc runtime), debootstrap -------------------------------------------------------------
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing podman, runc, debootstrap"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null ||
            skip "apt-get could not install podman, runc and debootstrap"
    else
        skip "podman, runc or debootstrap is missing and cannot be installed here (needs root and apt-get)"
    fi
fi
[ "$(id -u)" = 0 ] || skip "not root: this test uses rootful podman and debootstrap"

CACHE=${WANFAST_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wanfast-container}
WORK=$(mktemp -d /tmp/wanfast-container-test.XXXXXX)
NAME=wanfast-ci-$$
mkdir -p "$CACHE/wheels"
P=(podman --root "$CACHE/storage" --runroot "$CACHE/runroot" --runtime runc --cgroup-manager cgroupfs)
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
cleanup() {
    "${P[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    "${P[@]}" image prune -f >/dev/null 2>&1 || true # earlier builds' images: the cache keeps one
    rm -rf --one-file-system "$WORK" # never into a mount a failed debootstrap left in its chroot
}
trap cleanup EXIT
"${P[@]}" info >/dev/null 2>"$WORK/info.err" || skip "podman cannot run: $(tail -n 3 "$WORK/info.err")"

# --- the base: Debian bookworm (Python 3.11, the CPU wheel's ABI) with python3-venv ---------------------
BASE_TAR=$CACHE/debian-bookworm-python3.tar
if [ ! -s "$BASE_TAR" ]; then
    say "debootstrap bookworm (cold: about 2 min)"
    t=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar --numeric-owner -C "$WORK/rootfs" -cf "$BASE_TAR.part" . && mv "$BASE_TAR.part" "$BASE_TAR"
    rm -rf "$WORK/rootfs"
    say "base made in $((SECONDS - t)) s"
fi
# a podman that cannot start a container cannot run here at all: that, too, is a skip
"${P[@]}" import -q "$BASE_TAR" localhost/wanfast-base:bookworm >/dev/null
"${P[@]}" run --rm --network none "${LIMITS[@]}" localhost/wanfast-base:bookworm true 2>"$WORK/run.err" ||
    skip "podman cannot run a container: $(tail -n 3 "$WORK/run.err")"

# --- the CPU torch wheel (cp311), where pip on this machine finds it ------------------------------------
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
WHEEL=$(find "$CACHE/wheels" -name "torch-${TORCH_VERSION}*-cp311-*.whl" | head -n 1)
if [ -z "$WHEEL" ]; then
    say "pip download torch==$TORCH_VERSION (cp311)"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 -d "$CACHE/wheels" "torch==$TORCH_VERSION"
    WHEEL=$(find "$CACHE/wheels" -name "torch-${TORCH_VERSION}*-cp311-*.whl" | head -n 1)
fi
# pip in the build trusts what pip here trusts: an intercepting HTTPS proxy's CA is in this bundle
CA=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
CA_ARGS=()
[ -s "$CA" ] && CA_ARGS=(-v "$CA:/run/host-ca.crt:ro" --build-arg PIP_CA=/run/host-ca.crt)

# --- build ----------------------------------------------------------------------------------------------
say "podman build ($(basename "$WHEEL"))"
t=$SECONDS
# docker format: OCI images have no HEALTHCHECK
"${P[@]}" build -q --format docker --network host "${LIMITS[@]}" "${CA_ARGS[@]}" \
    -v "$CACHE/wheels:/wheels:ro" --build-arg BASE_IMAGE=localhost/wanfast-base:bookworm \
    --build-arg "TORCH_SPEC=/wheels/$(basename "$WHEEL")" --build-arg "PIP_EXTRA=--find-links /wheels" \
    -t localhost/wanfast:ci . >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
say "built in $((SECONDS - t)) s"
IMG=localhost/wanfast:ci
# one-off runs skip the image's health check (podman would try to schedule it through systemd)
RUN=("${P[@]}" run --network none "${LIMITS[@]}")
ONCE=("${RUN[@]}" --rm --no-healthcheck)

# --- 1. the tiny generation -----------------------------------------------------------------------------
uid=$("${ONCE[@]}" --entrypoint id "$IMG" -u)
[ "$uid" != 0 ] || { echo "the image runs as root"; exit 1; }
mkdir -m 0777 "$WORK/out"
"${ONCE[@]}" -v "$WORK/out:/out" --entrypoint wanfast "$IMG" generate --model tiny --device cpu \
    --prompt "a cat" --size 64x48 --frames 9 --steps 2 --output /out/cat.mp4 --no-progress
"${ONCE[@]}" -v "$WORK/out:/out:ro" --entrypoint python3 "$IMG" -c '
import av
with av.open("/out/cat.mp4") as f:
    sizes = [(fr.width, fr.height) for fr in f.decode(video=0)]
assert sizes == [(64, 48)] * 9, sizes
print("container-test: generate wrote a 64x48 MP4 of 9 frames")'

# --- 2. the service: /health, the HEALTHCHECK, a job and its MP4 -----------------------------------------
mkdir -m 0777 "$WORK/data"
# (no systemd here: podman says it cannot schedule the periodic health check; `healthcheck run` below works)
"${RUN[@]}" -d --name "$NAME" -e WANFAST_API_KEY=ci-key -v "$WORK/data:/data" "$IMG" \
    --model tiny --device cpu >/dev/null 2>"$WORK/start.err" || { cat "$WORK/start.err"; exit 1; }
# the client runs in the service's network namespace (--network none: loopback only, no port on the host)
"${P[@]}" exec -i "$NAME" python3 - <<'EOF' || { "${P[@]}" logs "$NAME" 2>&1 | tail -n 40; exit 1; }
import io, json, time, urllib.error, urllib.request

import av

BASE, KEY = "http://127.0.0.1:8000", {"Authorization": "Bearer ci-key"}


def call(path, body=None, headers=KEY):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data, {**headers, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def until(what, check, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            got = check()
            if got:
                return got
        except (urllib.error.URLError, ConnectionError):  # not listening yet; 503 while the model loads
            pass
        time.sleep(0.5)
    raise SystemExit(f"container-test: {what}: no answer in {seconds} s")


health = until("/health", lambda: json.loads(call("/health", headers={})[2]), 180)
assert health["status"] == "ok", health
try:  # every route but /health needs the key
    call("/v1/videos", {"prompt": "a cat"}, headers={})
    raise SystemExit("container-test: a job was accepted without the API key")
except urllib.error.HTTPError as e:
    assert e.code == 401, e.code
status, _, body = call("/v1/videos", {"prompt": "a cat", "size": "64x48", "frames": 9, "steps": 2})
job = json.loads(body)
assert status == 202, (status, job)
done = until("the job", lambda: (j := json.loads(call(f"/v1/videos/{job['id']}")[2]))["state"]
             in ("succeeded", "failed", "cancelled") and j, 300)
assert done["state"] == "succeeded", done
status, kind, mp4 = call(done["content_url"])
assert status == 200 and kind == "video/mp4", (status, kind)
with av.open(io.BytesIO(mp4)) as f:
    sizes = [(fr.width, fr.height) for fr in f.decode(video=0)]
assert sizes == [(64, 48)] * 9, sizes
print(f"container-test: serve answered /health, ran job {job['id']} and served its MP4 ({len(mp4)} bytes)")
EOF
"${P[@]}" healthcheck run "$NAME" || { echo "the image's HEALTHCHECK fails on a serving container"; exit 1; }
say "HEALTHCHECK: healthy"

# --- 3. a clean stop ------------------------------------------------------------------------------------
"${P[@]}" stop -t 20 "$NAME" >/dev/null 2>"$WORK/stop.err" || { cat "$WORK/stop.err"; exit 1; }
code=$("${P[@]}" inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || { echo "the service exited with $code on SIGTERM"; exit 1; }
[ -s "$WORK/data/jobs.db" ] || { echo "no job database in the /data volume"; exit 1; }
say "stopped cleanly; the job database is in the /data volume"
say "PASSED in $((SECONDS - start)) s"

# Sourced by .ci/containers.sh: a container engine (podman) and the local CPU base image.
#
# No Docker daemon runs on CI's machines and no registry is reachable, so:
#  - podman + runc come from Debian's packages (installed here when missing, as root);
#  - its config and image store live in work/containers/ (ignored by git): nothing system-wide
#    is changed, and images and build layers survive between runs of this script;
#  - the base image is a Debian bookworm made with debootstrap (python3 = 3.11, venv), with the
#    machine's extra CA certificates (an intercepting proxy signs outbound TLS).
# Defines: engine_setup (returns 1 with a logged reason when no engine can be set up; sets
# CB_ULIMITS, the --ulimit flags to repeat whenever a run adds its own --ulimit),
# base_image (prints the tag of the CPU base image, building it once per recipe).

CB_WORK=${CB_WORK:-$PWD/work}/containers  # work/ is ignored by git
CPU_BASE_REPO=localhost/clinbundle-cpu-base

log() { printf '[containers %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

engine_setup() {
    if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null \
        || ! command -v runc >/dev/null; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            log "no podman/runc/debootstrap and no way to install them (needs root and apt-get)"
            return 1
        fi
        log "installing podman, buildah, runc, debootstrap from Debian (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                podman buildah runc debootstrap uidmap fuse-overlayfs >/dev/null \
            || { log "apt-get could not install podman"; return 1; }
    fi
    mkdir -p "$CB_WORK/storage" "$CB_WORK/run" "$CB_WORK/cache" "$CB_WORK/tmp"
    # the defaults (crun, systemd cgroups, unlimited rlimits) fail on this kind of machine
    local nofile nproc
    nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
    [ "$nofile" = unlimited ] || [ "$nofile" -gt 32768 ] && nofile=32768
    [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
    # a `--ulimit` on the command line replaces all of default_ulimits: pass these with it
    CB_ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
    cat >"$CB_WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    cat >"$CB_WORK/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$CB_WORK/storage"
runroot = "$CB_WORK/run"
CONF
    export CONTAINERS_CONF=$CB_WORK/containers.conf
    export CONTAINERS_STORAGE_CONF=$CB_WORK/storage.conf
    export TMPDIR=$CB_WORK/tmp
    log "engine: $(podman --version), runtime runc, ulimits nofile=$nofile nproc=$nproc, store $CB_WORK/storage"
    podman info --format '{{.Store.GraphDriverName}}' >/dev/null \
        || { log "podman info failed"; return 1; }
}

_apt_mirror() {
    local m
    m=$(grep -hs -E '^URIs: +https?://' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -v security | head -n1)
    [ -n "$m" ] || m=$(grep -hs -E '^deb +https?://[^ ]+ +bookworm ' /etc/apt/sources.list \
        | awk '{print $2}' | head -n1)
    echo "${m:-http://deb.debian.org/debian}"
}

base_image() {
    local certs=(/usr/local/share/ca-certificates/*.crt) key mirror rootfs tag
    [ -e "${certs[0]}" ] || certs=()
    # the recipe's key: rebuild only when the recipe or the machine's CA certificates change
    key=$( { echo "bookworm minbase ca-certificates python3 python3-venv v1"; \
        cat "${certs[@]}" /dev/null; } | sha256sum | cut -c1-12)
    tag="$CPU_BASE_REPO:bookworm-py311-$key"
    if podman image exists "$tag"; then
        log "CPU base image $tag is cached"
        echo "$tag"; return 0
    fi
    mirror=$(_apt_mirror)
    rootfs=$CB_WORK/cache/rootfs-$key
    if [ -e "$rootfs.done" ]; then
        log "reusing the debootstrapped root file system $rootfs"
    else
        rm -rf "$rootfs"
        log "debootstrap bookworm (minbase + python3, venv) from $mirror into $rootfs"
        debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv \
            bookworm "$rootfs" "$mirror" >"$CB_WORK/cache/debootstrap.log" 2>&1 \
            || { tail -n 20 "$CB_WORK/cache/debootstrap.log" >&2; return 1; }
        touch "$rootfs.done"
    fi
    if [ ${#certs[@]} -gt 0 ]; then
        log "adding the machine's ${#certs[@]} extra CA certificate(s) to the base image"
        cp "${certs[@]}" "$rootfs/usr/local/share/ca-certificates/"
        env -u TMPDIR chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import -q \
        --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
        --change "ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt" \
        --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
        --change "ENV LANG=C.UTF-8" \
        --change "CMD [\"/bin/bash\"]" \
        - "$tag" >/dev/null
    rm -rf "$rootfs" "$rootfs.done"
    log "built CPU base image $tag"
    echo "$tag"
}

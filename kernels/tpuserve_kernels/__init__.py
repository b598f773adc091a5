"""tpuserve's device kernels: Pallas TPU kernels, checked on the CPU in Pallas' TPU
interpreter and lowered for a TPU without one (see kernels/README.md)."""

import os

# JAX here only ever runs on the CPU: lowering for a TPU needs no TPU backend, and this
# package must never start one (libtpu off a TPU queries the cloud metadata server).
os.environ["JAX_PLATFORMS"] = "cpu"

"""tpuserve's device kernels: Pallas TPU kernels, checked on the CPU in Pallas' TPU
interpreter and lowered for a TPU without one (see kernels/README.md)."""

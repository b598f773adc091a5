"""Lowers the kernels for a TPU on a machine without one, into artifacts the XLA runner can
splice into its step programs.

JAX lowers a Pallas TPU kernel to a `stablehlo.custom_call @tpu_custom_call` whose
`backend_config` carries the Mosaic module; the lowering needs only the target chip's
description, which an abstract mesh of that device kind supplies: no TPU backend starts here
(the package pins JAX to the CPU) and nothing here loads libtpu, which compiles the custom
call later, with the program (on a TPU, or deviceless inside `unshare -n`).
"""

import hashlib
import json

import jax
import jax.numpy as jnp

from tpuserve_kernels.paged_attention import paged_attention

# No Python source locations in the lowered kernel: Mosaic serialises them into the call's
# body, and with them the checkout's path, so the same shape lowered from two checkouts
# gave different bytes (and compile-cache keys).
jax.config.update("jax_traceback_in_locations_limit", 0)

FORMAT = 1
# `jax.Device.device_kind` of a v6e chip.
V6E = "TPU v6 lite"
# The XLA CPU plugin: the kernel through Pallas' HLO interpreter, plain StableHLO (DMAs as
# slices, no custom call), so the runner's splice runs end to end without a TPU.
CPU = "cpu"
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# A cache stored in another dtype than the activations (`--kv-cache-dtype fp8`): the kernel
# copies its pages as they are and widens them in VMEM before the dots.
CACHE_DTYPES = {"float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}


def paged_attention_module(*, tiles, kv_heads, rows, group, head_dim, page_size, pages,
                           table_pages, chunk_pages, dtype, cache_dtype=None, target=V6E):
    """The StableHLO module (text) of one attention call of these shapes, lowered for
    `target` (a TPU device kind, or `cpu`): `main(q, k_cache, v_cache, tables, ctx, qpos)
    -> out`, per chip. The caches are in `cache_dtype` (default: `dtype`)."""
    dt = DTYPES[dtype]
    ct = CACHE_DTYPES[cache_dtype] if cache_dtype else dt
    s = jax.ShapeDtypeStruct
    rg = rows * group
    args = (
        s((tiles, kv_heads, rg, head_dim), dt),
        s((pages, kv_heads, page_size, head_dim), ct),
        s((pages, kv_heads, page_size, head_dim), ct),
        s((tiles, table_pages), jnp.int32),
        s((tiles,), jnp.int32),
        s((tiles, rg, 1), jnp.int32),
    )
    if target == CPU:
        f = jax.jit(lambda *a: paged_attention(*a, chunk_pages=chunk_pages, interpret=True))
        return f.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    f = jax.jit(lambda *a: paged_attention(*a, chunk_pages=chunk_pages))
    device = jax.sharding.AbstractDevice(device_kind=target, num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return f.trace(*args).lower(lowering_platforms=("tpu",)).as_text()


SHAPE_KEYS = ("tiles", "kv_heads", "rows", "group", "head_dim", "page_size", "pages",
              "table_pages", "chunk_pages", "dtype")
# Present only where the cache's dtype differs from the activations'.
OPTIONAL_KEYS = ("cache_dtype",)


def file_name(shape):
    """The artifact's file name for `shape`, the one the runner looks for
    (`AttentionShape::file_name` in crates/runner-xla/src/pallas.rs)."""
    s = shape
    return (f"paged_attention-t{s['tiles']}-h{s['kv_heads']}-r{s['rows']}-g{s['group']}"
            f"-d{s['head_dim']}-p{s['page_size']}-n{s['pages']}-b{s['table_pages']}"
            f"-c{s['chunk_pages']}-{s['dtype']}"
            + (f"-kv{s['cache_dtype']}" if s.get("cache_dtype") else "") + ".json")


def check_shape(shape):
    """Why `shape` cannot be lowered, or None."""
    keys = set(shape) - set(OPTIONAL_KEYS)
    if sorted(keys) != sorted(SHAPE_KEYS):
        return f"shape keys {sorted(shape)}, expected {sorted(SHAPE_KEYS)} (and optionally {OPTIONAL_KEYS})"
    if shape["dtype"] not in DTYPES:
        return f"dtype {shape['dtype']!r} is not one of {sorted(DTYPES)}"
    if "cache_dtype" in shape and shape["cache_dtype"] not in CACHE_DTYPES:
        return f"cache_dtype {shape['cache_dtype']!r} is not one of {sorted(CACHE_DTYPES)}"
    for k in SHAPE_KEYS[:-1]:
        if not isinstance(shape[k], int) or shape[k] <= 0:
            return f"{k} must be a positive integer, got {shape[k]!r}"
    if shape["table_pages"] % shape["chunk_pages"]:
        return "table_pages must be a multiple of chunk_pages"
    return None


def artifact(shape, target=V6E):
    """The versioned artifact for `shape` (paged_attention_module's keywords)."""
    module = paged_attention_module(**shape, target=target)
    return {
        "format": FORMAT,
        "kernel": "paged_attention",
        "jax": jax.__version__,
        "target": target,
        "shape": shape,
        "module_sha256": hashlib.sha256(module.encode()).hexdigest(),
        "module": module,
    }


def write(path, art):
    with open(path, "w") as f:
        json.dump(art, f, indent=1, sort_keys=True)
        f.write("\n")

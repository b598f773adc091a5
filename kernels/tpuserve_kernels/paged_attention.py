"""Paged attention over tpuserve's KV cache as a Pallas TPU kernel.

The cache is the XLA runner's own layout: K and V each `[pages, kv_heads, page_size,
head_dim]` (every layer's blocks stacked along `pages`), so a page of one KV head is one
contiguous `[page_size, head_dim]` tile. Queries come in tiles of `rows` consecutive tokens
of one sequence, as the runner's StableHLO attention takes them; every query head of a KV
group shares the group's pages, so a grid step is (tile, KV head) and its block holds the
tile's `rows × group` query vectors.

Per grid step the kernel walks the tile's context `chunk_pages` pages at a time: it copies
those pages of K and V from HBM into VMEM (the page numbers come from the tile's row of the
block table, prefetched into SMEM; two buffers, so the next chunk's copies run while this one
is scored), scores them against the queries (dots in the activations' dtype, accumulated in
f32), masks keys past each query's position, and folds them into a running max, sum and
output (online softmax).
The scores never leave VMEM: the StableHLO attention writes and reads them in HBM three times.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Finite, so a chunk whose keys are all masked leaves the running state as it was.
_MASKED = -1e30


def _kernel(tables_ref, ctx_ref, q_ref, qpos_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems,
            *, chunk_pages, page_size, scale):
    tile, head = pl.program_id(0), pl.program_id(1)
    chunk = chunk_pages * page_size
    n = ctx_ref[tile]
    chunks = (n + chunk - 1) // chunk
    # The dots take their operands in the activations' dtype (bf16 on the MXU's native path)
    # and accumulate in f32, as the runner's StableHLO attention does.
    q = q_ref[...]  # [rows·group, D]
    qpos = qpos_ref[...]  # [rows·group, 1]: each query row's position
    rg, d = q.shape

    def copies(c, slot):
        """The DMAs of chunk c's pages of K and V into buffer `slot`."""
        out = []
        for i in range(chunk_pages):
            page = tables_ref[tile, c * chunk_pages + i]
            for j, (src, dst) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
                out.append(pltpu.make_async_copy(src.at[page, head], dst.at[slot, i],
                                                 sems.at[j, slot, i]))
        return out

    def fetch(c, slot):
        for cp in copies(c, slot):
            cp.start()

    # Double buffered: chunk c + 1's pages are in flight while chunk c is scored.
    @pl.when(chunks > 0)
    def _():
        fetch(0, 0)

    def body(c, state):
        m, l, acc = state
        slot = c % 2

        @pl.when(c + 1 < chunks)
        def _():
            fetch(c + 1, 1 - slot)

        for cp in copies(c, slot):
            cp.wait()
        k = k_buf[slot].reshape(chunk, d).astype(q.dtype)
        v = v_buf[slot].reshape(chunk, d).astype(q.dtype)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale  # [rg, chunk]
        key = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (rg, chunk), 1)
        s = jnp.where(key <= qpos, s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        p = jnp.where(key <= qpos, p, 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * corr + jax.lax.dot_general(p.astype(q.dtype), v, (((1,), (0,)), ((), ())),
                                               preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((rg, 1), _MASKED, jnp.float32), jnp.zeros((rg, 1), jnp.float32),
            jnp.zeros((rg, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, chunks, body, init)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def paged_attention(q, k_cache, v_cache, tables, ctx, qpos, *, chunk_pages, scale=None):
    """Attention of query tiles over their sequences' pages.

    q: `[tiles, kv_heads, rows·group, head_dim]`: tile t's rows, for KV head h, the `group`
       query heads of h for row 0, then row 1, ...
    k_cache, v_cache: `[pages, kv_heads, page_size, head_dim]`.
    tables: i32 `[tiles, table_pages]`: the pages of each tile's sequence, in order; every
       entry a valid page (padding included), `table_pages` a multiple of `chunk_pages`.
    ctx: i32 `[tiles]`: keys a tile reads, its last row's position + 1 (0: an idle tile).
    qpos: i32 `[tiles, rows·group, 1]`: each query row's position; keys at or before it are
       visible.
    Returns `[tiles, kv_heads, rows·group, head_dim]` in q's dtype.
    """
    tiles, kv_heads, rg, d = q.shape
    _, _, page_size, _ = k_cache.shape
    if tables.shape[1] % chunk_pages:
        raise ValueError(f"table of {tables.shape[1]} pages is not whole chunks of {chunk_pages}")
    if scale is None:
        scale = d ** -0.5
    kernel = functools.partial(_kernel, chunk_pages=chunk_pages, page_size=page_size,
                               scale=scale)
    block = pl.BlockSpec((None, None, rg, d), lambda t, h, *_: (t, h, 0, 0))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(tiles, kv_heads),
            in_specs=[
                block,
                pl.BlockSpec((None, rg, 1), lambda t, h, *_: (t, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=block,
            scratch_shapes=[
                pltpu.VMEM((2, chunk_pages, page_size, d), k_cache.dtype),
                pltpu.VMEM((2, chunk_pages, page_size, d), v_cache.dtype),
                pltpu.SemaphoreType.DMA((2, 2, chunk_pages)),
            ],
        ),
    )(tables, ctx, q, qpos, k_cache, v_cache)

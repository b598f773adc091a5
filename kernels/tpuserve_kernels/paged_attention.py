"""Paged attention over tpuserve's KV cache as a Pallas TPU kernel.

The cache is the XLA runner's own layout: K and V each `[pages, kv_heads, page_size,
head_dim]` (every layer's blocks stacked along `pages`), so a page of one KV head is one
contiguous `[page_size, head_dim]` tile. Queries come in tiles of `rows` consecutive tokens
of one sequence, as the runner's StableHLO attention takes them; every query head of a KV
group shares the group's pages, so a tile's block for one KV head is its `rows × group` query
vectors.

One grid step walks every tile: each tile's context `chunk_pages` pages at a time, copying
those pages of K and V from HBM into VMEM (one copy of K and one of V per page, each with
all of the page's KV heads, which the cache keeps contiguous; the page numbers come from the
tile's row of the block table, prefetched into SMEM), scoring them against the tile's queries
head by head (dots in the activations' dtype, accumulated in f32), masking keys past each
query's position and folding them into a running max, sum and output (online softmax). Two
buffers: the next chunk's copies (this tile's or the next tile's first) run while a chunk is
scored, so the call exposes one copy latency, not one per tile. (The first version, a grid
step per tile and KV head, paid a step's fixed cost and a copy latency per decode row and
head; a grid step per KV head still issued a copy per page and head.)
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
    tiles, kv_heads = q_ref.shape[0], q_ref.shape[1]
    chunk = chunk_pages * page_size

    def chunks_of(t):
        n = ctx_ref[jnp.minimum(t, tiles - 1)]
        return jnp.where(t < tiles, (n + chunk - 1) // chunk, 0)

    def first_from(t):
        """The first tile from t on that reads any page (`tiles` if none)."""
        return jax.lax.while_loop(lambda u: (u < tiles) & (chunks_of(u) == 0),
                                  lambda u: u + 1, t)

    def copies(t, c, slot):
        """The DMAs of tile t's chunk c into buffer `slot`: per page one copy of K and one
        of V, each with every KV head of the page (a page's heads are contiguous)."""
        out = []
        for i in range(chunk_pages):
            page = tables_ref[t, c * chunk_pages + i]
            for j, (src, dst) in enumerate(((k_hbm, k_buf), (v_hbm, v_buf))):
                out.append(pltpu.make_async_copy(src.at[page], dst.at[slot, i],
                                                 sems.at[j, slot, i]))
        return out

    def fetch(t, c, slot):
        for cp in copies(t, c, slot):
            cp.start()

    # One work list: every tile's chunks in order, double buffered across tiles too (the
    # next chunk, of this tile or the next, is in flight while this one is scored), so the
    # kernel pays one exposed copy latency, not one per tile.
    t0 = first_from(0)

    @pl.when(t0 < tiles)
    def _():
        fetch(t0, 0, 0)

    def tile_body(t, it):
        n = chunks_of(t)
        # The dots take their operands in the activations' dtype (bf16 on the MXU's native
        # path) and accumulate in f32, as the runner's StableHLO attention does.
        qs = [q_ref[t, h] for h in range(kv_heads)]  # each [rows·group, D]
        qpos = qpos_ref[t]  # [rows·group, 1]: each query row's position
        rg, d = qs[0].shape
        dt = qs[0].dtype

        def chunk_body(c, state):
            it, heads = state
            slot = it % 2
            last = c + 1 == n
            t_next = jnp.where(last, first_from(t + 1), t)

            @pl.when(t_next < tiles)
            def _():
                fetch(t_next, jnp.where(last, 0, c + 1), 1 - slot)

            for cp in copies(t, c, slot):
                cp.wait()
            key = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (rg, chunk), 1)
            visible = key <= qpos
            out = []
            for h, (m, l, acc) in enumerate(heads):
                k = k_buf[slot, :, h].reshape(chunk, d).astype(dt)
                v = v_buf[slot, :, h].reshape(chunk, d).astype(dt)
                s = jax.lax.dot_general(qs[h], k, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32) * scale
                s = jnp.where(visible, s, _MASKED)
                m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
                p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
                corr = jnp.exp(m - m_new)
                l = l * corr + jnp.sum(p, axis=1, keepdims=True)
                acc = acc * corr + jax.lax.dot_general(
                    p.astype(dt), v, (((1,), (0,)), ((), ())),
                    preferred_element_type=jnp.float32)
                out.append((m_new, l, acc))
            return it + 1, tuple(out)

        fresh = (jnp.full((rg, 1), _MASKED, jnp.float32), jnp.zeros((rg, 1), jnp.float32),
                 jnp.zeros((rg, d), jnp.float32))
        it, heads = jax.lax.fori_loop(0, n, chunk_body, (it, (fresh,) * kv_heads))
        for h, (_, l, acc) in enumerate(heads):
            o_ref[t, h] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)
        return it

    jax.lax.fori_loop(0, tiles, tile_body, jnp.int32(0))


def paged_attention(q, k_cache, v_cache, tables, ctx, qpos, *, chunk_pages, scale=None,
                    interpret=False):
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
    # One grid step holding every tile's queries.
    block = pl.BlockSpec((tiles, kv_heads, rg, d), lambda i, *_: (0, 0, 0, 0))
    return pl.pallas_call(
        kernel,
        interpret=interpret,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(1,),
            in_specs=[
                block,
                pl.BlockSpec((tiles, rg, 1), lambda i, *_: (0, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=block,
            scratch_shapes=[
                pltpu.VMEM((2, chunk_pages, kv_heads, page_size, d), k_cache.dtype),
                pltpu.VMEM((2, chunk_pages, kv_heads, page_size, d), v_cache.dtype),
                pltpu.SemaphoreType.DMA((2, 2, chunk_pages)),
            ],
        ),
    )(tables, ctx, q, qpos, k_cache, v_cache)

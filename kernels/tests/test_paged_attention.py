"""The kernel, run by Pallas' TPU interpreter on the CPU, against attention computed
independently in float64 from the same pages."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"  # never the TPU backend: this machine has none

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from tpuserve_kernels.paged_attention import paged_attention


def reference(q, k, v, tables, ctx, qpos, scale):
    """float64 softmax(q·Kᵀ·scale)·V per query row over keys 0..=its position."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    tiles, kvh, rg, _ = q.shape
    ps = k.shape[2]
    out = np.zeros(q.shape)
    for t in range(tiles):
        n = int(ctx[t])
        pages = [int(tables[t, j // ps]) for j in range(n)]
        for h in range(kvh):
            kk = np.array([k[pages[j], h, j % ps] for j in range(n)])
            vv = np.array([v[pages[j], h, j % ps] for j in range(n)])
            for r in range(rg):
                vis = int(qpos[t, r, 0]) + 1
                if n == 0:
                    continue
                s = kk[:vis] @ q[t, h, r] * scale
                p = np.exp(s - s.max())
                out[t, h, r] = p @ vv[:vis] / p.sum()
    return out


class Case:
    """Random pages, and tiles over sequences: `seqs` lists (context length, query rows at its
    end); each sequence's queries are cut into tiles of `rows` rows (the last tile padded by
    repeating its last row, as the runner pads)."""

    def __init__(self, seqs, *, rows, group, kv_heads, chunk_pages, head_dim=128, page_size=16,
                 table_pages=8, dtype=np.float32, cache_dtype=None, seed=0):
        rng = np.random.default_rng(seed)
        tiles = []
        for n, qn in seqs:
            positions = list(range(n - qn, n))
            for i in range(0, max(qn, 1), rows):
                part = positions[i:i + rows] or [n - 1]
                tiles.append((n if qn else 0, part + [part[-1]] * (rows - len(part))))
        self.pages = len(seqs) * table_pages + 1
        self.tables = np.zeros((len(tiles), table_pages), np.int32)
        order = rng.permutation(self.pages - 1) + 1  # page 0: the scratch page padding points at
        ti = 0
        for si, (n, qn) in enumerate(seqs):
            own = order[si * table_pages:(si + 1) * table_pages]
            used = -(-n // page_size)
            for _ in range(0, max(qn, 1), rows):
                self.tables[ti, :used] = own[:used]
                ti += 1
        rg = rows * group
        self.ctx = np.array([n for n, _ in tiles], np.int32)
        self.qpos = np.array([[[p] for p in pos for _ in range(group)] for _, pos in tiles],
                             np.int32)
        assert self.qpos.shape == (len(tiles), rg, 1)
        shape = (self.pages, kv_heads, page_size, head_dim)
        self.q = rng.standard_normal((len(tiles), kv_heads, rg, head_dim)).astype(dtype)
        self.k = rng.standard_normal(shape).astype(cache_dtype or dtype)
        self.v = rng.standard_normal(shape).astype(cache_dtype or dtype)
        self.chunk_pages = chunk_pages
        self.scale = head_dim ** -0.5

    def run(self, hlo=False):
        """The TPU interpreter's answer; with `hlo`, the kernel lowered to plain HLO (the
        `cpu` artifacts the runner splices on the XLA CPU plugin) run by XLA on the CPU."""
        args = [jnp.asarray(x) for x in (self.q, self.k, self.v, self.tables, self.ctx,
                                         self.qpos)]
        if hlo:
            out = jax.jit(lambda *a: paged_attention(*a, chunk_pages=self.chunk_pages,
                                                     interpret=True))(*args)
        else:
            with pltpu.force_tpu_interpret_mode():
                out = paged_attention(*args, chunk_pages=self.chunk_pages)
        return np.asarray(out.astype(jnp.float32))

    def want(self):
        f = lambda x: np.asarray(jnp.asarray(x).astype(jnp.float32))
        return reference(f(self.q), f(self.k), f(self.v), self.tables, self.ctx, self.qpos,
                         self.scale)


F32 = dict(atol=3e-5, rtol=1e-4)


def test_decode_rows_across_chunks_and_page_boundaries():
    c = Case([(37, 1), (1, 1), (16, 1), (17, 1), (64, 1)], rows=1, group=4, kv_heads=2,
             chunk_pages=2)
    np.testing.assert_allclose(c.run(), c.want(), **F32)


def test_prompt_tiles_see_only_earlier_positions():
    # A whole prompt, and the last 21 tokens of a 50-token sequence whose first 29 are cached
    # (a prefix hit): tiles of 16 rows, the last one padded.
    c = Case([(40, 40), (50, 21)], rows=16, group=2, kv_heads=2, chunk_pages=1)
    np.testing.assert_allclose(c.run(), c.want(), **F32)


def test_mixed_prompt_and_decode_tiles():
    c = Case([(33, 8), (5, 1), (70, 1), (12, 12)], rows=8, group=2, kv_heads=1,
             chunk_pages=2, table_pages=6)
    np.testing.assert_allclose(c.run(), c.want(), **F32)


@pytest.mark.parametrize("group,kv_heads", [(1, 4), (4, 2), (8, 1)])
def test_query_groups_share_their_kv_heads_pages(group, kv_heads):
    # 8 query heads over 1 KV head: Llama 3.1 70B's 64 / 8 heads split over 8 chips.
    c = Case([(45, 3), (20, 1)], rows=4, group=group, kv_heads=kv_heads, chunk_pages=2)
    np.testing.assert_allclose(c.run(), c.want(), **F32)


def test_idle_tiles_read_nothing_and_give_zeros():
    # Idle tiles first, between and last: the next chunk in flight skips them.
    c = Case([(0, 0), (9, 1), (0, 0), (0, 0), (20, 1), (0, 0)], rows=1, group=2, kv_heads=2,
             chunk_pages=1)
    got = c.run()
    for t in (0, 2, 3, 5):
        assert not got[t].any()
    np.testing.assert_allclose(got, c.want(), **F32)


def test_bf16_pages_and_queries():
    c = Case([(60, 16), (30, 1)], rows=16, group=2, kv_heads=2, chunk_pages=2,
             dtype=jnp.bfloat16)
    np.testing.assert_allclose(c.run(), c.want(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cache_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_fp8_pages_widened_to_the_queries_dtype(dtype, cache_dtype):
    """`--kv-cache-dtype fp8`: the pages stay fp8 in HBM and in the copies, and are widened
    to the queries' dtype in VMEM; the reference reads the same fp8 values widened to f64.
    Both lowerings: the TPU interpreter and the plain HLO the runner splices on the CPU."""
    c = Case([(60, 16), (30, 1), (0, 0), (17, 1)], rows=16, group=4, kv_heads=2, chunk_pages=2,
             dtype=dtype, cache_dtype=cache_dtype)
    assert c.k.dtype == cache_dtype
    tol = F32 if dtype == np.float32 else dict(atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(c.run(), c.want(), **tol)
    np.testing.assert_allclose(c.run(hlo=True), c.want(), **tol)


def test_a_table_not_in_whole_chunks_is_refused():
    c = Case([(9, 1)], rows=1, group=1, kv_heads=1, chunk_pages=3)
    with pytest.raises(ValueError, match="whole chunks"):
        c.run()


def test_the_plain_hlo_lowering_computes_the_same():
    """The `cpu` target's lowering (Pallas' HLO interpreter: DMAs become slices, no Python
    callbacks) gives what the TPU interpreter gives: the runner runs it on the XLA CPU
    plugin to check its splice end to end."""
    c = Case([(33, 8), (0, 0), (5, 1), (70, 1), (12, 12)], rows=8, group=2, kv_heads=2,
             chunk_pages=2, table_pages=6)
    np.testing.assert_allclose(c.run(hlo=True), c.want(), **F32)
    np.testing.assert_allclose(c.run(hlo=True), c.run(), atol=1e-6, rtol=1e-6)

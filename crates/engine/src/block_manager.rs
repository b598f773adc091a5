//! The paged KV cache's bookkeeping: which physical blocks are free, who holds each block
//! (reference counts, so sequences can share prompt blocks), and the automatic prefix cache.
//!
//! A full block is identified by a hash chained over (parent block hash, its token ids), so
//! equal hashes mean equal whole prefixes. Freed blocks keep their hash and stay findable until
//! the allocator needs them: the free queue is LRU, blocks without a hash are reused first, and
//! a request's blocks are queued tail-first so that a prefix outlives its suffix.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use tpuserve_runner_api::TokenId;

use crate::request::BlockId;

/// Identity of a full block's whole prefix: 128 bits so that collisions (which would silently
/// serve another prompt's KV) are out of reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(u64, u64);

impl BlockHash {
    pub fn of(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
        let half = |salt: u8| {
            let mut h = DefaultHasher::new();
            salt.hash(&mut h);
            parent.hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        BlockHash(half(0), half(1))
    }

    /// Hashes of every full block of `tokens`, continuing the chain after `known`.
    pub fn extend_chain(known: &mut Vec<BlockHash>, tokens: &[TokenId], block_size: usize) {
        while (known.len() + 1) * block_size <= tokens.len() {
            let start = known.len() * block_size;
            let h = BlockHash::of(known.last().copied(), &tokens[start..start + block_size]);
            known.push(h);
        }
    }
}

/// Cumulative prefix-cache counters, in tokens (as vLLM's `prefix_cache_queries/hits`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheCounters {
    pub queries: u64,
    pub hits: u64,
}

const NIL: u32 = u32::MAX;

/// Doubly linked queue of free blocks over arrays indexed by block id: O(1) push at either end,
/// pop from the front and removal from the middle (a cache hit revives a free block).
#[derive(Debug, Clone)]
struct FreeQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    fn full(n: usize) -> Self {
        let n32 = n as u32;
        FreeQueue {
            prev: (0..n32).map(|i| if i == 0 { NIL } else { i - 1 }).collect(),
            next: (0..n32)
                .map(|i| if i + 1 == n32 { NIL } else { i + 1 })
                .collect(),
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n32 - 1 },
            len: n,
        }
    }

    fn push_back(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.len += 1;
    }

    fn push_front(&mut self, b: u32) {
        self.next[b as usize] = self.head;
        self.prev[b as usize] = NIL;
        match self.head {
            NIL => self.tail = b,
            h => self.prev[h as usize] = b,
        }
        self.head = b;
        self.len += 1;
    }

    fn remove(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let h = self.head;
        if h == NIL {
            return None;
        }
        self.remove(h);
        Some(h)
    }
}

#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// The hash a block is registered under in `cached` (only full, computed blocks).
    hashes: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, BlockId>,
    free: FreeQueue,
    caching: bool,
    counters: PrefixCacheCounters,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block size must be positive");
        assert!(num_blocks < NIL as usize, "too many KV blocks");
        BlockManager {
            block_size,
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            cached: HashMap::new(),
            free: FreeQueue::full(num_blocks),
            caching: enable_prefix_caching,
            counters: PrefixCacheCounters::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks nobody holds (including cached ones that may still be hit).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len
    }

    /// Fraction of blocks held by sequences, 0..1 (vLLM's `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        match self.num_blocks() {
            0 => 0.0,
            n => 1.0 - self.free.len as f64 / n as f64,
        }
    }

    pub fn prefix_caching(&self) -> bool {
        self.caching
    }

    pub fn counters(&self) -> PrefixCacheCounters {
        self.counters
    }

    /// Counts a prefix-cache lookup of `queried` tokens of which `hit` were found.
    pub fn record_lookup(&mut self, queried: usize, hit: usize) {
        self.counters.queries += queried as u64;
        self.counters.hits += hit as u64;
    }

    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.ref_counts[b.0 as usize]
    }

    /// Number of cached full blocks (held or free).
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Takes a reference on the longest run of `hashes` (from the start) found in the cache.
    pub fn acquire_cached(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        if !self.caching {
            return Vec::new();
        }
        let mut out = Vec::new();
        for h in hashes {
            let Some(&b) = self.cached.get(h) else { break };
            if self.ref_counts[b.0 as usize] == 0 {
                self.free.remove(b.0);
            }
            self.ref_counts[b.0 as usize] += 1;
            out.push(b);
        }
        out
    }

    /// `n` fresh blocks, or `None` (and nothing taken) when fewer are free. Taking a free
    /// cached block evicts its hash: its contents are about to be overwritten.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.free.pop_front()?;
            if let Some(h) = self.hashes[b as usize].take() {
                self.cached.remove(&h);
            }
            self.ref_counts[b as usize] = 1;
            out.push(BlockId(b));
        }
        Some(out)
    }

    /// Drops one reference on each block of a sequence's table. Blocks reaching zero are
    /// queued tail-first, so that a prefix outlives its suffix; blocks without cached content
    /// go to the front, to be reused before anything that could still be hit.
    pub fn release(&mut self, table: &[BlockId]) {
        for &b in table.iter().rev() {
            let rc = &mut self.ref_counts[b.0 as usize];
            debug_assert!(*rc > 0, "block {} released more than held", b.0);
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                if self.hashes[b.0 as usize].is_some() {
                    self.free.push_back(b.0);
                } else {
                    self.free.push_front(b.0);
                }
            }
        }
    }

    /// Makes a computed full block findable by `hash`. A block whose content is already cached
    /// under another id stays private (the first copy wins, as in vLLM).
    pub fn register(&mut self, b: BlockId, hash: BlockHash) {
        if !self.caching || self.hashes[b.0 as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(b);
            self.hashes[b.0 as usize] = Some(hash);
        }
    }

    /// Consistency of the free queue, reference counts and cache map (for tests).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut in_free = vec![false; self.num_blocks()];
        let mut cur = self.free.head;
        let mut count = 0;
        while cur != NIL {
            if in_free[cur as usize] {
                return Err(format!("block {cur} twice in the free queue"));
            }
            in_free[cur as usize] = true;
            count += 1;
            cur = self.free.next[cur as usize];
        }
        if count != self.free.len {
            return Err(format!(
                "free queue has {count} blocks, counter says {}",
                self.free.len
            ));
        }
        for (b, (&rc, &free)) in self.ref_counts.iter().zip(&in_free).enumerate() {
            if (rc == 0) != free {
                return Err(format!("block {b}: ref count {rc} but free = {free}"));
            }
        }
        for (h, b) in &self.cached {
            if self.hashes[b.0 as usize] != Some(*h) {
                return Err(format!("cache maps a hash to block {} which lost it", b.0));
            }
        }
        let registered = self.hashes.iter().filter(|h| h.is_some()).count();
        if registered != self.cached.len() {
            return Err("cache map and block hashes disagree".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(tokens: &[TokenId], bs: usize) -> Vec<BlockHash> {
        let mut v = Vec::new();
        BlockHash::extend_chain(&mut v, tokens, bs);
        v
    }

    #[test]
    fn hash_chain_depends_on_the_whole_prefix() {
        let a = hashes(&[1, 2, 3, 4, 5, 6], 2);
        let b = hashes(&[9, 2, 3, 4, 5, 6], 2);
        assert_eq!(a.len(), 3);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_eq!(hashes(&[1, 2, 3, 4, 5], 2), a[..2].to_vec());
    }

    #[test]
    fn allocate_is_all_or_nothing_and_release_returns_blocks() {
        let mut m = BlockManager::new(4, 16, true);
        assert!(m.allocate(5).is_none());
        assert_eq!(m.num_free_blocks(), 4);
        let t = m.allocate(3).unwrap();
        assert_eq!(m.num_free_blocks(), 1);
        assert!((m.usage() - 0.75).abs() < 1e-12);
        m.release(&t);
        assert_eq!(m.num_free_blocks(), 4);
        m.check_invariants().unwrap();
    }

    #[test]
    fn freed_cached_blocks_are_hit_until_evicted_lru() {
        let mut m = BlockManager::new(4, 2, true);
        let hs = hashes(&[1, 2, 3, 4], 2);
        let t = m.allocate(2).unwrap();
        m.register(t[0], hs[0]);
        m.register(t[1], hs[1]);
        m.release(&t);
        assert_eq!(m.num_cached_blocks(), 2);
        // A hit revives the free blocks with a reference each.
        let hit = m.acquire_cached(&hs);
        assert_eq!(hit, t);
        assert_eq!(m.num_free_blocks(), 2);
        m.release(&hit);
        // The two uncached blocks go first, then the suffix block (queued before its prefix).
        let fresh = m.allocate(3).unwrap();
        assert!(!fresh.contains(&t[0]));
        assert_eq!(fresh[2], t[1]);
        assert_eq!(m.acquire_cached(&hs), vec![t[0]]);
        m.check_invariants().unwrap();
    }

    #[test]
    fn shared_blocks_are_ref_counted_and_duplicates_stay_private() {
        let mut m = BlockManager::new(3, 2, true);
        let hs = hashes(&[5, 6], 2);
        let a = m.allocate(1).unwrap();
        m.register(a[0], hs[0]);
        let b = m.acquire_cached(&hs);
        assert_eq!(m.ref_count(a[0]), 2);
        let dup = m.allocate(1).unwrap();
        m.register(dup[0], hs[0]);
        assert_eq!(m.num_cached_blocks(), 1);
        m.release(&a);
        m.release(&b);
        m.release(&dup);
        assert_eq!(m.num_free_blocks(), 3);
        m.check_invariants().unwrap();
    }

    #[test]
    fn caching_off_never_hits() {
        let mut m = BlockManager::new(2, 2, false);
        let hs = hashes(&[1, 2], 2);
        let t = m.allocate(1).unwrap();
        m.register(t[0], hs[0]);
        m.release(&t);
        assert!(m.acquire_cached(&hs).is_empty());
        m.check_invariants().unwrap();
    }
}

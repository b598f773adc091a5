//! The paged KV cache's bookkeeping: which physical blocks are free, who holds each block
//! (reference counts, so sequences can share prompt blocks), and the automatic prefix cache.
//!
//! A full block is identified by a hash chained over (parent block hash, its token ids), so
//! equal hashes mean equal whole prefixes. Freed blocks keep their hash and stay findable until
//! the allocator needs them: the free queue is LRU, blocks without a hash are reused first, and
//! a request's blocks are queued tail-first so that a prefix outlives its suffix.
//!
//! Blocks never written yet stand apart from the queue. Where the cache's memory is committed
//! by the OS on first write (the CPU runner's zeroed pages), a never-written block is taken
//! only while the freed cached blocks number fewer than those in use (and at least an eighth
//! of the cache): past that, the least recently used cached block is reused instead, so the
//! resident cache follows the working set rather than growing with every distinct prompt
//! served. Elsewhere (device memory, allocated whole at start) never-written blocks go first,
//! so that nothing cached is evicted while any block is unused.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use tpuserve_runner_api::TokenId;

use crate::request::BlockId;

/// Identity of a full block's whole prefix: 128 bits so that collisions (which would silently
/// serve another prompt's KV) are out of reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(u64, u64);

impl BlockHash {
    /// 128 bits of `v`: two 64-bit hashes told apart by a leading byte.
    fn of_value(v: impl Hash) -> BlockHash {
        let half = |salt: u8| {
            let mut h = DefaultHasher::new();
            salt.hash(&mut h);
            v.hash(&mut h);
            h.finish()
        };
        BlockHash(half(0), half(1))
    }

    pub fn of(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
        Self::of_value((parent, tokens))
    }

    /// The parent of a chain's first block: none, or the request's `cache_salt`, so that only
    /// requests with the same salt share cached blocks (vLLM salts the first block's hash).
    pub fn root(salt: Option<&str>) -> Option<BlockHash> {
        salt.map(|s| Self::of_value(("cache_salt", s)))
    }

    /// Hashes of every full block of `tokens`, continuing the chain after `known` (whose first
    /// block hangs from `root`).
    pub fn extend_chain(
        known: &mut Vec<BlockHash>,
        root: Option<BlockHash>,
        tokens: &[TokenId],
        block_size: usize,
    ) {
        while (known.len() + 1) * block_size <= tokens.len() {
            let start = known.len() * block_size;
            let parent = known.last().copied().or(root);
            let h = BlockHash::of(parent, &tokens[start..start + block_size]);
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
    fn empty(n: usize) -> Self {
        FreeQueue {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            head: NIL,
            tail: NIL,
            len: 0,
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
    /// Free blocks that were written before: those without a hash in front, then cached ones
    /// in LRU order.
    free: FreeQueue,
    /// Blocks `fresh..` have never been handed out.
    fresh: u32,
    /// Never-written blocks only while the freed cached ones are fewer than those in use.
    committed_on_write: bool,
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
            free: FreeQueue::empty(num_blocks),
            fresh: 0,
            committed_on_write: false,
            caching: enable_prefix_caching,
            counters: PrefixCacheCounters::default(),
        }
    }

    /// For a cache whose memory the OS commits on first write: reuse written blocks before
    /// taking never-written ones, within the limits the module comment gives.
    pub fn committed_on_write(mut self, yes: bool) -> Self {
        self.committed_on_write = yes;
        self
    }

    /// Blocks handed out at least once (what a lazily committed cache holds in memory).
    pub fn num_written_blocks(&self) -> usize {
        self.fresh as usize
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks nobody holds (including cached ones that may still be hit).
    pub fn num_free_blocks(&self) -> usize {
        self.free.len + self.num_blocks() - self.fresh as usize
    }

    /// Fraction of blocks held by sequences, 0..1 (vLLM's `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        match self.num_blocks() {
            0 => 0.0,
            n => 1.0 - self.num_free_blocks() as f64 / n as f64,
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
        if n > self.num_free_blocks() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.take_free()?;
            if let Some(h) = self.hashes[b as usize].take() {
                self.cached.remove(&h);
            }
            self.ref_counts[b as usize] = 1;
            out.push(BlockId(b));
        }
        Some(out)
    }

    /// The next block to hand out: a written block without cached content, else a
    /// never-written one or the least recently used cached one (see the module comment).
    fn take_free(&mut self) -> Option<u32> {
        let head = self.free.head;
        let head_cached = head != NIL && self.hashes[head as usize].is_some();
        let have_fresh = (self.fresh as usize) < self.num_blocks();
        let fresh_first = if !self.committed_on_write {
            true
        } else {
            // Cached blocks sit behind all uncached ones, so with a cached head every block
            // in the queue is cached.
            let in_use = self.num_blocks() - self.num_free_blocks();
            self.free.len < in_use.max(self.num_blocks() / 8)
        };
        if have_fresh && (head == NIL || (head_cached && fresh_first)) {
            self.fresh += 1;
            return Some(self.fresh - 1);
        }
        self.free.pop_front()
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
        let mut seen_cached = false;
        while cur != NIL {
            if in_free[cur as usize] {
                return Err(format!("block {cur} twice in the free queue"));
            }
            in_free[cur as usize] = true;
            let cached = self.hashes[cur as usize].is_some();
            if seen_cached && !cached {
                return Err(format!("uncached block {cur} queued behind a cached one"));
            }
            seen_cached |= cached;
            count += 1;
            cur = self.free.next[cur as usize];
        }
        if count != self.free.len {
            return Err(format!(
                "free queue has {count} blocks, counter says {}",
                self.free.len
            ));
        }
        for (b, (&rc, &queued)) in self.ref_counts.iter().zip(&in_free).enumerate() {
            let never_written = b >= self.fresh as usize;
            if never_written && (rc != 0 || queued || self.hashes[b].is_some()) {
                return Err(format!("never-written block {b} is held, queued or cached"));
            }
            let free = queued || never_written;
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
        BlockHash::extend_chain(&mut v, None, tokens, bs);
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

    /// 200 requests of 10 distinct cached blocks each, 8 at a time, through a cache of 800
    /// blocks: returns the manager and the last request's hashes.
    fn churn(committed_on_write: bool) -> (BlockManager, Vec<BlockHash>) {
        let mut m = BlockManager::new(800, 2, true).committed_on_write(committed_on_write);
        let mut live: std::collections::VecDeque<Vec<BlockId>> = Default::default();
        let mut last = Vec::new();
        for r in 0..200u32 {
            if live.len() == 8 {
                m.release(&live.pop_front().unwrap());
            }
            let tokens: Vec<TokenId> = (0..20).map(|i| r * 100 + i).collect();
            let hs = hashes(&tokens, 2);
            let t = m.allocate(10).unwrap();
            for (&b, &h) in t.iter().zip(&hs) {
                m.register(b, h);
            }
            live.push_back(t);
            last = hs;
            m.check_invariants().unwrap();
        }
        for t in live {
            m.release(&t);
        }
        m.check_invariants().unwrap();
        (m, last)
    }

    #[test]
    fn written_blocks_follow_the_working_set_where_memory_is_committed_on_write() {
        // Device memory: every block is used before anything cached is evicted.
        let (m, _) = churn(false);
        assert_eq!(m.num_written_blocks(), 800);
        assert_eq!(m.num_cached_blocks(), 800);
        // Host pages: at most the 80 blocks in use plus max(80, 800 / 8) cached ones.
        let (mut m, last) = churn(true);
        assert!(
            (100..=180).contains(&m.num_written_blocks()),
            "{} blocks written",
            m.num_written_blocks()
        );
        assert_eq!(m.num_free_blocks(), 800);
        // The most recent prompts stay cached.
        assert_eq!(m.acquire_cached(&last).len(), 10);
        m.check_invariants().unwrap();
        // All 800 can still be handed out at once.
        let all = m.allocate(790).unwrap();
        assert_eq!(all.len(), 790);
        assert_eq!(m.num_written_blocks(), 800);
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

//! Token masks of structured outputs. The engine computes them (llguidance) while the runner
//! runs the forward pass; the runner waits for them only when it is about to sample.

use std::sync::{Arc, Condvar, Mutex};

/// Packed allowed tokens: bit `t % 32` of word `t / 32` set means token `t` may be sampled
/// (the `[rows, ceil(vocab / 32)]` i32 layout vLLM and llguidance use).
pub type TokenBitmask = Arc<[u32]>;

/// The masks of one step, one entry per [`crate::SeqPlan`] (`None`: unconstrained).
#[derive(Default)]
pub struct StepMasks {
    slot: Mutex<Option<Arc<Vec<Option<TokenBitmask>>>>>,
    ready: Condvar,
}

impl std::fmt::Debug for StepMasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ready = self.slot.lock().map(|s| s.is_some()).unwrap_or(false);
        write!(f, "StepMasks {{ ready: {ready} }}")
    }
}

impl StepMasks {
    /// Publishes the masks; later calls are ignored.
    pub fn set(&self, masks: Vec<Option<TokenBitmask>>) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Arc::new(masks));
            self.ready.notify_all();
        }
    }

    /// Blocks until the masks are published.
    pub fn wait(&self) -> Arc<Vec<Option<TokenBitmask>>> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(m) = slot.as_ref() {
                return m.clone();
            }
            slot = self.ready.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A mask set already published (tests and single-threaded callers).
    pub fn ready(masks: Vec<Option<TokenBitmask>>) -> Arc<Self> {
        let m = Arc::new(StepMasks::default());
        m.set(masks);
        m
    }
}

/// Sets the logits of tokens the mask does not allow to -inf.
pub fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = mask.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits >> b & 1 == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_set_bits_only() {
        let mut l = vec![1.0f32; 40];
        let mut mask = vec![0u32; 2];
        mask[0] |= 1 << 3;
        mask[1] |= 1 << (33 - 32);
        apply_mask(&mut l, &mask);
        let kept: Vec<usize> = (0..40).filter(|&i| l[i].is_finite()).collect();
        assert_eq!(kept, vec![3, 33]);
    }

    #[test]
    fn wait_returns_what_another_thread_set() {
        let m = Arc::new(StepMasks::default());
        let m2 = m.clone();
        let t = std::thread::spawn(move || m2.set(vec![None, Some(vec![5u32].into())]));
        let got = m.wait();
        t.join().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].as_deref(), Some(&[5u32][..]));
    }
}

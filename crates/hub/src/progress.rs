//! Download progress in the log: one line every couple of seconds with the total (bytes, %,
//! rate, ETA) and each active file, plus a line per finished file.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn human_rate(bytes_per_s: f64) -> String {
    format!("{}/s", human_bytes(bytes_per_s.max(0.0) as u64))
}

/// One file being downloaded.
pub struct FileProgress {
    pub name: String,
    pub size: u64,
    pub done: AtomicU64,
    pub active: AtomicBool,
    last: AtomicU64,
}

/// Shared counters of one snapshot download.
pub struct Progress {
    pub repo: String,
    pub total: u64,
    pub done: AtomicU64,
    files: Mutex<Vec<Arc<FileProgress>>>,
}

impl Progress {
    pub fn new(repo: &str, total: u64) -> Arc<Progress> {
        Arc::new(Progress {
            repo: repo.to_string(),
            total,
            done: AtomicU64::new(0),
            files: Mutex::new(Vec::new()),
        })
    }

    pub fn file(&self, name: &str, size: u64) -> Arc<FileProgress> {
        let f = Arc::new(FileProgress {
            name: name.to_string(),
            size,
            done: AtomicU64::new(0),
            active: AtomicBool::new(true),
            last: AtomicU64::new(0),
        });
        self.files.lock().unwrap().push(f.clone());
        f
    }

    /// Bytes of `f` now on disk (a resumed prefix counts as done, not as transferred).
    pub fn add(&self, f: &FileProgress, n: u64) {
        f.done.fetch_add(n, Ordering::Relaxed);
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Forgets `n` bytes of `f` (a partial file thrown away).
    pub fn sub(&self, f: &FileProgress, n: u64) {
        f.done
            .fetch_sub(n.min(f.done.load(Ordering::Relaxed)), Ordering::Relaxed);
        self.done
            .fetch_sub(n.min(self.done.load(Ordering::Relaxed)), Ordering::Relaxed);
    }

    fn report(&self, since: Duration, last_total: &mut u64) {
        let done = self.done.load(Ordering::Relaxed);
        let rate = done.saturating_sub(*last_total) as f64 / since.as_secs_f64().max(1e-3);
        *last_total = done;
        let pct = if self.total > 0 {
            100.0 * done as f64 / self.total as f64
        } else {
            100.0
        };
        let eta = if rate > 0.0 {
            format!(
                ", ETA {:.0}s",
                self.total.saturating_sub(done) as f64 / rate
            )
        } else {
            String::new()
        };
        let mut active = Vec::new();
        for f in self.files.lock().unwrap().iter() {
            if !f.active.load(Ordering::Relaxed) {
                continue;
            }
            let d = f.done.load(Ordering::Relaxed);
            let r = d.saturating_sub(f.last.swap(d, Ordering::Relaxed)) as f64
                / since.as_secs_f64().max(1e-3);
            active.push(format!(
                "{} {}/{} {}",
                f.name,
                human_bytes(d),
                human_bytes(f.size),
                human_rate(r)
            ));
        }
        tracing::info!(
            "downloading {}: {} / {} ({pct:.1}%), {}{eta}; {}",
            self.repo,
            human_bytes(done),
            human_bytes(self.total),
            human_rate(rate),
            active.join(", ")
        );
    }
}

/// Logs `p` every `every` until dropped.
pub struct Reporter {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    pub fn start(p: Arc<Progress>, every: Duration) -> Reporter {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hub-progress".into())
            .spawn(move || {
                let mut last_total = p.done.load(Ordering::Relaxed);
                let mut last = Instant::now();
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                    p.report(last.elapsed(), &mut last_total);
                    last = Instant::now();
                }
            })
            .ok();
        Reporter {
            stop: Some(tx),
            thread,
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}

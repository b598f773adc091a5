//! `snapshot_download`: the files tpuserve needs from one repository revision, into the cache.
//!
//! Each blob is written to a partial file named after its owner
//! (`blobs/<etag>.<host>~<pid>~<n>.incomplete`), verified (size; sha256 when the etag is one),
//! and renamed to `blobs/<etag>`; then `snapshots/<commit>/<file>` is pointed at it. Nothing
//! relies on file locks (GCS FUSE ignores them): two processes downloading the same blob each
//! write their own partial file and the second rename replaces identical bytes. A partial file
//! whose owner is gone (same host and the pid is dead, or untouched for `stale_partial_secs`,
//! which also covers `huggingface_hub`'s own `<etag>.incomplete`) is taken over by renaming it,
//! and the download resumes with an HTTP range request.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use crate::cache::{
    cached_snapshot, create_dir_all, free_bytes, is_sha256, snapshot_complete, unique_suffix,
    RepoCache,
};
use crate::client::{Client, Ctx, FileMeta};
use crate::error::{HubError, Result};
use crate::progress::{human_bytes, human_rate, FileProgress, Progress, Reporter};
use crate::HubConfig;

const INDEX: &str = "model.safetensors.index.json";
const MAX_ATTEMPTS: u32 = 6;

/// Top-level files besides weights that loading a model reads.
const METADATA_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Which files of a repository to fetch (weights: the index, or `model.safetensors`, or every
/// top-level `*.safetensors`; never `original/`, `*.pth` or `*.bin`). With an index the shards
/// are added once the index has been read ([`index_shards`]).
pub fn select_files(repo: &str, siblings: &[String]) -> Result<Vec<String>> {
    let top: Vec<&String> = siblings.iter().filter(|s| !s.contains('/')).collect();
    let mut out: Vec<String> = top
        .iter()
        .filter(|s| {
            METADATA_FILES.contains(&s.as_str())
                || (s.starts_with("tokenizer")
                    && !s.ends_with(".bin")
                    && !s.ends_with(".pth")
                    && !s.ends_with(".pt"))
        })
        .map(|s| s.to_string())
        .collect();
    let safetensors: Vec<&String> = top
        .iter()
        .copied()
        .filter(|s| s.ends_with(".safetensors"))
        .collect();
    if top.iter().any(|s| *s == INDEX) {
        out.push(INDEX.to_string());
    } else if top.iter().any(|s| *s == "model.safetensors") {
        out.push("model.safetensors".to_string());
    } else if !safetensors.is_empty() {
        out.extend(safetensors.iter().map(|s| s.to_string()));
    } else {
        return Err(HubError::NoWeights {
            repo: repo.to_string(),
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The shard files a `model.safetensors.index.json` names.
pub fn index_shards(bytes: &[u8]) -> std::result::Result<BTreeSet<String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let idx: Index = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let shards: BTreeSet<String> = idx.weight_map.into_values().collect();
    if let Some(bad) = shards
        .iter()
        .find(|s| s.contains("..") || s.starts_with('/') || s.is_empty())
    {
        return Err(format!("unsafe shard name `{bad}`"));
    }
    Ok(shards)
}

/// Downloads (or finds in the cache) `repo_id` at `revision` and returns the snapshot folder.
pub fn snapshot_download(cfg: &HubConfig, repo_id: &str, revision: &str) -> Result<PathBuf> {
    let repo = RepoCache::new(&cfg.cache_dir, repo_id);
    if cfg.offline {
        return match cached_snapshot(&cfg.cache_dir, repo_id, revision) {
            Some(s) => {
                tracing::info!(
                    "HF_HUB_OFFLINE: using {repo_id} ({revision}) from {}",
                    s.display()
                );
                Ok(s)
            }
            None => Err(HubError::Offline {
                repo: repo_id.to_string(),
                revision: revision.to_string(),
                cache: cfg.cache_dir.clone(),
            }),
        };
    }
    let client = Client::new(cfg)?;
    let info = match with_retries(&format!("{repo_id} repository info"), None, || {
        client.repo_info(repo_id, revision)
    }) {
        Ok(i) => i,
        Err(e) if e.hub_unavailable() => {
            if let Some(s) = cached_snapshot(&cfg.cache_dir, repo_id, revision) {
                tracing::warn!("{e}; using the cached snapshot {}", s.display());
                return Ok(s);
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let commit = info.sha.trim().to_string();
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return Err(HubError::Http {
            url: format!("{}/api/models/{repo_id}", cfg.endpoint),
            status: 200,
            detail: format!(": bad commit id `{commit}`"),
        });
    }
    let siblings: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut files = select_files(repo_id, &siblings)?;
    let snap = repo.snapshot(&commit);
    tracing::info!(
        "{repo_id}: revision {revision} is commit {commit}; cache {}",
        repo.root.display()
    );
    let t0 = Instant::now();
    let mut stats = Stats::default();
    if files.iter().any(|f| f == INDEX) {
        download_files(
            cfg,
            &client,
            &repo,
            repo_id,
            &commit,
            &[INDEX.into()],
            &mut stats,
        )?;
        let p = snap.join(INDEX);
        let bytes = std::fs::read(&p).map_err(|e| HubError::io("reading", &p, e))?;
        let shards = index_shards(&bytes).map_err(|message| HubError::Malformed {
            path: p.clone(),
            what: "safetensors index",
            message,
        })?;
        let known: HashSet<&String> = siblings.iter().collect();
        if let Some(missing) = shards.iter().find(|s| !known.contains(s)) {
            return Err(HubError::EntryNotFound {
                repo: repo_id.to_string(),
                revision: commit.clone(),
                file: missing.clone(),
            });
        }
        files.retain(|f| f != INDEX);
        files.extend(shards);
    }
    download_files(cfg, &client, &repo, repo_id, &commit, &files, &mut stats)?;
    repo.write_ref(revision, &commit)?;
    if !snapshot_complete(&snap) {
        return Err(HubError::Malformed {
            path: snap,
            what: "snapshot",
            message: "no config.json or weights after the download".into(),
        });
    }
    if stats.bytes > 0 {
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            "downloaded {repo_id}: {} files, {} in {secs:.1}s ({}) into {}",
            stats.files,
            human_bytes(stats.bytes),
            human_rate(stats.bytes as f64 / secs.max(1e-3)),
            snap.display()
        );
    } else {
        tracing::info!("{repo_id}: all files already in {}", snap.display());
    }
    Ok(snap)
}

#[derive(Default)]
struct Stats {
    files: usize,
    bytes: u64,
}

/// Runs `f` again after transient errors (network, 5xx, 429), backing off.
fn with_retries<T>(
    what: &str,
    abort: Option<&AtomicBool>,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut attempt = 1;
    loop {
        match f() {
            Err(e) if e.is_transient() && attempt < MAX_ATTEMPTS => {
                if abort.is_some_and(|a| a.load(Ordering::Relaxed)) {
                    return Err(HubError::Aborted);
                }
                let wait = Duration::from_secs(1 << (attempt - 1).min(4));
                tracing::warn!("{what}: {e}; retrying in {}s", wait.as_secs());
                std::thread::sleep(wait);
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// `f` over `items` on up to `workers` threads; the first error stops the others (they check
/// `abort`) and is returned.
fn parallel<T: Send, R: Send>(
    items: Vec<T>,
    workers: usize,
    abort: &AtomicBool,
    f: impl Fn(T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let n = items.len();
    let queue: Mutex<VecDeque<(usize, T)>> = Mutex::new(items.into_iter().enumerate().collect());
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    let first_err: Mutex<Option<HubError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                if abort.load(Ordering::Relaxed) {
                    return;
                }
                let Some((i, item)) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                match f(item) {
                    Ok(r) => results.lock().unwrap()[i] = Some(r),
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        let mut fe = first_err.lock().unwrap();
                        if fe.is_none() || matches!(*fe, Some(HubError::Aborted)) {
                            *fe = Some(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap() {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every item done"))
        .collect())
}

fn download_files(
    cfg: &HubConfig,
    client: &Client,
    repo: &RepoCache,
    repo_id: &str,
    commit: &str,
    files: &[String],
    stats: &mut Stats,
) -> Result<()> {
    let snap = repo.snapshot(commit);
    let todo: Vec<String> = files
        .iter()
        .filter(|f| !snap.join(f).is_file())
        .cloned()
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    let abort = AtomicBool::new(false);
    let metas = parallel(todo, cfg.max_workers, &abort, |f| {
        let m = with_retries(&format!("{repo_id}/{f}"), Some(&abort), || {
            client.file_meta(repo_id, commit, &f)
        })?;
        Ok((f, m))
    })?;
    // One download per blob; files whose blob is already here are only linked.
    let mut by_etag: BTreeMap<String, (FileMeta, Vec<String>)> = BTreeMap::new();
    for (f, m) in metas {
        by_etag
            .entry(m.etag.clone())
            .or_insert_with(|| (m, Vec::new()))
            .1
            .push(f);
    }
    let blobs = repo.blobs();
    create_dir_all(&blobs)?;
    let mut need = Vec::new();
    let mut cached = 0usize;
    for (etag, (meta, names)) in by_etag {
        let have = std::fs::metadata(repo.blob(&etag)).map(|m| m.len()).ok();
        if have == Some(meta.size) {
            for n in &names {
                repo.link_snapshot_file(commit, n, &etag)?;
            }
            cached += names.len();
        } else {
            if let Some(h) = have {
                tracing::warn!(
                    "blob {etag} has {h} bytes, the hub says {}; downloading it again",
                    meta.size
                );
            }
            need.push((meta, names));
        }
    }
    if need.is_empty() {
        return Ok(());
    }
    // Largest first, so the long downloads overlap.
    need.sort_by_key(|(m, _)| std::cmp::Reverse(m.size));
    let total: u64 = need.iter().map(|(m, _)| m.size).sum();
    let resumable: u64 = need
        .iter()
        .map(|(m, _)| largest_partial(&blobs, &m.etag))
        .sum();
    let needed = total.saturating_sub(resumable);
    if let Some(free) = free_bytes(&blobs) {
        if free < needed {
            return Err(HubError::DiskFull {
                dir: blobs,
                needed,
                available: free,
            });
        }
    }
    let nfiles: usize = need.iter().map(|(_, n)| n.len()).sum();
    tracing::info!(
        "downloading {repo_id} ({commit}): {nfiles} files, {}{} into {}",
        human_bytes(total),
        if cached > 0 {
            format!(" ({cached} more already in the cache)")
        } else {
            String::new()
        },
        repo.root.display()
    );
    let progress = Progress::new(repo_id, total);
    let reporter = Reporter::start(
        progress.clone(),
        Duration::from_secs_f64(cfg.progress_every_secs.max(0.1)),
    );
    let abort = AtomicBool::new(false);
    let result = parallel(need, cfg.max_workers, &abort, |(meta, names)| {
        let ctx = Ctx {
            repo: repo_id,
            revision: commit,
            file: Some(&names[0]),
        };
        let fp = progress.file(&names[0], meta.size);
        download_blob(cfg, client, repo, &meta, &ctx, &progress, &fp, &abort)?;
        for n in &names {
            repo.link_snapshot_file(commit, n, &meta.etag)?;
        }
        Ok(names.len())
    });
    drop(reporter);
    let done = result?;
    stats.files += done.iter().sum::<usize>();
    stats.bytes += total;
    Ok(())
}

/// Partial files this process is writing now.
fn active() -> &'static Mutex<HashSet<PathBuf>> {
    static A: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    A.get_or_init(Default::default)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let raw = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "host".into()
    };
    raw.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence / permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// `(host, pid)` of a partial file `<etag>.<host>~<pid>~<n>.incomplete`, `None` for other
/// partials (`huggingface_hub`'s `<etag>.incomplete`).
fn partial_owner(etag: &str, name: &str) -> Option<(String, i32)> {
    let mid = name
        .strip_prefix(etag)?
        .strip_prefix('.')?
        .strip_suffix(".incomplete")?;
    let mut it = mid.split('~');
    let host = it.next()?.to_string();
    let pid = it.next()?.parse().ok()?;
    Some((host, pid))
}

fn partials(blobs: &Path, etag: &str) -> Vec<(PathBuf, String, std::fs::Metadata)> {
    let Ok(rd) = std::fs::read_dir(blobs) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ok = name.ends_with(".incomplete")
                && (name == format!("{etag}.incomplete") || partial_owner(etag, &name).is_some());
            let md = e.metadata().ok()?;
            ok.then_some((e.path(), name, md))
        })
        .collect()
}

fn largest_partial(blobs: &Path, etag: &str) -> u64 {
    partials(blobs, etag)
        .iter()
        .map(|(_, _, m)| m.len())
        .max()
        .unwrap_or(0)
}

/// A partial file for `etag` that this process now owns: an abandoned one taken over by
/// rename (its bytes are resumed), else a new name. Registered as active until released.
fn claim_partial(blobs: &Path, etag: &str, stale_secs: u64, file: &str) -> PathBuf {
    let host = hostname();
    let me = std::process::id() as i32;
    let mut act = active().lock().unwrap();
    let own = blobs.join(format!(
        "{etag}.{host}~{me}~{}.incomplete",
        unique_suffix().replace('-', "_")
    ));
    let mut candidates: Vec<(u64, PathBuf, String)> = partials(blobs, etag)
        .into_iter()
        .filter_map(|(path, name, md)| {
            let idle = md
                .modified()
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            let stale = idle > Duration::from_secs(stale_secs);
            let who = match partial_owner(etag, &name) {
                Some((h, pid)) if h == host && pid == me => {
                    (!act.contains(&path)).then(|| "an earlier run of this process".to_string())
                }
                Some((h, pid)) if h == host => {
                    (!pid_alive(pid)).then(|| format!("process {pid}, which has exited"))
                }
                Some((h, pid)) => {
                    stale.then(|| format!("process {pid} on {h}, idle {}s", idle.as_secs()))
                }
                None => stale.then(|| format!("another program, idle {}s", idle.as_secs())),
            };
            who.map(|w| (md.len(), path, w))
        })
        .collect();
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    for (len, path, who) in candidates {
        if std::fs::rename(&path, &own).is_ok() {
            tracing::info!(
                "{file}: resuming a partial download ({}) left by {who}",
                human_bytes(len)
            );
            act.insert(own.clone());
            return own;
        }
    }
    act.insert(own.clone());
    own
}

fn release_partial(p: &Path) {
    active().lock().unwrap().remove(p);
}

#[allow(clippy::too_many_arguments)]
fn download_blob(
    cfg: &HubConfig,
    client: &Client,
    repo: &RepoCache,
    meta: &FileMeta,
    ctx: &Ctx,
    progress: &Progress,
    fp: &FileProgress,
    abort: &AtomicBool,
) -> Result<()> {
    let file = ctx.file.unwrap_or_default();
    let blobs = repo.blobs();
    let blob = repo.blob(&meta.etag);
    let t0 = Instant::now();
    let mut attempt = 1;
    loop {
        if abort.load(Ordering::Relaxed) {
            return Err(HubError::Aborted);
        }
        let partial = claim_partial(&blobs, &meta.etag, cfg.stale_partial_secs, file);
        let before = fp.done.load(Ordering::Relaxed);
        let r = fetch_into(client, &partial, meta, ctx, progress, fp, abort)
            .and_then(|()| publish(&partial, &blob, meta.size));
        release_partial(&partial);
        match r {
            Ok(()) => break,
            Err(e) if e.is_transient() && attempt < MAX_ATTEMPTS => {
                progress.sub(fp, fp.done.load(Ordering::Relaxed).saturating_sub(before));
                let wait = Duration::from_secs(1 << (attempt - 1).min(4));
                tracing::warn!(
                    "{file}: {e}; retrying in {}s (the partial file is kept)",
                    wait.as_secs()
                );
                std::thread::sleep(wait);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
    fp.active.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        "{file}: {} in {secs:.1}s ({})",
        human_bytes(meta.size),
        human_rate(meta.size as f64 / secs.max(1e-3))
    );
    Ok(())
}

/// Moves a verified partial file to its blob name; another process may have got there first.
fn publish(partial: &Path, blob: &Path, size: u64) -> Result<()> {
    if std::fs::metadata(blob).is_ok_and(|m| m.len() == size) {
        let _ = std::fs::remove_file(partial);
        return Ok(());
    }
    match std::fs::rename(partial, blob) {
        Ok(()) => Ok(()),
        Err(_) if std::fs::metadata(blob).is_ok_and(|m| m.len() == size) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(HubError::Network {
            url: blob.display().to_string(),
            message: "the partial file was taken over by another process".into(),
        }),
        Err(e) => Err(HubError::io("renaming into", blob, e)),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Brings `partial` to the full, verified blob: hashes what is there, asks for the rest with
/// a range request, appends, checks size and sha256.
fn fetch_into(
    client: &Client,
    partial: &Path,
    meta: &FileMeta,
    ctx: &Ctx,
    progress: &Progress,
    fp: &FileProgress,
    abort: &AtomicBool,
) -> Result<()> {
    let file = ctx.file.unwrap_or_default();
    let mut f: File = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(partial)
        .map_err(|e| HubError::io("creating", partial, e))?;
    let io = |action: &'static str| move |e: std::io::Error| HubError::io(action, partial, e);
    let mut have = f.metadata().map_err(io("reading"))?.len();
    if have > meta.size {
        f.set_len(0).map_err(io("truncating"))?;
        have = 0;
    }
    let mut hasher = is_sha256(&meta.etag).then(Sha256::new);
    let mut buf = vec![0u8; 1 << 20];
    if have > 0 {
        if let Some(h) = hasher.as_mut() {
            let mut left = have;
            f.seek(SeekFrom::Start(0)).map_err(io("reading"))?;
            while left > 0 {
                let want = (left as usize).min(buf.len());
                f.read_exact(&mut buf[..want]).map_err(io("reading"))?;
                h.update(&buf[..want]);
                left -= want as u64;
            }
        }
        progress.add(fp, have);
    }
    if have < meta.size {
        let mut resp = match client.get_from(&meta.url, have, ctx) {
            Err(HubError::Http { status: 416, .. }) => {
                f.set_len(0).map_err(io("truncating"))?;
                return Err(HubError::Network {
                    url: meta.url.to_string(),
                    message: "range not satisfiable; restarting the file".into(),
                });
            }
            r => r?,
        };
        if have > 0 {
            let range_start = resp
                .headers()
                .get("Content-Range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if resp.status() != StatusCode::PARTIAL_CONTENT || range_start != Some(have) {
                tracing::warn!("{file}: the server did not resume at byte {have}; starting over");
                f.set_len(0).map_err(io("truncating"))?;
                progress.sub(fp, have);
                have = 0;
                hasher = is_sha256(&meta.etag).then(Sha256::new);
            }
        }
        f.seek(SeekFrom::Start(have)).map_err(io("seeking"))?;
        let mut w = BufWriter::with_capacity(8 << 20, &mut f);
        loop {
            if abort.load(Ordering::Relaxed) {
                w.flush().map_err(io("writing"))?;
                return Err(HubError::Aborted);
            }
            let n = match resp.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    w.flush().map_err(io("writing"))?;
                    return Err(HubError::Network {
                        url: meta.url.to_string(),
                        message: format!("reading `{file}` after {have} bytes: {e}"),
                    });
                }
            };
            if n == 0 {
                break;
            }
            if have + n as u64 > meta.size {
                drop(w);
                let _ = std::fs::remove_file(partial);
                return Err(HubError::Size {
                    file: file.to_string(),
                    expected: meta.size,
                    actual: have + n as u64,
                });
            }
            w.write_all(&buf[..n]).map_err(io("writing"))?;
            if let Some(h) = hasher.as_mut() {
                h.update(&buf[..n]);
            }
            have += n as u64;
            progress.add(fp, n as u64);
        }
        w.flush().map_err(io("writing"))?;
        drop(w);
        if have < meta.size {
            return Err(HubError::Network {
                url: meta.url.to_string(),
                message: format!(
                    "connection closed after {have} of {} bytes of `{file}`",
                    meta.size
                ),
            });
        }
    }
    f.sync_all().map_err(io("syncing"))?;
    if let Some(h) = hasher {
        let actual = hex(&h.finalize());
        if !actual.eq_ignore_ascii_case(&meta.etag) {
            let _ = std::fs::remove_file(partial);
            progress.sub(fp, have);
            return Err(HubError::Checksum {
                file: file.to_string(),
                expected: meta.etag.clone(),
                actual,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn selection_skips_original_and_pth() {
        let sib = s(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "original/consolidated.00.pth",
            "original/params.json",
            "original/tokenizer.model",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "pytorch_model.bin",
        ]);
        let got = select_files("o/r", &sib).unwrap();
        assert_eq!(
            got,
            s(&[
                "config.json",
                "generation_config.json",
                "model.safetensors.index.json",
                "special_tokens_map.json",
                "tokenizer.json",
                "tokenizer_config.json",
            ])
        );
        let got = select_files(
            "o/r",
            &s(&[
                "config.json",
                "model.safetensors",
                "consolidated.safetensors",
            ]),
        )
        .unwrap();
        assert_eq!(got, s(&["config.json", "model.safetensors"]));
        assert!(matches!(
            select_files("o/r", &s(&["config.json", "pytorch_model.bin"])),
            Err(HubError::NoWeights { .. })
        ));
    }

    #[test]
    fn index_shards_are_read_and_checked() {
        let j = br#"{"metadata": {}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors", "c": "m-1.safetensors"}}"#;
        assert_eq!(
            index_shards(j).unwrap().into_iter().collect::<Vec<_>>(),
            s(&["m-1.safetensors", "m-2.safetensors"])
        );
        assert!(index_shards(br#"{"weight_map": {"a": "../x"}}"#).is_err());
    }

    #[test]
    fn partial_names() {
        assert_eq!(
            partial_owner("abc", "abc.node-1~42~7_1.incomplete"),
            Some(("node-1".into(), 42))
        );
        assert_eq!(partial_owner("abc", "abc.incomplete"), None);
        assert_eq!(partial_owner("abc", "abd.h~1~2.incomplete"), None);
    }

    #[test]
    fn abandoned_partials_of_dead_processes_are_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let host = hostname();
        // A pid that is not running: past the default pid_max.
        let dead = d
            .path()
            .join(format!("e1.{host}~{}~0.incomplete", 4_194_304 + 17));
        std::fs::write(&dead, b"12345").unwrap();
        let live = d.path().join(format!("e2.{host}~{}~0.incomplete", 1));
        std::fs::write(&live, b"12").unwrap();
        let p = claim_partial(d.path(), "e1", 3600, "f");
        assert_eq!(std::fs::read(&p).unwrap(), b"12345");
        assert!(!dead.exists());
        release_partial(&p);
        let p2 = claim_partial(d.path(), "e2", 3600, "f");
        assert!(!p2.exists(), "a live process's partial is left alone");
        assert!(live.exists());
        release_partial(&p2);
    }
}

//! Exec sinks: at each flush, a shell command runs with the flushed events written as
//! numbered files into a fresh inbox directory (the Bakula model, without a container
//! engine: the command may itself be `docker run -v $BUCKETLY_INBOX:/inbox IMAGE`).
//!
//! ```text
//!  bucket actor ──submit (never waits)──▶ runner task (one per bucket, runs in order)
//!                                            write <dir>/run-<ms>-<seq>/{inbox/*, output.json}
//!                                            sh -c COMMAND   (timeout → kill the process group)
//!                                            success → remove the run directory
//!                                            failure → keep it; keep at most MAX_KEPT_RUNS
//! ```
//!
//! Runs wait in a queue of [`QUEUE_RUNS`]; a run that finds it full is not executed but
//! kept on disk like a failed one, so a hanging command never blocks the bucket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Runs queued per bucket behind the one running.
pub const QUEUE_RUNS: usize = 4;
/// Directories of failed (or skipped) runs kept per bucket; older ones are removed.
pub const MAX_KEPT_RUNS: usize = 10;
/// Bytes of the command's stderr kept for the log and INFO.
pub const STDERR_TAIL: usize = 2048;

/// One flush's worth of work for the command.
pub(crate) struct Run {
    pub seq: u64,
    /// Number of the first event (events are numbered from 1 over the bucket's life).
    pub first: u64,
    pub events: Vec<Vec<u8>>,
    pub output: Bytes,
}

/// Counters of one bucket's exec sink, for INFO.
#[derive(Debug, Default)]
pub struct ExecStats {
    /// Commands started.
    pub runs: AtomicU64,
    /// Commands that exited non-zero, were killed, or could not start.
    pub failures: AtomicU64,
    /// Commands killed at the timeout.
    pub timeouts: AtomicU64,
    /// Runs not executed because the queue was full (kept on disk).
    pub skipped: AtomicU64,
    /// The last run: status, duration, stderr tail.
    pub last: Mutex<Option<serde_json::Value>>,
}

impl ExecStats {
    /// The counters as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "runs": load(&self.runs),
            "failures": load(&self.failures),
            "timeouts": load(&self.timeouts),
            "skipped": load(&self.skipped),
            "last": self.last.lock().clone(),
        })
    }
}

/// What the runner needs besides the runs.
struct Job {
    bucket: String,
    command: String,
    timeout: Duration,
    dir: PathBuf,
    stats: Arc<ExecStats>,
}

/// A bucket's exec sink, held by its actor.
pub(crate) struct ExecSink {
    tx: mpsc::Sender<Run>,
    job: Arc<Job>,
    runtime: tokio::runtime::Handle,
}

impl ExecSink {
    /// Starts the runner of `bucket` on `runtime`; run directories go under `dir`.
    pub fn start(
        runtime: &tokio::runtime::Handle,
        bucket: &str,
        command: &str,
        timeout: Duration,
        dir: PathBuf,
        stats: Arc<ExecStats>,
    ) -> ExecSink {
        let (tx, rx) = mpsc::channel(QUEUE_RUNS);
        let job = Arc::new(Job {
            bucket: bucket.to_owned(),
            command: command.to_owned(),
            timeout,
            dir,
            stats,
        });
        runtime.spawn(runner(job.clone(), rx));
        ExecSink {
            tx,
            job,
            runtime: runtime.clone(),
        }
    }

    /// Hands a run to the runner, or keeps it on disk unrun if the queue is full.
    pub fn submit(&self, run: Run) {
        match self.tx.try_send(run) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(run) | mpsc::error::TrySendError::Closed(run)) => {
                self.job.stats.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    bucket = %self.job.bucket, seq = run.seq,
                    "exec: {QUEUE_RUNS} runs are already waiting; this run is kept on disk, not executed"
                );
                let job = self.job.clone();
                self.runtime.spawn_blocking(move || {
                    if let Err(e) = write_run(&job, &run).and_then(|d| prune(&job.dir).map(|_| d)) {
                        tracing::warn!(bucket = %job.bucket, "exec: cannot keep a skipped run: {e}");
                    }
                });
            }
        }
    }
}

async fn runner(job: Arc<Job>, mut rx: mpsc::Receiver<Run>) {
    while let Some(run) = rx.recv().await {
        let j = job.clone();
        let written = tokio::task::spawn_blocking(move || write_run(&j, &run).map(|d| (d, run)))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        let (dir, run) = match written {
            Ok(x) => x,
            Err(e) => {
                job.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(bucket = %job.bucket, "exec: cannot write the inbox: {e}");
                continue;
            }
        };
        let outcome = execute(&job, &dir, &run).await;
        let ok = outcome.ok;
        job.stats.runs.fetch_add(1, Ordering::Relaxed);
        if !ok {
            job.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        if outcome.timed_out {
            job.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        let record = json!({
            "seq": run.seq,
            "events": run.events.len(),
            "status": outcome.status,
            "ok": ok,
            "duration_ms": outcome.duration.as_millis() as u64,
            "stderr_tail": outcome.stderr_tail,
            "kept": (!ok).then(|| dir.display().to_string()),
        });
        if ok {
            tracing::info!(bucket = %job.bucket, seq = run.seq, events = run.events.len(),
                duration_ms = outcome.duration.as_millis() as u64, "exec: {}", outcome.status);
        } else {
            tracing::warn!(bucket = %job.bucket, seq = run.seq, events = run.events.len(),
                duration_ms = outcome.duration.as_millis() as u64, kept = %dir.display(),
                "exec: {}; stderr: {}", outcome.status, outcome.stderr_tail.trim_end());
        }
        *job.stats.last.lock() = Some(record);
        let j = job.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let result = if ok {
                std::fs::remove_dir_all(&dir)
            } else {
                prune(&j.dir)
            };
            if let Err(e) = result {
                tracing::warn!(bucket = %j.bucket, "exec: cleaning up {}: {e}", dir.display());
            }
        })
        .await;
    }
}

/// Writes `<dir>/run-<ms>-<seq>/inbox/<number>` per event and `output.json`.
fn write_run(job: &Job, run: &Run) -> std::io::Result<PathBuf> {
    let dir = job.dir.join(format!(
        "run-{:013}-{:010}",
        crate::engine::now_ms(),
        run.seq
    ));
    let inbox = dir.join("inbox");
    std::fs::create_dir_all(&inbox)?;
    for (i, event) in run.events.iter().enumerate() {
        std::fs::write(inbox.join(format!("{:012}", run.first + i as u64)), event)?;
    }
    let mut output = run.output.to_vec();
    output.push(b'\n');
    std::fs::write(dir.join("output.json"), output)?;
    Ok(dir)
}

/// Keeps the newest [`MAX_KEPT_RUNS`] run directories of a bucket.
fn prune(dir: &Path) -> std::io::Result<()> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
        .map(|e| e.path())
        .collect();
    runs.sort();
    let excess = runs.len().saturating_sub(MAX_KEPT_RUNS);
    for old in &runs[..excess] {
        std::fs::remove_dir_all(old)?;
    }
    Ok(())
}

struct Outcome {
    ok: bool,
    timed_out: bool,
    status: String,
    duration: Duration,
    stderr_tail: String,
}

async fn execute(job: &Job, dir: &Path, run: &Run) -> Outcome {
    let started = Instant::now();
    let failed = |status: String| Outcome {
        ok: false,
        timed_out: false,
        status,
        duration: started.elapsed(),
        stderr_tail: String::new(),
    };
    let mut child = match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&job.command)
        .current_dir(dir)
        .env("BUCKETLY_INBOX", dir.join("inbox"))
        .env("BUCKETLY_OUTPUT", dir.join("output.json"))
        .env("BUCKETLY_BUCKET", &job.bucket)
        .env("BUCKETLY_SEQ", run.seq.to_string())
        .env("BUCKETLY_EVENTS", run.events.len().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot start sh: {e}")),
    };
    let stderr = child.stderr.take();
    let tail = tokio::spawn(async move {
        let mut tail = Vec::new();
        if let Some(mut stderr) = stderr {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
        }
        let start = tail.len().saturating_sub(STDERR_TAIL);
        String::from_utf8_lossy(&tail[start..]).into_owned()
    });
    let (status, timed_out) = match tokio::time::timeout(job.timeout, child.wait()).await {
        Ok(Ok(status)) => (Ok(status), false),
        Ok(Err(e)) => (Err(format!("wait failed: {e}")), false),
        Err(_) => {
            kill_group(&child);
            let _ = child.wait().await;
            (
                Err(format!("killed after the timeout of {:?}", job.timeout)),
                true,
            )
        }
    };
    // The whole group is gone or was killed, so stderr reaches its end soon; bound the
    // wait anyway in case a grandchild left the group and keeps the pipe open.
    let stderr_tail = tokio::time::timeout(Duration::from_secs(1), tail)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (ok, status) = match status {
        Ok(s) if s.success() => (true, "exit status 0".to_owned()),
        Ok(s) => (false, describe(s)),
        Err(e) => (false, e),
    };
    Outcome {
        ok,
        timed_out,
        status,
        duration: started.elapsed(),
        stderr_tail,
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended without a status".to_owned(),
    }
}

fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a negative pid signals that process group, which the
        // child leads (process_group(0)); no memory is involved.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

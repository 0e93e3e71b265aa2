//! The bench's output: a progress line while it runs, then a table or one JSON object.

use std::io::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::load::ConnResult;

/// Everything measured, over all connections.
pub struct Summary {
    params: serde_json::Value,
    frames: u64,
    accepted: u64,
    rejected: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Summary {
    /// Merges the connections' results.
    pub fn new(
        params: &serde_json::Value,
        results: Vec<ConnResult>,
        elapsed: Duration,
    ) -> Result<Summary, String> {
        let mut latency =
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
        let mut s = Summary {
            params: params.clone(),
            frames: 0,
            accepted: 0,
            rejected: 0,
            errors: 0,
            first_error: None,
            elapsed,
            latency: Histogram::new(3).map_err(|e| e.to_string())?,
        };
        for r in results {
            s.frames += r.frames;
            s.accepted += r.accepted;
            s.rejected += r.rejected;
            s.errors += r.errors;
            s.first_error = s.first_error.or(r.first_error);
            latency.add(&r.latency).map_err(|e| e.to_string())?;
        }
        s.latency = latency;
        Ok(s)
    }

    fn per_sec(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency at `q` (0..=1) in milliseconds.
    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// The result as JSON: what the compare script reads.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "params": self.params,
            "seconds": self.elapsed.as_secs_f64(),
            "frames": self.frames,
            "events": self.accepted + self.rejected,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "errors": self.errors,
            "first_error": self.first_error,
            "frames_per_sec": self.per_sec(self.frames),
            "events_per_sec": self.per_sec(self.accepted + self.rejected),
            "latency_ms": {
                "p50": self.ms(0.5),
                "p90": self.ms(0.9),
                "p99": self.ms(0.99),
                "p99_9": self.ms(0.999),
                "max": self.latency.max() as f64 / 1000.0,
                "mean": self.latency.mean() / 1000.0,
            },
        })
    }

    pub fn print_json(&self) {
        println!("{}", self.to_json());
    }

    pub fn print_table(&self) {
        let p = &self.params;
        println!(
            "bucket {} ({}{}), {} connections, pipeline {}, {} events/frame, event {} over {} keys",
            p["bucket"],
            p["handler"].as_str().unwrap_or("?"),
            if p["durable"] == true {
                ", durable"
            } else {
                ""
            },
            p["connections"],
            p["pipeline"],
            p["events_per_frame"],
            p["event"],
            p["keys"],
        );
        println!(
            "  {} frames, {} events in {:.2} s",
            self.frames,
            self.accepted + self.rejected,
            self.elapsed.as_secs_f64()
        );
        println!(
            "  throughput: {:.0} events/s, {:.0} frames/s",
            self.per_sec(self.accepted + self.rejected),
            self.per_sec(self.frames)
        );
        println!(
            "  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.latency.max() as f64 / 1000.0
        );
        if self.rejected + self.errors > 0 {
            println!(
                "  {} events rejected, {} requests failed; first: {}",
                self.rejected,
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
    }
}

/// Redraws the progress line on stderr.
pub fn progress(done: u64, total: Option<u64>, duration: Option<Duration>, elapsed: Duration) {
    let fraction = match (total, duration) {
        (Some(t), _) if t > 0 => done as f64 / t as f64,
        (_, Some(d)) => elapsed.as_secs_f64() / d.as_secs_f64().max(1e-9),
        _ => 0.0,
    }
    .clamp(0.0, 1.0);
    const WIDTH: usize = 30;
    let filled = (fraction * WIDTH as f64) as usize;
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r[{}{}] {:>3.0}%  {} frames  {:.0} frames/s ",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled),
        fraction * 100.0,
        done,
        rate
    );
    let _ = err.flush();
}

/// Clears the progress line.
pub fn progress_done() {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r{}\r", " ".repeat(80));
    let _ = err.flush();
}

//! `bucketly handler test`: a handler file run locally, in the same sandbox and with the
//! same limits as in the daemon, over a file of events.

use std::io::BufRead;
use std::path::PathBuf;

use bucketly::script::{FlushInfo, HandlerInstance, HandlerSource, Origin, ScriptLimits};

use crate::out::{print_json, print_line};

/// Arguments of `bucketly handler test`.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// The handler file (NAME.lua).
    file: PathBuf,
    /// Events, one per line (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    events: PathBuf,
    /// Handler config as JSON.
    #[arg(long)]
    config: Option<String>,
    /// Flush once at the end and print the output record (and any ctx.emit).
    #[arg(long)]
    flush: bool,
    /// Flush after every N events and at the end, printing each output (like a bucket
    /// with --threshold N).
    #[arg(long, value_name = "N")]
    flush_every: Option<u64>,
    /// Print the dump at the end.
    #[arg(long)]
    dump: bool,
    /// Print `view ARG` at the end instead of the plain view.
    #[arg(long, value_name = "ARG")]
    view: Option<String>,
}

pub fn run(args: &TestArgs) -> Result<(), String> {
    let source = std::fs::read_to_string(&args.file)
        .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?;
    let name = args
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "handler".into());
    let handler = HandlerSource {
        name: name.clone(),
        source,
        origin: Origin::File(args.file.clone()),
    };
    let config = match &args.config {
        Some(c) => {
            serde_json::from_str(c).map_err(|e| format!("--config is not valid JSON: {e}"))?
        }
        None => serde_json::Value::Null,
    };
    let mut h = HandlerInstance::new(&handler, &config, &ScriptLimits::default())
        .map_err(|e| e.to_string())?;
    let input: Box<dyn BufRead> = if args.events.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(&args.events)
            .map_err(|e| format!("cannot read {}: {e}", args.events.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut flusher = Flusher {
        bucket: name,
        seq: 0,
        pending: 0,
    };
    let (mut rejected, mut total) = (0u64, 0u64);
    for (n, line) in input.split(b'\n').enumerate() {
        let mut event = line.map_err(|e| format!("reading events: {e}"))?;
        if event.last() == Some(&b'\r') {
            event.pop();
        }
        total += 1;
        match h.send(&event) {
            Ok(()) => flusher.pending += 1,
            Err(reason) => {
                rejected += 1;
                eprintln!("line {}: rejected: {reason}", n + 1);
            }
        }
        if args
            .flush_every
            .is_some_and(|k| flusher.pending >= k.max(1))
        {
            flusher.flush(&mut h)?;
        }
    }
    if args.flush || args.flush_every.is_some() {
        flusher.flush(&mut h)?;
    } else if args.dump {
        print_line(&String::from_utf8_lossy(
            &h.dump().map_err(|e| e.to_string())?,
        ));
    } else {
        let view = h
            .view(args.view.as_deref().map(str::as_bytes))
            .map_err(|e| e.to_string())?;
        print_line(&String::from_utf8_lossy(&view));
    }
    if rejected > 0 {
        return Err(format!("{rejected} of {total} events rejected"));
    }
    Ok(())
}

struct Flusher {
    bucket: String,
    seq: u64,
    pending: u64,
}

impl Flusher {
    /// One flush as the daemon does it; nothing is printed for an empty window.
    fn flush(&mut self, h: &mut HandlerInstance) -> Result<(), String> {
        if self.pending == 0 {
            return Ok(());
        }
        let time_ms = bucketly::engine::now_ms();
        let info = FlushInfo {
            bucket: &self.bucket,
            seq: self.seq + 1,
            events: self.pending,
            time_ms,
        };
        let flushed = h.flush(&info).map_err(|e| e.to_string())?;
        if let Some(output) = flushed.output {
            self.seq += 1;
            let output: serde_json::Value = serde_json::from_slice(&output)
                .map_err(|e| format!("the flush output is not JSON: {e}"))?;
            print_json(&serde_json::json!({
                "bucket": self.bucket,
                "events": self.pending,
                "output": output,
                "seq": self.seq,
                "time_ms": time_ms,
            }));
        }
        for emit in flushed.emits {
            print_json(&serde_json::json!({
                "emit": {"bucket": emit.bucket, "event": String::from_utf8_lossy(&emit.event)}
            }));
        }
        self.pending = 0;
        Ok(())
    }
}

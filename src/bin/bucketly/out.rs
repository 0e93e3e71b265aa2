//! Standard output for results. A closed pipe (`bucketly subscribe b | head`) ends the
//! program quietly with status 0, as for other Unix filters, instead of a panic.

use std::io::Write;

/// Writes one line to stdout and flushes it (subscriptions print as outputs arrive).
pub fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let result = writeln!(out, "{line}").and_then(|()| out.flush());
    if let Err(e) = result {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("bucketly: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Writes one JSON value as a line.
pub fn print_json(v: &serde_json::Value) {
    print_line(&v.to_string());
}

//! Bucket options: when a bucket flushes (its schedule) and where the outputs go (its
//! sinks). Given as the JSON object of CREATE, changed with ALTER, stored with the
//! bucket's definition.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Shortest period or timeout, in seconds.
pub const MIN_PERIOD_SECS: f64 = 0.01;
/// Longest period or timeout, in seconds (one week).
pub const MAX_PERIOD_SECS: f64 = 7.0 * 86_400.0;
/// Largest `threshold`.
pub const MAX_THRESHOLD: u64 = 1_000_000;
/// Longest `exec` command line, in bytes.
pub const MAX_EXEC_COMMAND: usize = 4096;
/// Default `exec_timeout`, in seconds.
pub const DEFAULT_EXEC_TIMEOUT_SECS: f64 = 60.0;
/// Longest `exec_timeout`, in seconds.
pub const MAX_EXEC_TIMEOUT_SECS: f64 = 3600.0;

/// The options object, as stored. Every field is optional; `{}` is a bucket that only
/// answers VIEW and DUMP.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketOptions {
    /// Flush every this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<f64>,
    /// Flush once this many events arrived since the last flush…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u64>,
    /// …or this many seconds after the first event not yet flushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Flush (and output) even when no event arrived since the last flush.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub emit_empty: bool,
    /// Send each output, as one event, to this bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
    /// Run this shell command at each flush, with the flushed events as files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<String>,
    /// Seconds an exec command may run before it is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_timeout: Option<f64>,
    /// Acknowledge SEND and DUMP only once they are in the database file, and recover
    /// the state after a restart or a crash. Set at CREATE only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub durable: bool,
}

/// When a bucket flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Never by itself.
    Manual,
    /// At a fixed period.
    Every(Duration),
    /// After `count` events, or `timeout` after the first event not yet flushed.
    Threshold {
        /// Events that make a flush.
        count: u64,
        /// Longest an event waits.
        timeout: Duration,
    },
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

fn seconds(name: &str, v: f64, max: f64) -> Result<Duration, Error> {
    if !(MIN_PERIOD_SECS..=max).contains(&v) {
        return Err(invalid(format!(
            "{name} must be a number of seconds from {MIN_PERIOD_SECS} to {max}, got {v}"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The sinks an options object (of CREATE, or changes of ALTER) asks for, read
/// leniently so permissions can be checked before the options are: the forward target,
/// and whether it sets an exec command.
pub fn requested_sinks(bytes: &[u8]) -> (Option<String>, bool) {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(bytes)
    else {
        return (None, false);
    };
    let forward = map
        .get("forward")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let exec = map.get("exec").is_some_and(|v| !v.is_null());
    (forward, exec)
}

impl BucketOptions {
    /// Parses and checks an options object (empty bytes mean `{}`).
    ///
    /// # Errors
    /// `InvalidArgument` naming the first problem.
    pub fn parse(bytes: &[u8]) -> Result<BucketOptions, Error> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(BucketOptions::default());
        }
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("options are not valid JSON: {e}")))?;
        Self::from_value(value)
    }

    /// Checks an options object given as JSON.
    ///
    /// # Errors
    /// `InvalidArgument` naming the first problem.
    pub fn from_value(value: serde_json::Value) -> Result<BucketOptions, Error> {
        if !value.is_object() {
            return Err(invalid("options must be a JSON object"));
        }
        let options: BucketOptions = serde_json::from_value(value).map_err(|e| {
            let e = e.to_string();
            match e.strip_prefix("unknown field ") {
                Some(rest) => invalid(format!("unknown bucket option {rest}")),
                None => invalid(format!("bad bucket option: {e}")),
            }
        })?;
        options.check()?;
        Ok(options)
    }

    /// These options with `changes` applied: each key given replaces the current value,
    /// and a key set to `null` goes back to its default.
    ///
    /// # Errors
    /// `InvalidArgument` if `changes` is not an object or the result is invalid.
    pub fn altered(&self, changes: &[u8]) -> Result<BucketOptions, Error> {
        let changes: serde_json::Value = serde_json::from_slice(changes)
            .map_err(|e| invalid(format!("options are not valid JSON: {e}")))?;
        let serde_json::Value::Object(changes) = changes else {
            return Err(invalid("options must be a JSON object"));
        };
        if changes.contains_key("durable") {
            return Err(invalid(
                "durable is set at CREATE and cannot be changed: create a new bucket",
            ));
        }
        let mut merged = self.to_map();
        for (key, value) in changes {
            if value.is_null() {
                merged.remove(&key);
            } else {
                merged.insert(key, value);
            }
        }
        Self::from_value(serde_json::Value::Object(merged))
    }

    /// The stored form: only the keys that are set.
    pub fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        }
    }

    fn check(&self) -> Result<(), Error> {
        if let Some(n) = self.threshold {
            if !(1..=MAX_THRESHOLD).contains(&n) {
                return Err(invalid(format!(
                    "threshold must be from 1 to {MAX_THRESHOLD} events, got {n}"
                )));
            }
        }
        match (self.every, self.threshold, self.timeout) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(invalid(
                    "give either every, or threshold with timeout, not both",
                ))
            }
            (None, Some(_), None) => {
                return Err(invalid(
                    "threshold needs a timeout: how long an event may wait for the threshold",
                ))
            }
            (None, None, Some(_)) => return Err(invalid("timeout needs a threshold")),
            _ => {}
        }
        for (name, v) in [("every", self.every), ("timeout", self.timeout)] {
            if let Some(v) = v {
                seconds(name, v, MAX_PERIOD_SECS)?;
            }
        }
        let sinks = self.forward.is_some() || self.exec.is_some();
        if sinks && self.schedule() == Schedule::Manual {
            return Err(invalid(
                "forward and exec need a schedule: every, or threshold with timeout",
            ));
        }
        if let Some(target) = &self.forward {
            super::validate_bucket_name(target).map_err(|e| invalid(format!("forward: {e}")))?;
        }
        if let Some(cmd) = &self.exec {
            if cmd.trim().is_empty() || cmd.len() > MAX_EXEC_COMMAND || cmd.contains('\0') {
                return Err(invalid(format!(
                    "exec must be a command line of 1 to {MAX_EXEC_COMMAND} bytes"
                )));
            }
        }
        match (self.exec_timeout, &self.exec) {
            (Some(_), None) => return Err(invalid("exec_timeout needs exec")),
            (Some(t), Some(_)) => {
                seconds("exec_timeout", t, MAX_EXEC_TIMEOUT_SECS)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// When the bucket flushes. Call on checked options only.
    pub fn schedule(&self) -> Schedule {
        let secs = |v: f64| Duration::from_secs_f64(v.clamp(MIN_PERIOD_SECS, MAX_PERIOD_SECS));
        match (self.every, self.threshold, self.timeout) {
            (Some(every), _, _) => Schedule::Every(secs(every)),
            (None, Some(count), Some(timeout)) => Schedule::Threshold {
                count,
                timeout: secs(timeout),
            },
            _ => Schedule::Manual,
        }
    }

    /// The exec command's time limit.
    pub fn exec_timeout(&self) -> Duration {
        Duration::from_secs_f64(
            self.exec_timeout
                .unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS)
                .clamp(MIN_PERIOD_SECS, MAX_EXEC_TIMEOUT_SECS),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        BucketOptions::parse(json.as_bytes())
            .expect_err(json)
            .to_string()
    }

    #[test]
    fn schedules() {
        assert_eq!(
            BucketOptions::parse(b"").expect("empty").schedule(),
            Schedule::Manual
        );
        let o = BucketOptions::parse(br#"{"every": 0.5}"#).expect("every");
        assert_eq!(o.schedule(), Schedule::Every(Duration::from_millis(500)));
        let o = BucketOptions::parse(br#"{"threshold": 100, "timeout": 2}"#).expect("threshold");
        assert_eq!(
            o.schedule(),
            Schedule::Threshold {
                count: 100,
                timeout: Duration::from_secs(2)
            }
        );
    }

    #[test]
    fn bad_options_are_named() {
        assert!(err(r#"{"evry": 1}"#).contains("unknown bucket option `evry`"));
        assert!(err(r#"{"every": 0}"#).contains("every must be a number of seconds"));
        assert!(err(r#"{"every": "1"}"#).contains("bad bucket option"));
        assert!(err(r#"{"threshold": 10}"#).contains("needs a timeout"));
        assert!(err(r#"{"timeout": 10}"#).contains("needs a threshold"));
        assert!(err(r#"{"every": 1, "threshold": 5, "timeout": 1}"#).contains("not both"));
        assert!(err(r#"{"threshold": 0, "timeout": 1}"#).contains("threshold must be"));
        assert!(err(r#"{"forward": "b"}"#).contains("need a schedule"));
        assert!(err(r#"{"every": 1, "forward": "a b"}"#).contains("forward: invalid bucket name"));
        assert!(err(r#"{"every": 1, "exec": " "}"#).contains("exec must be"));
        assert!(err(r#"{"every": 1, "exec_timeout": 5}"#).contains("needs exec"));
        assert!(err("[1]").contains("must be a JSON object"));
    }

    #[test]
    fn alter_merges_and_null_removes() {
        let o = BucketOptions::parse(br#"{"every": 1, "forward": "b"}"#).expect("valid");
        let o = o.altered(br#"{"every": 5}"#).expect("altered");
        assert_eq!(o.every, Some(5.0));
        assert_eq!(o.forward.as_deref(), Some("b"));
        let o = o.altered(br#"{"forward": null}"#).expect("removed");
        assert_eq!(o.forward, None);
        assert!(o.altered(br#"{"every": null}"#).is_ok());
        assert!(o
            .altered(br#"{"durable": true}"#)
            .expect_err("durable is fixed")
            .to_string()
            .contains("cannot be changed"));
        let o = o
            .altered(br#"{"every": null, "threshold": 3, "timeout": 1}"#)
            .expect("switch");
        assert_eq!(o.to_map().len(), 2);
    }
}

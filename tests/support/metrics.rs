//! Prometheus text exposition parsing for assertions: samples with their
//! labels, sums over label subsets, and polling a value until it settles.
//!
//! It reads only what the tests need (names, labels with escapes, values);
//! comments, timestamps and exemplars are ignored, never validated.

use std::collections::BTreeMap;
use std::time::Duration;

use super::process::wait_until;

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket` ... suffix as exposed).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses the Prometheus text format (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = body.len();
            let mut key = String::new();
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = i + 1;
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        // expect a quoted value
                        let mut value = String::new();
                        if let Some((_, '"')) = chars.next() {
                            while let Some((_, c)) = chars.next() {
                                match c {
                                    '\\' => match chars.next() {
                                        Some((_, 'n')) => value.push('\n'),
                                        Some((_, other)) => value.push(other),
                                        None => {}
                                    },
                                    '"' => break,
                                    c => value.push(c),
                                }
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    c => key.push(c),
                }
            }
            rest = &body[end..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            out.push(Sample {
                name,
                labels,
                value,
            });
        }
    }
    out
}

/// Sum of every sample named `name` whose labels include all of `labels`;
/// `None` when no sample matches.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = parse_metrics(text)
        .into_iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// Polls `read` (a metric read from some `/metrics`) until `pred` holds on
/// its value or `timeout` passes; returns the last value read.
pub fn wait_value(
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
    mut read: impl FnMut() -> f64,
) -> f64 {
    let mut last = f64::NAN;
    wait_until(timeout, || {
        last = read();
        pred(last)
    });
    last
}

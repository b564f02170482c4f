//! What one run of a case measured ([`Sample`]), how slices of a run add
//! up, what they come to (rates and percentiles), and the one-line form the
//! namespace client answers with.
//!
//! Pure values: no I/O.

use std::time::Duration;

use crate::report::short_error;

/// What one run of a case measured; runs (time slices) of one target add up.
#[derive(Debug)]
pub enum Sample {
    /// Bytes moved and the time it took (the slowest stream's).
    Bulk { bytes: u64, secs: f64 },
    /// Transactions, the wall time they took, and each one's latency.
    Txn { secs: f64, lat: Vec<Duration> },
}

impl Sample {
    /// Two slices of one run as one sample.
    pub fn merge(self, other: Sample) -> Sample {
        match (self, other) {
            (Sample::Bulk { bytes, secs }, Sample::Bulk { bytes: b, secs: t }) => Sample::Bulk {
                bytes: bytes + b,
                secs: secs + t,
            },
            (Sample::Txn { secs, mut lat }, Sample::Txn { secs: t, lat: l }) => {
                lat.extend(l);
                Sample::Txn {
                    secs: secs + t,
                    lat,
                }
            }
            (a, _) => a,
        }
    }

    /// Bulk: [MiB/s]. Transactions: [per second, p50 µs, p99 µs].
    pub fn values(mut self) -> Vec<f64> {
        match &mut self {
            Sample::Bulk { bytes, secs } => vec![*bytes as f64 / (1 << 20) as f64 / *secs],
            Sample::Txn { secs, lat } => {
                lat.sort_unstable();
                vec![
                    lat.len() as f64 / *secs,
                    percentile(lat, 0.50),
                    percentile(lat, 0.99),
                ]
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e6
}

/// A sample as one line: `bulk BYTES SECS` or `txn SECS NS,NS,...`.
pub fn sample_line(sample: &Sample) -> String {
    match sample {
        Sample::Bulk { bytes, secs } => format!("bulk {bytes} {secs}"),
        Sample::Txn { secs, lat } => {
            let lat: Vec<String> = lat.iter().map(|d| d.as_nanos().to_string()).collect();
            format!("txn {secs} {}", lat.join(","))
        }
    }
}

/// Reads a [`sample_line`], or the client's `error ...` answer.
pub fn parse_sample(line: &str) -> Result<Sample, String> {
    let bad = || format!("bad answer from the client: {:?}", short_error(line));
    let mut f = line.split_whitespace();
    let (kind, a, b) = (f.next(), f.next(), f.next());
    match (kind, a, b) {
        (Some("error"), _, _) => Err(line.trim_start_matches("error").trim().to_string()),
        (Some("bulk"), Some(bytes), Some(secs)) => Ok(Sample::Bulk {
            bytes: bytes.parse().map_err(|_| bad())?,
            secs: secs.parse().map_err(|_| bad())?,
        }),
        (Some("txn"), Some(secs), Some(lat)) => Ok(Sample::Txn {
            secs: secs.parse().map_err(|_| bad())?,
            lat: lat
                .split(',')
                .map(|n| n.parse().map(Duration::from_nanos))
                .collect::<Result<_, _>>()
                .map_err(|_| bad())?,
        }),
        _ => Err(bad()),
    }
}

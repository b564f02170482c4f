//! Connection-tracking table usage: reads `nf_conntrack_count` and
//! `nf_conntrack_max` from `/proc/sys/net/netfilter` (or a directory given
//! for tests) and returns them as numbers, or `None` when the kernel has no
//! conntrack (module not loaded: the files are absent) or a file does not
//! hold a number. For the `portcullis_conntrack_entries` and
//! `portcullis_conntrack_max` gauges.
//!
//! It only reads: both files are world-readable, so the unprivileged
//! gateway process can call it on every scrape. It never loads the module,
//! writes a sysctl or logs.
//!
//! Every connection the gateway proxies takes two entries (the client's
//! connection, carrying the REDIRECT for transparent clients, and the
//! gateway's own upstream connection); when the table is full the kernel
//! drops new connections. `deploy/sysctl.d/90-portcullis.conf` sizes it.

use std::path::Path;

/// Where the kernel exposes the conntrack sysctls. `nf_conntrack_count` is
/// per network namespace; `nf_conntrack_max` is global.
pub const PROC_DIR: &str = "/proc/sys/net/netfilter";

/// One reading of the connection-tracking table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Entries in the table now (`nf_conntrack_count`).
    pub entries: u64,
    /// Size limit of the table (`nf_conntrack_max`); new connections are
    /// dropped once `entries` reaches it.
    pub max: u64,
}

/// Reads the live table from [`PROC_DIR`]. `None` when conntrack is not
/// loaded or its files cannot be read as numbers.
pub fn read() -> Option<Usage> {
    read_from(Path::new(PROC_DIR))
}

/// Reads `nf_conntrack_count` and `nf_conntrack_max` from `dir`. `None`
/// unless both files exist and each holds one unsigned decimal number
/// (surrounding whitespace, such as the kernel's trailing newline, allowed).
pub fn read_from(dir: &Path) -> Option<Usage> {
    Some(Usage {
        entries: read_number(&dir.join("nf_conntrack_count"))?,
        max: read_number(&dir.join("nf_conntrack_max"))?,
    })
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).expect("write");
        }
        dir
    }

    #[test]
    fn present_files_are_read_as_the_kernel_writes_them() {
        let dir = dir_with(&[
            ("nf_conntrack_count", "1234\n"),
            ("nf_conntrack_max", "262144\n"),
        ]);
        assert_eq!(
            read_from(dir.path()),
            Some(Usage {
                entries: 1234,
                max: 262144
            })
        );
    }

    #[test]
    fn absent_module_is_none() {
        let empty = dir_with(&[]);
        assert_eq!(read_from(empty.path()), None);
        assert_eq!(read_from(&empty.path().join("no-such-dir")), None);
        // One file without the other is not a reading either.
        let half = dir_with(&[("nf_conntrack_count", "1\n")]);
        assert_eq!(read_from(half.path()), None);
    }

    #[test]
    fn garbage_is_none() {
        for bad in ["", "\n", "-1\n", "12 34\n", "0x10\n", "lots\n", "1.5\n"] {
            let dir = dir_with(&[("nf_conntrack_count", bad), ("nf_conntrack_max", "10\n")]);
            assert_eq!(read_from(dir.path()), None, "count {bad:?}");
            let dir = dir_with(&[("nf_conntrack_count", "1\n"), ("nf_conntrack_max", bad)]);
            assert_eq!(read_from(dir.path()), None, "max {bad:?}");
        }
    }

    #[test]
    fn live_read_is_a_reading_or_none() {
        // On a machine with conntrack loaded the live reading is a real
        // one; without it, None. Either way no panic and no privilege.
        if let Some(u) = read() {
            assert!(u.max > 0, "{u:?}");
        }
    }
}

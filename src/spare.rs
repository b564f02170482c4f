//! Spare: one file descriptor held back, so a listener still answers at the process's fd limit.
//!
//! In: an accept that failed with `EMFILE`/`ENFILE`. Out: the spare
//! descriptor let go for the one accept that follows, so the client is
//! answered (a 503, or a close) instead of waiting in the backlog for a
//! slot that never comes; the spare is taken back as soon as a descriptor
//! is free again. This is the classic libev/nginx remedy for a full fd table.

use std::fs::File;
use std::io;

/// A descriptor kept open only to be closed at the fd limit.
pub struct Spare(Option<File>);

impl Default for Spare {
    fn default() -> Self {
        Spare::new()
    }
}

impl Spare {
    /// Takes the spare (`/dev/null`); without one the listener still works.
    pub fn new() -> Spare {
        Spare(File::open("/dev/null").ok())
    }

    /// Whether `err` says the process or system is out of descriptors.
    pub fn is_exhaustion(err: &io::Error) -> bool {
        matches!(
            err.raw_os_error(),
            Some(e) if e == nix::errno::Errno::EMFILE as i32 || e == nix::errno::Errno::ENFILE as i32
        )
    }

    /// Lets go of the spare; false when it was already gone.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes the spare back if it is gone and a descriptor is free.
    pub fn refill(&mut self) {
        if self.0.is_none() {
            self.0 = File::open("/dev/null").ok();
        }
    }
}

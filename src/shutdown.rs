//! Shutdown: the drain state every long-running task watches.
//!
//! In: a signal (or a test) calling [`Shutdown::drain`], later [`Shutdown::cut`].
//! Out: futures that resolve at each stage, and a count of tracked tasks so
//! the process knows when the last tunnel has finished. Stages: accepting →
//! draining (listeners stop, `/readyz` says 503, HTTP connections close after
//! their current request, tunnels go on) → cut (grace elapsed: tunnels end).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

/// Shared shutdown state; clone freely.
#[derive(Clone)]
pub struct Shutdown {
    draining: watch::Sender<bool>,
    cut: watch::Sender<bool>,
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    announced: Arc<AtomicBool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

/// Keeps a task counted until dropped.
pub struct TaskGuard {
    active: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    // An error means the sender is gone: treat as never.
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Shutdown {
    /// Accepting, nothing tracked.
    pub fn new() -> Shutdown {
        Shutdown {
            draining: watch::channel(false).0,
            cut: watch::channel(false).0,
            active: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
            announced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Says the gateway is going away (`/readyz` 503) while it still accepts.
    pub fn announce(&self) {
        self.announced.store(true, Ordering::Release);
    }

    /// Whether stopping was announced (or draining started).
    pub fn is_stopping(&self) -> bool {
        self.announced.load(Ordering::Acquire) || self.is_draining()
    }

    /// Starts draining.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Ends every tunnel now.
    pub fn cut(&self) {
        self.draining.send_replace(true);
        self.cut.send_replace(true);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves when draining starts.
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        wait_true(self.draining.subscribe())
    }

    /// Resolves when tunnels must end.
    pub fn cutting(&self) -> impl Future<Output = ()> + Send + 'static {
        wait_true(self.cut.subscribe())
    }

    /// Counts a task until the guard drops.
    pub fn track(&self) -> TaskGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        TaskGuard {
            active: self.active.clone(),
            idle: self.idle.clone(),
        }
    }

    /// Tasks still running.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves when no task is tracked.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stages_resolve_in_order() {
        let s = Shutdown::new();
        let g = s.track();
        let draining = s.draining();
        let cutting = s.cutting();
        assert!(!s.is_draining());
        s.drain();
        draining.await;
        assert!(s.is_draining());
        let idle = tokio::spawn({
            let s = s.clone();
            async move { s.idle().await }
        });
        s.cut();
        cutting.await;
        drop(g);
        idle.await.unwrap();
        assert_eq!(s.active(), 0);
    }
}

//! Log writer: one thread writes every log line to stderr, in batches.
//!
//! In: whole lines (access lines, tracing events) from any thread. Out: the
//! same bytes on stderr, in the order they were handed over, each line
//! intact. A connection never waits on `write(2)`: a line is appended to a
//! shared buffer under a lock held for a copy, and the writer thread swaps
//! the buffer out and writes it with one system call. An idle writer is
//! woken by the first line, then gathers for [`GATHER`] (or until
//! [`BATCH_BYTES`] wait, or a flush) before it writes: under load that is a
//! wake-up and a write per few milliseconds, not per line. When the sink is
//! slower than the traffic for long (journald throttling, a stalled pipe), at
//! most [`MAX_PENDING`] bytes wait and further lines are dropped and counted
//! ([`dropped`], exported as `portcullis_log_lines_dropped_total`): memory
//! stays bounded and no connection, signal or health probe ever waits on the
//! log. [`flush`] waits (bounded) until everything handed over has been
//! written; `run` calls it before the process exits. Until [`start`] (and in
//! `check`/`explain`) lines go to stderr directly.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

/// Bytes that may wait for the writer before lines are dropped.
pub const MAX_PENDING: usize = 4 << 20;

/// How long the writer gathers lines after the first one of a batch.
pub const GATHER: Duration = Duration::from_millis(5);

/// A batch this large is written without waiting out [`GATHER`].
pub const BATCH_BYTES: usize = 64 << 10;

/// A buffer this large is not kept after a burst.
const KEEP_CAPACITY: usize = 256 << 10;

static GLOBAL: OnceLock<&'static Sink> = OnceLock::new();

/// Starts the stderr writer thread; later calls do nothing.
///
/// # Errors
/// The thread could not be spawned.
pub fn start() -> io::Result<()> {
    if GLOBAL.get().is_some() {
        return Ok(());
    }
    let sink: &'static Sink = Box::leak(Box::new(Sink::new(MAX_PENDING)));
    sink.spawn(Box::new(io::stderr()))?;
    let _ = GLOBAL.set(sink);
    Ok(())
}

/// Hands `line` (one or more whole lines) to the writer, or writes it to
/// stderr when no writer was started.
pub fn write(line: &[u8]) {
    match GLOBAL.get() {
        Some(sink) => sink.push(line),
        None => {
            let _ = io::stderr().lock().write_all(line);
        }
    }
}

/// Waits until every line handed over so far is written, or `limit` passed
/// (a stalled sink must not keep the process from exiting).
pub fn flush(limit: Duration) {
    if let Some(sink) = GLOBAL.get() {
        sink.flush(limit);
    }
}

/// Lines dropped so far because the sink was full.
pub fn dropped() -> u64 {
    GLOBAL.get().map_or(0, |sink| sink.dropped())
}

/// A `tracing_subscriber` writer that sends formatted events through [`write`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeWriter;

/// One event's writer (the fmt layer writes a whole event in one call).
#[derive(Debug)]
pub struct EventWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for MakeWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter
    }
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The shared buffer and its writer thread.
pub struct Sink {
    state: Mutex<State>,
    /// The writer waits here for lines.
    wake: Condvar,
    /// Blocked writers and [`Sink::flush`] wait here for the writer.
    written: Condvar,
    max_pending: usize,
    /// Lines dropped because `max_pending` bytes were waiting.
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The writer is waiting on `wake` for a first line.
    idle: bool,
    /// Callers of [`Sink::flush`] waiting: write without gathering.
    flushing: usize,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
}

impl Sink {
    /// A sink that lets at most `max_pending` bytes wait (a single larger
    /// line is still taken whole).
    pub fn new(max_pending: usize) -> Sink {
        Sink {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            written: Condvar::new(),
            max_pending,
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the thread that writes to `out`.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn spawn(&'static self, out: Box<dyn Write + Send>) -> io::Result<()> {
        std::thread::Builder::new()
            .name("portcullis-log".into())
            .spawn(move || self.run(out))
            .map(drop)
    }

    /// Appends `line`; drops it (and counts it) when the sink is full.
    pub fn push(&self, line: &[u8]) {
        let mut st = self.lock();
        if !st.pending.is_empty() && st.pending.len() + line.len() > self.max_pending {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        let before = st.pending.len();
        st.pending.extend_from_slice(line);
        if st.idle || (before < BATCH_BYTES && st.pending.len() >= BATCH_BYTES) {
            st.idle = false;
            self.wake.notify_one();
        }
    }

    /// Lines dropped so far because the sink was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Waits until every line pushed so far is written, or `limit` passed.
    pub fn flush(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mut st = self.lock();
        st.flushing += 1;
        self.wake.notify_one();
        while !st.pending.is_empty() || st.writing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .written
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.flushing -= 1;
    }

    fn run(&self, mut out: Box<dyn Write + Send>) {
        let mut batch = Vec::new();
        loop {
            {
                let mut st = self.lock();
                while st.pending.is_empty() {
                    st.idle = true;
                    st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
                st.idle = false;
                if st.pending.len() < BATCH_BYTES && st.flushing == 0 {
                    st = self
                        .wake
                        .wait_timeout(st, GATHER)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                std::mem::swap(&mut st.pending, &mut batch);
                st.writing = true;
                // Writers blocked on a full buffer may go on now.
                self.written.notify_all();
            }
            // A closed or failing stderr cannot be reported anywhere: the
            // lines are dropped rather than stopping the proxy.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            if batch.capacity() > KEEP_CAPACITY {
                batch = Vec::new();
            }
            self.lock().writing = false;
            self.written.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Collects what the writer thread writes; optionally slow, and records
    /// the largest batch it was handed.
    #[derive(Clone, Default)]
    struct Capture {
        bytes: Arc<Mutex<Vec<u8>>>,
        largest: Arc<AtomicUsize>,
        writes: Arc<AtomicUsize>,
        delay: Option<Duration>,
    }

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(d) = self.delay {
                std::thread::sleep(d);
            }
            self.largest.fetch_max(buf.len(), Ordering::Relaxed);
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        /// A capture that takes `ms` milliseconds per write.
        fn slow(ms: u64) -> Capture {
            Capture {
                delay: Some(Duration::from_millis(ms)),
                ..Capture::default()
            }
        }
    }

    fn sink(max: usize, out: &Capture) -> &'static Sink {
        let sink: &'static Sink = Box::leak(Box::new(Sink::new(max)));
        sink.spawn(Box::new(out.clone())).unwrap();
        sink
    }

    #[test]
    fn every_line_arrives_whole_and_in_order_per_thread() {
        let out = Capture::default();
        let sink = sink(MAX_PENDING, &out);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        sink.push(
                            format!("thread={t} line={i} {}\n", "x".repeat(i % 90)).as_bytes(),
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        sink.flush(Duration::from_secs(30));
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let mut words = line.split(' ');
            let t: usize = words.next().unwrap()["thread=".len()..].parse().unwrap();
            let i: usize = words.next().unwrap()["line=".len()..].parse().unwrap();
            assert_eq!(i, next[t], "thread {t} out of order or torn: {line:?}");
            assert_eq!(words.next().unwrap_or(""), "x".repeat(i % 90), "{line:?}");
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4], "lines lost");
    }

    #[test]
    fn a_slow_sink_drops_and_counts_lines_instead_of_blocking_or_growing() {
        let out = Capture::slow(2);
        let max = 4096;
        let sink = sink(max, &out);
        let line = [b'y'; 100];
        for _ in 0..2_000 {
            sink.push(&line);
        }
        sink.flush(Duration::from_secs(30));
        let written = out.bytes.lock().unwrap().len();
        assert_eq!(written % line.len(), 0, "lines stay whole");
        let dropped = sink.dropped() as usize;
        assert!(dropped > 0, "a 2 ms sink cannot take 2,000 lines at once");
        assert_eq!(
            written / line.len() + dropped,
            2_000,
            "every line written or counted"
        );
        let largest = out.largest.load(Ordering::Relaxed);
        assert!(
            largest <= max,
            "a batch of {largest} bytes: over the bound {max}"
        );
    }

    #[test]
    fn a_stalled_sink_never_blocks_a_writer_and_flush_gives_up() {
        let out = Capture::slow(60_000);
        let sink = sink(1024, &out);
        for _ in 0..1_000 {
            sink.push(&[b'z'; 100]);
        }
        sink.flush(Duration::from_millis(50));
        assert!(sink.dropped() >= 900, "{}", sink.dropped());
    }

    #[test]
    fn lines_are_written_in_batches() {
        // While one batch is being written (slowly), the rest gather.
        let out = Capture::slow(20);
        let sink = sink(MAX_PENDING, &out);
        for i in 0..1_000 {
            sink.push(format!("line {i}\n").as_bytes());
        }
        sink.flush(Duration::from_secs(30));
        let writes = out.writes.load(Ordering::Relaxed);
        assert!(writes <= 100, "{writes} writes for 1,000 lines");
        let text = String::from_utf8(out.bytes.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1_000);
    }

    #[test]
    fn flush_waits_for_the_batch_being_written() {
        let out = Capture::slow(50);
        let sink = sink(MAX_PENDING, &out);
        sink.push(b"one\n");
        sink.flush(Duration::from_secs(30));
        assert_eq!(out.bytes.lock().unwrap().as_slice(), b"one\n");
    }
}

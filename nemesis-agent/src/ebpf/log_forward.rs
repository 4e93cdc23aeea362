//! Forwards the programs' aya-log records into `tracing` (target `nemesis_ebpf`), from a
//! small thread that drains the ring buffer. Owns that thread; never decides anything.

use std::{
    sync::mpsc::{self, RecvTimeoutError},
    thread::JoinHandle,
    time::Duration,
};

use aya_log::EbpfLogger;

/// How often the ring buffer is drained. The programs log only on rare paths (held
/// connects, dead-man releases), and the buffer holds 128 KiB, so this is plenty.
const DRAIN_INTERVAL: Duration = Duration::from_millis(200);

/// A `log::Log` that re-emits records as `tracing` events.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: "nemesis_ebpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "nemesis_ebpf", "{msg}"),
            log::Level::Info => tracing::info!(target: "nemesis_ebpf", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "nemesis_ebpf", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "nemesis_ebpf", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// The draining thread; stopped (after a last drain) on drop.
#[derive(Debug)]
pub struct LogForwarder {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl LogForwarder {
    /// Attaches to the log ring buffer of the loaded program `program_id`.
    pub fn start(program_id: u32) -> Result<Self, aya_log::Error> {
        let mut logger = EbpfLogger::init_from_id_with_logger(program_id, ToTracing)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("nemesis-ebpf-log".into())
            .spawn(move || {
                loop {
                    logger.flush();
                    match stopped.recv_timeout(DRAIN_INTERVAL) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
                logger.flush();
            })
            .expect("spawning a thread only fails when the process is out of resources");
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for LogForwarder {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

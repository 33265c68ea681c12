//! Cooperative cancellation of one request's work: its client hung up, or its deadline passed.
//! Long stages (adaptation steps, prefill chunks, decode tokens) ask between units of work, so a
//! worker is free within one such unit. A leaf module: every stage may depend on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Why work stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    #[error("the client went away")]
    Cancelled,
    #[error("the request's deadline passed")]
    DeadlineExceeded,
}

#[derive(Debug)]
struct Inner {
    flag: AtomicBool,
    deadline: Option<Instant>,
}

/// A shared stop signal. The default never fires (offline tools, tests).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Option<Arc<Inner>>);

impl Cancel {
    pub fn new(deadline: Option<Instant>) -> Self {
        Self(Some(Arc::new(Inner {
            flag: AtomicBool::new(false),
            deadline,
        })))
    }

    /// Asks the work to stop at its next check.
    pub fn cancel(&self) {
        if let Some(i) = &self.0 {
            i.flag.store(true, Ordering::Relaxed);
        }
    }

    /// `Err` once cancelled or past the deadline; cheap enough to call per token.
    pub fn check(&self) -> Result<(), Stopped> {
        let Some(i) = &self.0 else { return Ok(()) };
        if i.flag.load(Ordering::Relaxed) {
            return Err(Stopped::Cancelled);
        }
        match i.deadline {
            Some(d) if Instant::now() >= d => Err(Stopped::DeadlineExceeded),
            _ => Ok(()),
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.0.as_ref().and_then(|i| i.deadline)
    }

    /// A guard that cancels this signal when dropped (e.g. with a dropped HTTP response).
    pub fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// Cancels its signal when dropped.
#[derive(Debug)]
pub struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_on_cancel_on_drop_and_at_the_deadline() {
        assert_eq!(Cancel::default().check(), Ok(()));
        let c = Cancel::new(None);
        assert_eq!(c.check(), Ok(()));
        drop(c.on_drop());
        assert_eq!(c.check(), Err(Stopped::Cancelled));

        let soon = Cancel::new(Some(Instant::now() + Duration::from_millis(20)));
        assert_eq!(soon.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(soon.check(), Err(Stopped::DeadlineExceeded));
        // A clone shares the signal.
        let a = Cancel::new(None);
        let b = a.clone();
        a.cancel();
        assert_eq!(b.check(), Err(Stopped::Cancelled));
    }
}

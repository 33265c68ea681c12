//! A byte budget that work reserves before it allocates: adaptations reserve their estimated
//! working set (`adapt::memory::footprint`) before training and keep the trained adapter's
//! bytes while their answer runs, so the number of adaptations in flight is bounded by memory
//! rather than found out by the OOM killer. (The decode scheduler bounds KV caches the same
//! way, inside its own loop.)

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Bytes that reservations may hold together.
pub struct MemoryBudget {
    limit: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

/// Why a reservation was not made.
#[derive(Debug, PartialEq)]
pub enum Refused<E> {
    /// More than the whole budget: it would never fit.
    TooLarge { need: usize, limit: usize },
    /// The caller's check stopped the wait.
    Stopped(E),
}

/// Bytes held until dropped.
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

/// How often a waiting reservation rechecks its caller (a client gone, a deadline passed).
const RECHECK: Duration = Duration::from_millis(20);

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: Mutex::new(0),
            freed: Condvar::new(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        *self.lock()
    }

    // The guarded value is a plain counter: a panic elsewhere cannot leave it half-written.
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `bytes`, waiting while other reservations leave too little; `go_on` is asked
    /// every few milliseconds meanwhile and ends the wait with its error.
    pub fn reserve<E>(
        self: &Arc<Self>,
        bytes: usize,
        mut go_on: impl FnMut() -> Result<(), E>,
    ) -> Result<Reservation, Refused<E>> {
        if bytes > self.limit {
            return Err(Refused::TooLarge {
                need: bytes,
                limit: self.limit,
            });
        }
        let mut used = self.lock();
        loop {
            if *used + bytes <= self.limit {
                *used += bytes;
                return Ok(Reservation {
                    budget: self.clone(),
                    bytes,
                });
            }
            drop(used);
            go_on().map_err(Refused::Stopped)?;
            used = self.lock();
            used = match self.freed.wait_timeout(used, RECHECK) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives back all but `bytes` (no-op when it holds no more than that).
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.bytes {
            *self.budget.lock() -= self.bytes - bytes;
            self.bytes = bytes;
            self.budget.freed.notify_all();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_hold_bytes_until_dropped_or_shrunk() {
        let b = MemoryBudget::new(100);
        let mut a = b.reserve(60, || Ok::<(), ()>(())).unwrap();
        assert_eq!(b.used(), 60);
        a.shrink_to(10);
        assert_eq!((a.bytes(), b.used()), (10, 10));
        let c = b.reserve(90, || Ok::<(), ()>(())).unwrap();
        assert_eq!(b.used(), 100);
        drop((a, c));
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn more_than_the_whole_budget_is_refused_at_once() {
        let b = MemoryBudget::new(100);
        let r = b.reserve(101, || -> Result<(), ()> { panic!("no wait expected") });
        assert!(matches!(
            r,
            Err(Refused::TooLarge {
                need: 101,
                limit: 100
            })
        ));
    }

    #[test]
    fn a_reservation_that_does_not_fit_waits_for_room_or_for_its_caller_to_stop() {
        let b = MemoryBudget::new(100);
        let held = b.reserve(80, || Ok::<(), ()>(())).unwrap();
        // Its caller gives up after a few checks: nothing is reserved.
        let mut checks = 0;
        let r = b.reserve(30, || {
            checks += 1;
            if checks < 3 {
                Ok(())
            } else {
                Err("gone")
            }
        });
        assert!(matches!(r, Err(Refused::Stopped("gone"))));
        assert_eq!(b.used(), 80);
        // Room freed by another thread lets a waiting reservation through.
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || {
            b2.reserve(30, || Ok::<(), ()>(()))
                .map(|r| r.bytes())
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.used(), 80, "it waits while 80 of 100 are held");
        drop(held);
        assert_eq!(waiter.join().unwrap(), 30);
        assert_eq!(b.used(), 0);
    }
}

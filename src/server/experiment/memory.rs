//! The in-process store (`[ab] store = "memory"`): exact running sums per arm, and which arm
//! served each recent response. One replica's traffic only; lost on restart.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::stats::{ArmStats, ArmTotals};
use super::{lock, Claim, End, Feedback, Record, Refused};

pub struct MemoryStore {
    stats: Mutex<Vec<ArmStats>>,
    log: Mutex<ResponseLog>,
}

impl MemoryStore {
    pub fn new(arms: usize, feedback_window: usize) -> Self {
        Self {
            stats: Mutex::new((0..arms).map(|_| ArmStats::default()).collect()),
            log: Mutex::new(ResponseLog::new(feedback_window)),
        }
    }

    pub fn record(&self, r: &Record) {
        if let Some(s) = lock(&self.stats).get_mut(r.arm) {
            match r.end {
                End::Cancelled => s.record_cancelled(),
                End::Status(_) => s.record(r.ok(), r.ms, r.loss_delta),
            }
        }
        if r.ok() {
            lock(&self.log).remember(r.id, r.arm);
        }
    }

    pub fn claim(&self, id: u128, f: &Feedback) -> Claim {
        let arm = lock(&self.log).claim(id)?;
        if let Some(s) = lock(&self.stats).get_mut(arm) {
            s.record_feedback(f.correct, f.rating);
        }
        Ok(arm)
    }

    pub fn totals(&self) -> Vec<ArmTotals> {
        lock(&self.stats).iter().map(ArmStats::totals).collect()
    }
}

/// Which arm served each of the last `cap` in-experiment responses, oldest evicted first, so
/// memory stays bounded whatever the traffic. Ids are the uuid inside `chatcmpl-<uuid>`.
#[derive(Debug)]
struct ResponseLog {
    cap: usize,
    order: VecDeque<u128>,
    served: HashMap<u128, Served>,
}

#[derive(Debug, Clone, Copy)]
struct Served {
    arm: usize,
    /// Kept after feedback so a second verdict is refused rather than counted twice.
    rated: bool,
}

impl ResponseLog {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            order: VecDeque::new(),
            served: HashMap::new(),
        }
    }

    fn remember(&mut self, id: u128, arm: usize) {
        if self.cap == 0 || self.served.contains_key(&id) {
            return;
        }
        self.served.insert(id, Served { arm, rated: false });
        self.order.push_back(id);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.served.remove(&old);
            }
        }
    }

    /// Marks `id` as rated and returns its arm.
    fn claim(&mut self, id: u128) -> Result<usize, Refused> {
        let s = self.served.get_mut(&id).ok_or(Refused::Unknown)?;
        if s.rated {
            return Err(Refused::Duplicate);
        }
        s.rated = true;
        Ok(s.arm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_bounded_and_refuses_duplicates() {
        let mut log = ResponseLog::new(3);
        for id in 0..10u128 {
            log.remember(id, (id % 2) as usize);
        }
        assert_eq!(log.served.len(), 3);
        assert_eq!(log.order.len(), 3);
        assert_eq!(log.claim(2), Err(Refused::Unknown));
        assert_eq!(log.claim(9), Ok(1));
        assert_eq!(log.claim(9), Err(Refused::Duplicate));
        assert_eq!(log.claim(8), Ok(0));
        // A rated entry still ages out.
        for id in 10..13u128 {
            log.remember(id, 0);
        }
        assert_eq!(log.claim(9), Err(Refused::Unknown));
    }

    #[test]
    fn feedback_counts_once_for_the_arm_that_served() {
        let store = MemoryStore::new(2, 10);
        use axum::http::StatusCode;
        let served = |id, arm, end| Record {
            id,
            arm,
            end,
            ms: 5.0,
            loss_delta: None,
        };
        store.record(&served(1, 1, End::Status(StatusCode::OK)));
        store.record(&served(2, 0, End::Status(StatusCode::TOO_MANY_REQUESTS)));
        store.record(&served(3, 0, End::Cancelled));
        let yes = Feedback {
            correct: Some(true),
            rating: Some(4.0),
        };
        assert_eq!(store.claim(1, &yes), Ok(1));
        assert_eq!(store.claim(1, &yes), Err(Refused::Duplicate));
        // Failed and cancelled responses take no feedback.
        assert_eq!(store.claim(2, &yes), Err(Refused::Unknown));
        assert_eq!(store.claim(3, &yes), Err(Refused::Unknown));
        let t = store.totals();
        assert_eq!((t[0].requests, t[0].errors, t[0].cancelled), (2, 1, 1));
        assert_eq!((t[1].requests, t[1].feedback, t[1].correct), (1, 1, 1));
        assert_eq!(t[1].rating.mean(), Some(4.0));
    }
}

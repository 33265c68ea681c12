//! Offline evaluation: arms, scoring, statistics, report.

pub mod plot;
pub mod score;
pub mod stats;

//! Training the retrieval gate, from eval records: [`labels`] gives each question answered by
//! two arms (without and with retrieval, or without and with adaptation) its MMA-RAG class,
//! [`sweep`] trains a probe per layer, pass, position and kind and picks one on validation,
//! [`report`] writes its tables and charts. The probe itself (and its training loop) is the
//! gate's own (`crate::gate::probe`).

pub mod labels;
pub mod report;
pub mod sweep;

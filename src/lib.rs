//! ttarag: a retrieval-augmented inference server that can adapt the model to the retrieved
//! text at test time. Stages, in the order a request meets them: `server` (HTTP) -> `engine`
//! (queue and workers) -> `retrieval` -> `generate` over `model`.

pub mod adapt;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod engine;
#[cfg(feature = "lab")]
pub mod eval;
pub mod file_stamp;
pub mod gate;
pub mod generate;
pub mod model;
pub mod numeric;
pub mod params;
pub mod prompt;
pub mod retrieval;
pub mod sentences;
pub mod server;
pub mod stable_hash;

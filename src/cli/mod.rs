//! The `ttarag` command line: `serve`, `index`, `ask`, `model`, and in the lab build (feature
//! `lab`, on by default) `bench`, `eval` and `gate`.

#[cfg(feature = "lab")]
mod adapt;
mod ask;
#[cfg(feature = "lab")]
mod bench;
#[cfg(feature = "lab")]
mod bench_kernels;
#[cfg(feature = "lab")]
mod bench_load;
#[cfg(feature = "lab")]
mod bench_query;
#[cfg(feature = "lab")]
mod eval;
#[cfg(feature = "lab")]
mod gate;
mod index;
mod serve;
#[cfg(feature = "lab")]
mod usage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::gate::card::{Decides, LoadedGate};
use crate::model::fingerprint::WeightsDigest;
use crate::model::Model;
use crate::retrieval::Collections;

/// Retrieval-augmented inference server with test-time adaptation.
#[derive(Debug, Parser)]
#[command(name = "ttarag", version, about)]
pub struct Cli {
    /// Configuration file (TOML); keys it omits keep the built-in defaults. Without this flag,
    /// configs/default.toml is read when present in the working directory.
    #[arg(long, global = true, env = "TTARAG_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model: a .gguf file or a Hugging Face folder. Overrides model.path.
    #[arg(long, global = true, env = "TTARAG_MODEL")]
    pub model: Option<PathBuf>,
    /// Folder holding the collections. Overrides retrieval.index_dir.
    #[arg(long, global = true, env = "TTARAG_INDEX_DIR")]
    pub index_dir: Option<PathBuf>,
    /// Compute device: cpu, cuda or cuda:N. Overrides model.device.
    #[arg(long, global = true, env = "TTARAG_DEVICE")]
    pub device: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the OpenAI-compatible HTTP server.
    Serve(serve::ServeArgs),
    /// Build, list and delete retrieval collections.
    #[command(subcommand)]
    Index(index::IndexCmd),
    /// Answer one question in the terminal, showing the passages used.
    Ask(ask::AskArgs),
    /// Measure prefill and decode speed, time to first token and peak memory.
    #[cfg(feature = "lab")]
    Bench(bench::BenchArgs),
    /// Compare RAG arms (closed book, static, test-time adaptation) on a QA set.
    #[cfg(feature = "lab")]
    Eval(eval::EvalArgs),
    /// The retrieval gate: train a probe on the model's hidden states from eval records.
    #[cfg(feature = "lab")]
    #[command(subcommand)]
    Gate(gate::GateCmd),
    /// Model utilities.
    #[command(subcommand)]
    Model(ModelCmd),
}

#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Write the configured model as a Hugging Face folder (config.json, tokenizer.json,
    /// model.safetensors), dequantized to f32.
    ExportHf {
        /// Destination folder.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Keeps freed heap memory for reuse instead of handing it back to the OS at once. Each
/// adaptation step allocates and frees the same large buffers (gradients, activations; a
/// weight copy's worth in scope "full"); returning them every time cost page faults and TLB
/// shootdowns: full-scope adaptation 1.6 -> 1.2 s (`ttarag bench --tta 10`, 2 cores). Blocks
/// up to 32 MB (glibc's ceiling) come from the heap, which is never trimmed: a full-scope
/// request frees ~2 GB at once, and whether glibc handed that back depended on which block
/// happened to lie at the heap's top (one change of allocation order made every request fault
/// it in again: optimizer 0.2 -> 2.4 s). The resident size stays at the peak of adaptation. One
/// arena for all threads: the server's workers otherwise each get an arena of 64 MB heaps
/// that glibc hands back as they empty, and full scope in `ttarag serve` took 1.6-1.9 s a
/// request instead of 0.9-1.1 s (optimizer 0.7 s -> 0.2 s). Small blocks come from per-thread
/// caches either way, so the shared arena's lock is rarely taken.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes glibc's thresholds; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    tune_allocator();
    init_tracing();
    let local = Path::new("configs/default.toml");
    let mut cfg = match &cli.config {
        Some(p) => Config::from_file(p)?,
        None if local.exists() => Config::from_file(local)?,
        None => Config::default(),
    };
    if let Some(m) = &cli.model {
        cfg.model.path = m.clone();
    }
    if let Some(d) = &cli.index_dir {
        cfg.retrieval.index_dir = d.clone();
    }
    if let Some(d) = &cli.device {
        cfg.model.device = d.clone();
    }
    // candle sizes its CPU thread pools from this variable and, when it is unset, counts the
    // cores again by reading /proc/cpuinfo on every matmul (4% of an adaptation's time): set
    // it once, before any tensor work.
    let threads = match cfg.model.threads {
        0 => candle_core::utils::get_num_threads(),
        n => n,
    };
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    match cli.command {
        Command::Serve(a) => serve::run(cfg, a),
        Command::Index(c) => index::run(cfg, c),
        Command::Ask(a) => ask::run(cfg, a),
        #[cfg(feature = "lab")]
        Command::Bench(a) => bench::run(cfg, a),
        #[cfg(feature = "lab")]
        Command::Eval(a) => eval::run(cfg, a),
        #[cfg(feature = "lab")]
        Command::Gate(c) => gate::run(cfg, c),
        Command::Model(ModelCmd::ExportHf { out }) => {
            let (device, dtype) = device_and_dtype(&cfg)?;
            let parts = crate::model::load_parts(&cfg.model.path, &device, dtype)
                .map_err(|e| model_error(&cfg.model.path, e))?;
            crate::model::export_hf_folder(&parts, &out)?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parses `model.device` and `model.dtype`.
pub fn device_and_dtype(cfg: &Config) -> anyhow::Result<(Device, DType)> {
    let device = match cfg.model.device.as_str() {
        "cpu" => Device::Cpu,
        d if d == "cuda" || d.starts_with("cuda:") => {
            let n: usize = d
                .strip_prefix("cuda:")
                .map(|n| n.parse())
                .transpose()
                .with_context(|| format!("model.device `{d}`: bad GPU index"))?
                .unwrap_or(0);
            Device::new_cuda(n).with_context(|| {
                format!("model.device `{d}`: CUDA unavailable (build with --features cuda)")
            })?
        }
        d => anyhow::bail!("model.device `{d}` is not one of cpu, cuda, cuda:N"),
    };
    // Before any buffer is made: a buffer keeps the tracking it was made with.
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = &device {
        let on = crate::model::cuda::events::set_tracking(dev, cfg.model.cuda_event_tracking);
        if on != cfg.model.cuda_event_tracking {
            tracing::warn!("CUDA event tracking stays on: the context has streams of its own");
        }
    }
    let dtype = match cfg.model.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        d => anyhow::bail!("model.dtype `{d}` is not one of f32, bf16, f16"),
    };
    Ok((device, dtype))
}

fn model_error(path: &Path, e: crate::model::ModelError) -> anyhow::Error {
    match e {
        crate::model::ModelError::NotFound(_) => anyhow::anyhow!(
            "model file {} not found; run `make setup` to fetch the default model, or pass --model",
            path.display()
        ),
        e => anyhow::anyhow!("loading model {}: {e}", path.display()),
    }
}

/// Loads the configured model.
pub fn load_model(cfg: &Config) -> anyhow::Result<Arc<Model>> {
    let (device, dtype) = device_and_dtype(cfg)?;
    let t = std::time::Instant::now();
    let mut model = Model::load(&cfg.model.path, &cfg.model.id, &device, dtype)
        .map_err(|e| model_error(&cfg.model.path, e))?;
    if let Some(q) = cfg.model.decode_quant()? {
        model.decoder.quantize_for_decode(q)?;
    }
    model
        .decoder
        .set_f32_norms_attention(cfg.model.f32_norms_attention);
    #[cfg(feature = "cuda")]
    {
        crate::model::cuda::set_enabled(cfg.model.cuda_kernels);
        crate::model::cuda::graph::set_enabled(cfg.model.cuda_graphs);
        crate::model::cuda::set_fused_training(cfg.model.cuda_fused_training);
    }
    // On a GPU the weights' copies and the stacks made at load are queued on this thread's
    // stream; the threads that serve read them from theirs.
    device.synchronize()?;
    tracing::info!(
        path = %cfg.model.path.display(),
        layers = model.decoder.config().num_hidden_layers,
        secs = t.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(Arc::new(model))
}

/// The gate named by `[gate] probe`, checked against the loaded model (whose weights'
/// digest is `weights`); `None` when none is configured.
pub fn load_gate(
    cfg: &Config,
    model: &Model,
    weights: &WeightsDigest,
) -> anyhow::Result<Option<Arc<LoadedGate>>> {
    load_card(
        cfg.gate.probe.as_deref(),
        Decides::Retrieval,
        model,
        weights,
    )
}

/// The adaptation gate named by `[gate] adapt_probe`, like [`load_gate`].
pub fn load_adapt_gate(
    cfg: &Config,
    model: &Model,
    weights: &WeightsDigest,
) -> anyhow::Result<Option<Arc<LoadedGate>>> {
    let card = cfg.gate.adapt_probe.as_deref();
    load_card(card, Decides::Adaptation, model, weights)
}

fn load_card(
    card: Option<&std::path::Path>,
    decides: Decides,
    model: &Model,
    weights: &WeightsDigest,
) -> anyhow::Result<Option<Arc<LoadedGate>>> {
    let Some(card) = card else {
        return Ok(None);
    };
    let t = std::time::Instant::now();
    let gate = LoadedGate::open(card, decides, model, weights)?;
    tracing::info!(
        card = %card.display(),
        decides = decides.name(),
        layer = gate.card.features.layer,
        secs = t.elapsed().as_secs_f64(),
        "gate loaded"
    );
    Ok(Some(Arc::new(gate)))
}

/// Opens the collections, building the default one from the sample corpus when missing or
/// empty. The build is the CLI's (`Collections::ingest`): a server killed meanwhile leaves no
/// half collection for its next start to serve.
pub fn open_collections(cfg: &Config) -> anyhow::Result<Arc<Collections>> {
    let r = &cfg.retrieval;
    let cols = Arc::new(Collections::new(&r.index_dir));
    let missing = !cols.exists(&r.collection)
        || cols
            .get(&r.collection)
            .with_context(|| format!("opening collection `{}`", r.collection))?
            .is_empty();
    if missing {
        if let Some(sample) = r.sample_corpus.as_ref().filter(|p| p.exists()) {
            tracing::info!(collection = %r.collection, corpus = %sample.display(), "building the default collection");
            let stats = cols
                .ingest(&r.collection, sample, r.passage_max_chars, None)
                .with_context(|| format!("indexing {}", sample.display()))?;
            tracing::info!(passages = stats.passages, "default collection built");
        } else {
            tracing::warn!(collection = %r.collection, "default collection is missing or empty and no sample corpus was found");
        }
    }
    Ok(cols)
}

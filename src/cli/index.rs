//! `ttarag index build|list|snapshot|delete`, and `adapt` (training, in the lab build).

use std::path::PathBuf;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::retrieval::Collections;

#[derive(Debug, Subcommand)]
pub enum IndexCmd {
    /// Ingest a JSONL file ({"id", "text", "title"?} per line), a .txt/.md file, or a folder of
    /// them into a collection. Re-ingesting a document id replaces its passages.
    Build {
        /// Collection name (letters, digits, `-`, `_`).
        #[arg(long)]
        collection: String,
        /// File or folder to ingest.
        #[arg(long)]
        input: PathBuf,
        /// Longest passage in characters. Overrides retrieval.passage_max_chars.
        #[arg(long)]
        max_chars: Option<usize>,
    },
    /// List collections and their passage counts.
    List,
    /// Copy a collection's latest commit into OUT/NAME: a read-only snapshot to ship to every
    /// replica, which then serves it with `retrieval.index_dir` = OUT.
    Snapshot {
        /// Collection name.
        #[arg(long)]
        collection: String,
        /// Folder to write the snapshot under (OUT/NAME must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Delete a collection.
    Delete {
        /// Collection name.
        #[arg(long)]
        collection: String,
    },
    /// Train the collection's domain adapter (settings: `[domain.train]`), from labelled
    /// questions with their retrieved passages and/or from its passages. Saved in
    /// `[domain] dir`/NAME with a card; an interrupted run resumes from its checkpoint.
    #[cfg(feature = "lab")]
    Adapt(super::adapt::AdaptArgs),
}

pub fn run(cfg: Config, cmd: IndexCmd) -> anyhow::Result<()> {
    let cols = Collections::new(&cfg.retrieval.index_dir);
    match cmd {
        IndexCmd::Build {
            collection,
            input,
            max_chars,
        } => {
            let pb = ProgressBar::new(0).with_style(
                ProgressStyle::with_template(
                    "{spinner} {bar:40} {binary_bytes}/{binary_total_bytes} ({eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let stats = cols.ingest(
                &collection,
                &input,
                max_chars.unwrap_or(cfg.retrieval.passage_max_chars),
                Some(&pb),
            )?;
            pb.finish_and_clear();
            println!(
                "{collection}: ingested {} documents as {} passages from {} files; {} passages in all",
                stats.documents,
                stats.passages,
                stats.files,
                cols.get(&collection)?.len()
            );
        }
        IndexCmd::List => {
            for info in cols.list()? {
                println!("{}\t{} passages", info.name, info.passages);
            }
        }
        IndexCmd::Snapshot { collection, out } => {
            let bytes = cols.snapshot(&collection, &out)?;
            println!(
                "{collection}: snapshot of {} passages ({:.1} MB) in {}",
                cols.get(&collection)?.len(),
                bytes as f64 / 1e6,
                out.join(&collection).display()
            );
        }
        IndexCmd::Delete { collection } => {
            cols.delete(&collection)?;
            println!("deleted {collection}");
        }
        #[cfg(feature = "lab")]
        IndexCmd::Adapt(a) => super::adapt::run(cfg, a)?,
    }
    Ok(())
}

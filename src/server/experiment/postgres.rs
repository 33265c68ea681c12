//! The shared store (`[ab] store = "postgres"`): every replica writes each finished
//! in-experiment request to one table, feedback is claimed there once with a conditional
//! `UPDATE ... RETURNING` (so two replicas racing on the same id cannot both count it), and the
//! summary aggregates the table: every replica reports the same figures.
//!
//! Writes leave the request path through a bounded queue to one writer task, which inserts
//! whatever has queued up in one statement; a full queue drops the record (counted in
//! `/health`) rather than holding requests behind the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;

use super::compare::Moments;
use super::stats::{ArmTotals, RECENT_LATENCIES};
use super::{Feedback, Record, Refused, Stored};
use crate::config::AbSection;

/// Records waiting for the writer; past this, new ones are dropped and counted.
const QUEUE: usize = 8192;
/// Most records one insert carries.
const BATCH: usize = 512;
/// How long a request may wait for a connection, and a connection to be made.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, created by the first replica (an advisory lock keeps two replicas starting
/// together from racing on `CREATE TABLE`). `seq` orders rows for "most recent".
const SCHEMA: &str = "
SET LOCAL client_min_messages = warning;
SELECT pg_advisory_xact_lock(7472816311);
CREATE TABLE IF NOT EXISTS ttarag_ab_experiments (
    name text PRIMARY KEY,
    arms text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ttarag_ab_responses (
    experiment text NOT NULL REFERENCES ttarag_ab_experiments (name) ON DELETE CASCADE,
    id uuid NOT NULL,
    seq bigserial,
    arm text NOT NULL,
    replica text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('ok', 'error', 'cancelled')),
    status text NOT NULL,
    latency_ms double precision,
    loss_delta double precision,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    rated boolean NOT NULL DEFAULT false,
    correct boolean,
    rating double precision,
    rated_by text,
    rated_at timestamptz,
    PRIMARY KEY (experiment, id)
);
CREATE INDEX IF NOT EXISTS ttarag_ab_responses_recent
    ON ttarag_ab_responses (experiment, arm, seq);
";

const INSERT: &str = "
INSERT INTO ttarag_ab_responses
    (experiment, replica, id, arm, outcome, status, latency_ms, loss_delta)
SELECT $1, $2, * FROM UNNEST($3::uuid[], $4::text[], $5::text[], $6::text[],
                             $7::float8[], $8::float8[])
ON CONFLICT DO NOTHING";

const CLAIM: &str = "
UPDATE ttarag_ab_responses
SET rated = true, correct = $3, rating = $4, rated_by = $5, rated_at = now()
WHERE experiment = $1 AND id = $2 AND outcome = 'ok' AND NOT rated
RETURNING arm";

const TOTALS: &str = "
SELECT arm,
    count(*),
    count(*) FILTER (WHERE outcome = 'error'),
    count(*) FILTER (WHERE outcome = 'cancelled'),
    count(latency_ms) FILTER (WHERE outcome = 'ok'),
    coalesce(sum(latency_ms) FILTER (WHERE outcome = 'ok'), 0),
    coalesce(sum(latency_ms * latency_ms) FILTER (WHERE outcome = 'ok'), 0),
    count(*) FILTER (WHERE rated),
    count(*) FILTER (WHERE correct),
    count(*) FILTER (WHERE NOT correct),
    count(rating),
    coalesce(sum(rating), 0),
    coalesce(sum(rating * rating), 0),
    count(loss_delta) FILTER (WHERE outcome = 'ok'),
    coalesce(sum(loss_delta) FILTER (WHERE outcome = 'ok'), 0),
    coalesce(sum(loss_delta * loss_delta) FILTER (WHERE outcome = 'ok'), 0)
FROM ttarag_ab_responses WHERE experiment = $1 GROUP BY arm";

/// The median over each arm's most recent successful latencies, as the memory store keeps.
const MEDIANS: &str = "
SELECT arm, percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms)
FROM (SELECT arm, latency_ms,
             row_number() OVER (PARTITION BY arm ORDER BY seq DESC) AS recent
      FROM ttarag_ab_responses
      WHERE experiment = $1 AND outcome = 'ok' AND latency_ms IS NOT NULL) r
WHERE recent <= $2 GROUP BY arm";

enum Write {
    Row(Row, Option<oneshot::Sender<()>>),
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

struct Row {
    id: uuid::Uuid,
    arm: String,
    outcome: &'static str,
    status: String,
    latency_ms: Option<f64>,
    loss_delta: Option<f64>,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

pub struct PostgresStore {
    pool: Pool,
    experiment: String,
    queue: OnceLock<mpsc::Sender<Write>>,
    replica: OnceLock<String>,
    counters: std::sync::Arc<Counters>,
}

/// The error with its causes ("error connecting to server: Connection refused"), which the
/// pool's own message leaves out.
fn db_error(e: impl std::error::Error) -> String {
    let mut msg = format!("the A/B store (PostgreSQL) failed: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    msg
}

impl PostgresStore {
    pub fn new(cfg: &AbSection) -> anyhow::Result<Self> {
        let url = cfg
            .postgres_url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("ab.postgres_url is not set"))?;
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| anyhow::anyhow!("ab.postgres_url does not parse: {e}"))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(POOL_TIMEOUT);
        }
        pg.application_name("ttarag");
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(cfg.postgres_pool)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()?;
        Ok(Self {
            pool,
            experiment: cfg.experiment.clone(),
            queue: OnceLock::new(),
            replica: OnceLock::new(),
            counters: Default::default(),
        })
    }

    pub async fn open(&self, cfg: &AbSection, replica: &str) -> anyhow::Result<()> {
        let where_ = "the A/B store (ab.store = \"postgres\")";
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| anyhow::anyhow!("{where_}: cannot connect: {}", db_error(e)))?;
        let tx = client.transaction().await?;
        tx.batch_execute(SCHEMA)
            .await
            .map_err(|e| anyhow::anyhow!("{where_}: creating its tables: {e}"))?;
        tx.commit().await?;
        let ours = serde_json::to_value(&cfg.arms)?;
        client
            .execute(
                "INSERT INTO ttarag_ab_experiments (name, arms) VALUES ($1, $2) \
                 ON CONFLICT (name) DO NOTHING",
                &[&self.experiment, &ours.to_string()],
            )
            .await?;
        let row = client
            .query_one(
                "SELECT arms FROM ttarag_ab_experiments WHERE name = $1",
                &[&self.experiment],
            )
            .await?;
        let recorded: String = row.get(0);
        let theirs: serde_json::Value = serde_json::from_str(&recorded).map_err(|e| {
            anyhow::anyhow!("{where_}: experiment `{}`'s arms: {e}", self.experiment)
        })?;
        anyhow::ensure!(
            theirs == ours,
            "[ab] arms differ from those experiment `{}` was started with in PostgreSQL, so \
             this replica would mix other treatments into its statistics; recorded: {theirs}; \
             this replica: {ours}. Use the same arms, or a new [ab] experiment name",
            self.experiment
        );
        let _ = self.replica.set(replica.to_string());
        let (tx, rx) = mpsc::channel(QUEUE);
        if self.queue.set(tx).is_ok() {
            tokio::spawn(write_loop(
                self.pool.clone(),
                self.experiment.clone(),
                replica.to_string(),
                rx,
                self.counters.clone(),
            ));
        }
        tracing::info!(experiment = %self.experiment, replica, "A/B store: PostgreSQL");
        Ok(())
    }

    /// Queues `record` (served by arm `arm`); the receiver resolves once it is written.
    pub fn record(&self, arm: &str, r: &Record) -> Option<Stored> {
        let (outcome, status) = match r.end {
            super::End::Cancelled => ("cancelled", "cancelled".to_string()),
            super::End::Status(s) => (if r.ok() { "ok" } else { "error" }, s.as_str().into()),
        };
        let row = Row {
            id: uuid::Uuid::from_u128(r.id),
            arm: arm.to_string(),
            outcome,
            status,
            latency_ms: Some(r.ms),
            loss_delta: r.loss_delta,
        };
        let Some(queue) = self.queue.get() else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("A/B store not open; record dropped");
            return None;
        };
        let (done, stored) = oneshot::channel();
        match queue.try_send(Write::Row(row, Some(done))) {
            Ok(()) => Some(stored),
            Err(_) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("A/B store queue full; record dropped");
                None
            }
        }
    }

    pub async fn flush(&self, within: Duration) {
        let Some(queue) = self.queue.get() else {
            return;
        };
        let (done, flushed) = oneshot::channel();
        let sent = queue.send(Write::Flush(done));
        if tokio::time::timeout(within, async {
            sent.await.ok()?;
            flushed.await.ok()
        })
        .await
        .is_err()
        {
            tracing::warn!("A/B store: records still queued at exit");
        }
    }

    pub async fn claim(&self, id: u128, f: &Feedback) -> Result<String, Refused> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| Refused::Unavailable(db_error(e)))?;
        let id = uuid::Uuid::from_u128(id);
        let replica = self.replica.get().map(String::as_str).unwrap_or("");
        let claimed = client
            .query_opt(
                CLAIM,
                &[&self.experiment, &id, &f.correct, &f.rating, &replica],
            )
            .await
            .map_err(|e| Refused::Unavailable(db_error(e)))?;
        if let Some(row) = claimed {
            return Ok(row.get(0));
        }
        let rated: Option<bool> = client
            .query_opt(
                "SELECT rated FROM ttarag_ab_responses \
                 WHERE experiment = $1 AND id = $2 AND outcome = 'ok'",
                &[&self.experiment, &id],
            )
            .await
            .map_err(|e| Refused::Unavailable(db_error(e)))?
            .map(|r| r.get(0));
        Err(match rated {
            Some(true) => Refused::Duplicate,
            _ => Refused::Unknown,
        })
    }

    /// Every arm's totals by name, over every replica's rows.
    pub async fn totals(&self) -> Result<HashMap<String, ArmTotals>, String> {
        let client = self.pool.get().await.map_err(db_error)?;
        let mut out = HashMap::new();
        let count = |r: &tokio_postgres::Row, i: usize| r.get::<_, i64>(i).max(0) as u64;
        let moments = |r: &tokio_postgres::Row, i: usize| Moments {
            n: count(r, i),
            sum: r.get(i + 1),
            sum_sq: r.get(i + 2),
        };
        for r in client
            .query(TOTALS, &[&self.experiment])
            .await
            .map_err(db_error)?
        {
            let t = ArmTotals {
                requests: count(&r, 1),
                errors: count(&r, 2),
                cancelled: count(&r, 3),
                latency: moments(&r, 4),
                p50_ms: None,
                feedback: count(&r, 7),
                correct: count(&r, 8),
                incorrect: count(&r, 9),
                rating: moments(&r, 10),
                loss_delta: moments(&r, 13),
            };
            out.insert(r.get::<_, String>(0), t);
        }
        let recent = RECENT_LATENCIES as i64;
        for r in client
            .query(MEDIANS, &[&self.experiment, &recent])
            .await
            .map_err(db_error)?
        {
            if let Some(t) = out.get_mut(&r.get::<_, String>(0)) {
                t.p50_ms = r.get(1);
            }
        }
        Ok(out)
    }

    pub fn health(&self) -> serde_json::Value {
        let c = &self.counters;
        let status = self.pool.status();
        serde_json::json!({
            "store": "postgres",
            "experiment": self.experiment,
            "replica": self.replica.get(),
            "connections": status.size,
            "queued": self.queue.get().map(|q| QUEUE - q.capacity()).unwrap_or(0),
            "written": c.written.load(Ordering::Relaxed),
            "dropped": c.dropped.load(Ordering::Relaxed),
            "failed": c.failed.load(Ordering::Relaxed),
        })
    }
}

/// Inserts queued records, as many as have queued up per statement. A failed insert is retried
/// twice, then its records are counted as failed: the database being down must not stop the
/// server answering.
async fn write_loop(
    pool: Pool,
    experiment: String,
    replica: String,
    mut rx: mpsc::Receiver<Write>,
    counters: std::sync::Arc<Counters>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut rows = Vec::new();
        let mut waiters = Vec::new();
        for w in batch.drain(..) {
            match w {
                Write::Row(row, done) => {
                    rows.push(row);
                    waiters.extend(done);
                }
                Write::Flush(done) => waiters.push(done),
            }
        }
        if !rows.is_empty() {
            let n = rows.len() as u64;
            let mut attempt = 0;
            loop {
                match insert(&pool, &experiment, &replica, &rows).await {
                    Ok(()) => {
                        counters.written.fetch_add(n, Ordering::Relaxed);
                        break;
                    }
                    Err(e) if attempt < 2 => {
                        attempt += 1;
                        tracing::warn!(error = %e, attempt, "A/B store write failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                    }
                    Err(e) => {
                        counters.failed.fetch_add(n, Ordering::Relaxed);
                        tracing::error!(error = %e, records = n, "A/B store write failed; records lost");
                        break;
                    }
                }
            }
        }
        for done in waiters {
            let _ = done.send(());
        }
    }
}

async fn insert(pool: &Pool, experiment: &str, replica: &str, rows: &[Row]) -> Result<(), String> {
    let client = pool.get().await.map_err(db_error)?;
    let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id).collect();
    let arms: Vec<&str> = rows.iter().map(|r| r.arm.as_str()).collect();
    let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    let latencies: Vec<Option<f64>> = rows.iter().map(|r| r.latency_ms).collect();
    let deltas: Vec<Option<f64>> = rows.iter().map(|r| r.loss_delta).collect();
    let stmt = client.prepare_cached(INSERT).await.map_err(db_error)?;
    client
        .execute(
            &stmt,
            &[
                &experiment,
                &replica,
                &ids,
                &arms,
                &outcomes,
                &statuses,
                &latencies,
                &deltas,
            ],
        )
        .await
        .map_err(db_error)?;
    Ok(())
}

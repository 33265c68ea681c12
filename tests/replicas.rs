//! Many replicas, one experiment: two real `ttarag serve` processes behind nginx on loopback,
//! sharing an A/B experiment in a throwaway PostgreSQL cluster (Debian's packages, which
//! `make setup` installs; `initdb` runs as the `postgres` user when the tests run as root).
//! The same user gets the same arm from both replicas; feedback on a response served by one is
//! taken once through the other, also when both race on it; both summaries agree; a replica
//! with other arms refuses to start; and with the database gone the replicas still answer.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where Debian puts PostgreSQL's server programs: the newest `/usr/lib/postgresql/N/bin`.
fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .max();
    newest
        .map(|(_, bin)| bin)
        .expect("no PostgreSQL server under /usr/lib/postgresql: run `make setup` (it installs Debian's postgresql)")
}

/// `program` run as the `postgres` user when we are root (initdb refuses root), else as us.
fn as_postgres(program: &Path) -> Command {
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway PostgreSQL cluster in a temporary directory, on a loopback port, trusting local
/// connections; stopped and deleted on drop.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    running: bool,
    _dir: tempfile::TempDir,
}

impl Postgres {
    fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            use std::os::unix::fs::PermissionsExt;
            // The postgres user must reach its data directory and own it.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:").arg(&data);
                    c
                },
                "chown",
            );
        }
        let mut initdb = as_postgres(&bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        let port = free_port();
        let mut start = as_postgres(&bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(data.join("server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                data.display()
            ))
            .arg("start");
        run(start, "pg_ctl start");
        Self {
            bin,
            data,
            port,
            running: true,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn stop(&mut self) {
        if std::mem::replace(&mut self.running, false) {
            let mut stop = as_postgres(&self.bin.join("pg_ctl"));
            stop.arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = stop.output();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// nginx (Debian's) balancing round-robin over `upstreams` on a loopback port, in the
/// foreground with its files in a temporary directory; stopped on drop.
struct Nginx {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstreams: &[&str]) -> Self {
        const NGINX: &str = "/usr/sbin/nginx";
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} missing: run `make setup` (it installs Debian's nginx)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let port = free_port();
        let servers: String = upstreams
            .iter()
            .map(|u| format!("    server {};\n", u.trim_start_matches("http://")))
            .collect();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               upstream ttarag {{\n{servers}  }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
                 proxy_pass http://ttarag;\n      proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "nginx never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            base,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A replica's process (killed first) and its folder.
struct Replica {
    _process: common::KillOnDrop,
    base: String,
    _dir: tempfile::TempDir,
}

const ARMS: &str = "arms = [{name = \"static\", weight = 1.0, mode = \"static\"}, \
                    {name = \"none\", weight = 1.0, mode = \"none\"}]\n";

/// The config of replica `name` over the shared experiment, with `arms`.
fn replica_config(dir: &Path, name: &str, url: &str, arms: &str) -> PathBuf {
    common::facts_config(
        dir,
        &format!(
            "[server]\nreplica_id = \"{name}\"\n\
             [ab]\nstore = \"postgres\"\npostgres_url = \"{url}\"\nexperiment = \"two-replicas\"\n{arms}"
        ),
    )
}

fn serve_args(dir: &Path, config: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--config".into(),
        config.into(),
        "--model".into(),
        common::default_model_path().into(),
        "--index-dir".into(),
        dir.join("index").into(),
    ]
}

fn replica(name: &str, url: &str) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let config = replica_config(dir.path(), name, url, ARMS);
    let (child, base) = common::spawn_serve(&serve_args(dir.path(), &config));
    Replica {
        _process: common::KillOnDrop(child),
        base,
        _dir: dir,
    }
}

/// One chat answer through `base`: (replica header, arm, response id).
async fn ask(http: &reqwest::Client, base: &str, user: &str) -> (String, String, String) {
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &json!({"messages": [{"role": "user", "content": "What do plants need?"}],
                      "max_tokens": 2, "temperature": 0, "user": user}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let replica = r.headers()["x-ttarag-replica"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = r.json().await.unwrap();
    let arm = body["rag"]["arm"].as_str().unwrap().to_string();
    (replica, arm, body["id"].as_str().unwrap().to_string())
}

async fn feedback(http: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    let r = http
        .post(format!("{base}/v1/feedback"))
        .json(&json!({"id": id, "correct": true, "rating": 4}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn summary(http: &reqwest::Client, base: &str) -> (u16, Value) {
    let r = http
        .get(format!("{base}/v1/ab/summary"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The summary's arms by name.
fn by_arm(s: &Value) -> HashMap<String, Value> {
    s["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap().to_string(), a.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_nginx_share_one_experiment_in_postgres() {
    let mut pg = Postgres::start();
    let url = pg.url();
    let a = replica("replica-a", &url);
    let b = replica("replica-b", &url);
    let lb = Nginx::start(&[&a.base, &b.base]);
    let http = reqwest::Client::new();

    // Same user, same arm, whichever replica answers; round-robin sends each user to both.
    let mut served: Vec<(String, String, String, String)> = Vec::new();
    for u in 0..6 {
        let user = format!("user-{u}");
        for _ in 0..4 {
            let (replica, arm, id) = ask(&http, &lb.base, &user).await;
            served.push((user.clone(), replica, arm, id));
        }
    }
    for u in 0..6 {
        let user = format!("user-{u}");
        let mine: Vec<_> = served.iter().filter(|s| s.0 == user).collect();
        let arms: BTreeSet<&str> = mine.iter().map(|s| s.2.as_str()).collect();
        let replicas: BTreeSet<&str> = mine.iter().map(|s| s.1.as_str()).collect();
        assert_eq!(arms.len(), 1, "{user} got arms {arms:?}");
        assert_eq!(replicas.len(), 2, "{user} was served by {replicas:?} only");
        eprintln!("{user}: arm {arms:?} from replicas {replicas:?}");
    }
    let arms_used: BTreeSet<&str> = served.iter().map(|s| s.2.as_str()).collect();
    assert_eq!(arms_used.len(), 2, "six users all landed on {arms_used:?}");

    // Feedback on a response of replica A, through replica B: taken once, then refused anywhere.
    let (_, _, arm_a, id_a) = served.iter().find(|s| s.1 == "replica-a").unwrap();
    let (status, body) = feedback(&http, &b.base, id_a).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["arm"], arm_a.as_str());
    for base in [&b.base, &a.base, &lb.base] {
        let (status, body) = feedback(&http, base, id_a).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "duplicate_feedback");
    }
    eprintln!(
        "feedback on {id_a} (served by replica-a): 200 via replica-b, then 409 via b, a and nginx"
    );

    // Both replicas race on one response of B: exactly one claim wins.
    let (_, _, _, id_b) = served.iter().rev().find(|s| s.1 == "replica-b").unwrap();
    let racers = (0..8).map(|i| {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        feedback(&http, base, id_b)
    });
    let codes: Vec<u16> = futures::future::join_all(racers)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 409).count(), 7, "{codes:?}");
    eprintln!("8 racing claims on {id_b} across both replicas: {codes:?}");

    // An id no replica served is unknown everywhere.
    let (status, _) = feedback(&http, &a.base, &format!("chatcmpl-{}", "0".repeat(32))).await;
    assert_eq!(status, 404);

    // Every replica's summary is the whole experiment's, and they agree.
    let (sa, sum_a) = summary(&http, &a.base).await;
    let (sb, sum_b) = summary(&http, &b.base).await;
    let (sl, sum_lb) = summary(&http, &lb.base).await;
    assert_eq!((sa, sb, sl), (200, 200, 200));
    assert_eq!(sum_a, sum_b);
    assert_eq!(sum_a, sum_lb);
    let arms = by_arm(&sum_a);
    let requests: u64 = arms.values().map(|a| a["requests"].as_u64().unwrap()).sum();
    let rated: u64 = arms
        .values()
        .map(|a| a["feedback"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!((requests, rated), (24, 2));
    for (name, a) in &arms {
        let n = served.iter().filter(|s| &s.2 == name).count() as u64;
        assert_eq!(a["requests"], n, "{name}");
        assert_eq!(a["errors"], 0, "{name}");
    }
    eprintln!("summary (identical from replica-a, replica-b and nginx): {sum_a}");

    // A replica with other arms under the same experiment refuses to start.
    let dir = tempfile::tempdir().unwrap();
    let other = ARMS.replace(
        "weight = 1.0, mode = \"none\"",
        "weight = 3.0, mode = \"none\"",
    );
    let config = replica_config(dir.path(), "replica-c", &url, &other);
    let out = Command::new(env!("CARGO_BIN_EXE_ttarag"))
        .args(["serve", "--port", "0"])
        .args(serve_args(dir.path(), &config))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "it listened"
    );
    assert!(stderr.contains("arms differ"), "{stderr}");
    eprintln!(
        "replica-c with other arms: exit {:?}, {}",
        out.status.code(),
        stderr.lines().last().unwrap_or("")
    );

    // With the database gone, answers still go out; what needs the store says 503.
    pg.stop();
    let t = Instant::now();
    let (_, _, _) = ask(&http, &a.base, "user-0").await;
    let waited = t.elapsed();
    let (status, body) = summary(&http, &b.base).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "ab_store_unavailable");
    let (status, body) = feedback(&http, &a.base, id_a).await;
    assert_eq!(status, 503, "{body}");
    let health: Value = reqwest::get(format!("{}/health", a.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["ab"]["store"], "postgres");
    eprintln!(
        "database stopped: answer in {} ms, summary 503, feedback 503, /health ab {}",
        waited.as_millis(),
        health["ab"]
    );
}

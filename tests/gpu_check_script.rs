//! The GPU check (`scripts/gpu/check.sh`) and the reference run (`scripts/gpu/reference.sh`)
//! run here with stand-ins for the binary, Python and `nvidia-smi`: every command line they
//! would run on a GPU machine parses, every config file they write loads, and every Python
//! script they name exists, so a GPU machine's few minutes are not lost to a renamed flag or a
//! misspelt key. What the commands measure needs the GPU itself.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use clap::Parser;
use ttarag::cli::Cli;
use ttarag::config::Config;

/// A stand-in that records its arguments, NUL-separated, one file per call, in `$CALLS`.
const RECORDER: &str = r#"#!/usr/bin/env bash
n=$(find "$CALLS" -type f | wc -l)
printf '%s\0' "$(basename "$0")" "$@" > "$CALLS/$(printf %05d "$n")"
echo "stand-in output"
echo "stand-in answer"
"#;

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What running `script` (under `scripts/gpu/`) with `args` called: each call's tool and
/// arguments, in order, and the script's standard output and error.
fn calls_of(script: &str, args: &[&Path]) -> (Vec<Vec<String>>, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let (root, calls, bin) = (dir.path(), dir.path().join("calls"), dir.path().join("bin"));
    std::fs::create_dir_all(&calls).unwrap();
    // The scripts run `.gpu/ttarag` from the working directory, and Python and nvidia-smi
    // from the PATH.
    write_exec(&root.join(".gpu/ttarag"), RECORDER);
    for tool in ["python3", "nvidia-smi"] {
        write_exec(&bin.join(tool), RECORDER);
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let run = Command::new("bash")
        .arg(repo.join("scripts/gpu").join(script))
        .args(args)
        .current_dir(root)
        .env("PATH", path)
        .env("CALLS", &calls)
        // The config files they write (mktemp) land here, and go with the test's folder.
        .env("TMPDIR", root)
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{script} failed:\n{output}");
    let mut files: Vec<_> = std::fs::read_dir(&calls)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut out = vec![];
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let args: Vec<String> = bytes
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8(a.to_vec()).unwrap())
            .collect();
        // A config file is checked while the folder holding it lives.
        check_call(repo, &args);
        out.push(args);
    }
    (out, output)
}

/// One call a script made: a binary command line parses and its config loads; a Python
/// script exists in the repository.
fn check_call(repo: &Path, args: &[String]) {
    match args[0].as_str() {
        "ttarag" => {
            let cli = Cli::try_parse_from(args)
                .unwrap_or_else(|e| panic!("`{}` does not parse: {e}", args.join(" ")));
            if let Some(c) = &cli.config {
                Config::from_file(c).unwrap_or_else(|e| {
                    panic!("`{}`: its config does not load: {e:#}", args.join(" "))
                });
            }
        }
        "python3" => {
            let script = args
                .iter()
                .find(|a| a.ends_with(".py"))
                .unwrap_or_else(|| panic!("python3 without a script: {args:?}"));
            assert!(
                repo.join(script).is_file(),
                "{script} is not in the repository"
            );
        }
        "nvidia-smi" => {}
        other => panic!("unexpected tool {other}"),
    }
}

/// What kind of run a binary call is: its subcommand, with a bench's first flag or an index
/// command's own subcommand.
fn kind(args: &[String]) -> String {
    let cli = Cli::try_parse_from(args).unwrap();
    let sub = cli_kind(&cli);
    let next = args.iter().skip_while(|a| **a != sub).nth(1);
    match (sub.as_str(), next) {
        ("bench" | "index", Some(next)) => format!("{sub} {next}"),
        _ => sub,
    }
}

#[test]
fn every_command_of_the_gpu_check_parses_and_every_config_it_writes_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (calls, _) = calls_of("check.sh", &[&out, Path::new("all")]);
    let log = std::fs::read_to_string(out.join("log")).unwrap();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("== [") && last.ends_with(" s] done"),
        "{log}"
    );
    assert!(!log.contains("FAILED"), "{log}");
    let binary: Vec<&Vec<String>> = calls.iter().filter(|c| c[0] == "ttarag").collect();
    let kinds: BTreeSet<String> = binary.iter().map(|c| kind(c)).collect();
    for want in [
        "bench --kernels",
        "bench --query",
        "bench --batch",
        "bench --load",
        "bench --runs",
        "ask",
        "index build",
    ] {
        assert!(kinds.contains(want), "no `{want}` among {kinds:?}");
    }
    let configs = binary
        .iter()
        .filter(|c| c.contains(&"--config".into()))
        .count();
    assert!(
        configs >= 20,
        "only {configs} runs with a config of their own"
    );
    let scripts: BTreeSet<&String> = calls
        .iter()
        .filter(|c| c[0] == "python3")
        .filter_map(|c| c.iter().find(|a| a.ends_with(".py")))
        .collect();
    for want in [
        "scripts/gpu/random_weights.py",
        "scripts/reference/query_reference.py",
    ] {
        assert!(
            scripts.iter().any(|s| *s == want),
            "{want} never ran: {scripts:?}"
        );
    }
}

#[test]
fn every_command_of_the_reference_run_parses_and_every_config_it_writes_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (calls, _) = calls_of("reference.sh", &[dir.path()]);
    let tta = calls
        .iter()
        .filter(|c| c[0] == "ttarag" && kind(c) == "bench --tta")
        .count();
    assert_eq!(tta, 2, "a LoRA and a full run: {calls:?}");
    let reference = calls
        .iter()
        .filter(|c| c.iter().any(|a| a == "scripts/reference/tta_reference.py"))
        .count();
    assert_eq!(reference, 2, "{calls:?}");
}

/// The subcommand's name (with an index command's own subcommand).
fn cli_kind(cli: &Cli) -> String {
    use ttarag::cli::Command as C;
    match &cli.command {
        C::Serve(_) => "serve",
        C::Index(_) => "index",
        C::Ask(_) => "ask",
        C::Bench(_) => "bench",
        C::Eval(_) => "eval",
        C::Gate(_) => "gate",
        C::Model(_) => "model",
    }
    .to_string()
}

/// The check's parts (`small`, `big`, `switches`), run one call each, run every binary
/// command that `all` runs, each once; a part the script does not know is refused.
#[test]
fn the_checks_parts_together_run_what_all_runs() {
    let binary = |part: &str| -> usize {
        let dir = tempfile::tempdir().unwrap();
        let (calls, _) = calls_of("check.sh", &[&dir.path().join("out"), Path::new(part)]);
        calls.iter().filter(|c| c[0] == "ttarag").count()
    };
    let parts: Vec<usize> = ["small", "big", "switches"].map(binary).to_vec();
    assert!(parts.iter().all(|&n| n > 0), "{parts:?}");
    assert_eq!(parts.iter().sum::<usize>(), binary("all"), "{parts:?}");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(repo.join("scripts/gpu/check.sh"))
        .arg(dir.path())
        .arg("everything")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("PARTS must be"), "{err}");
}

//! The `ttarag` binary, started as a user would, driven by the official `openai` Python client
//! (installed into .venv by `make setup`). The model is a tiny random one saved as a Hugging
//! Face folder, which also exercises that loading path through the CLI.

mod common;

use std::process::Command;

use candle_core::{DType, Device};
use ttarag::model::{export_hf_folder, tiny::tiny_parts, Arch};

#[test]
fn official_openai_client_round_trips() {
    let python = common::root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run `make setup`",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny-qwen2");
    export_hf_folder(
        &tiny_parts(Arch::Qwen2, 5, &Device::Cpu, DType::F32).unwrap(),
        &model_dir,
    )
    .unwrap();
    let config = common::facts_config(dir.path(), "[model]\nid = \"tiny-qwen2\"\n");

    let (child, base) = common::spawn_serve(&[
        "--config".as_ref(),
        config.as_os_str(),
        "--model".as_ref(),
        model_dir.as_os_str(),
        "--index-dir".as_ref(),
        dir.path().join("index").as_os_str(),
    ]);
    let server = common::KillOnDrop(child);

    let out = Command::new(&python)
        .arg(common::root().join("tests/python/openai_client.py"))
        .arg(&base)
        .arg("tiny-qwen2")
        .output()
        .unwrap();
    drop(server);
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn missing_model_stops_the_server_with_one_line_naming_the_setup_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ttarag"))
        .args(["serve", "--port", "0", "--model"])
        .arg(dir.path().join("absent.gguf"))
        .arg("--index-dir")
        .arg(dir.path())
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("make setup") && lines[0].contains("absent.gguf"),
        "{err}"
    );
}

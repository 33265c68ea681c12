//! This process's resident memory (Linux `/proc`), for the benchmarks.

/// A `/proc/self/status` field in MB (Linux), if known.
fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Peak resident memory of this process in MB (Linux), if known.
pub fn peak_rss_mb() -> Option<f64> {
    status_mb("VmHWM:")
}

/// Resets the peak-RSS mark to the current RSS (Linux); returns the current RSS in MB.
pub fn reset_peak_rss() -> Option<f64> {
    use std::io::Write;
    // Opened without truncation: the proc file accepts writes only.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .ok()?;
    f.write_all(b"5").ok()?;
    status_mb("VmRSS:")
}

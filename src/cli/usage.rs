//! This process's resident memory (Linux `/proc`) and CPU time, for the benchmarks.

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

/// CPU time this process has used so far, user and system, in seconds (all threads).
pub fn cpu_seconds() -> Option<f64> {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; it was zeroed, so it is initialised
    // whatever the call does.
    let u = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) != 0 {
            return None;
        }
        u.assume_init()
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(s(u.ru_utime) + s(u.ru_stime))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_grows_with_the_work_done() {
        // Process-wide, and other tests run beside this one: only a lower bound is certain.
        let t1 = super::cpu_seconds().expect("getrusage works on this system");
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let t2 = super::cpu_seconds().unwrap();
        assert!(t2 - t1 > 0.05, "spun 100 ms, used {} s", t2 - t1);
    }
}

//! Where a run comes from: the build's git commit and the machine's host name (logged in
//! every run's meta line).

/// The git commit of the build (`<12 hex digits>`, `-dirty` with uncommitted changes to
/// tracked files, or `unknown`), recorded by `build.rs`.
pub const GIT_COMMIT: &str = env!("MIXBENCH_GIT_COMMIT");

/// The machine's host name (`unknown` when it cannot be read).
pub fn hostname() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
        // when the name fits (and the last byte stays 0 otherwise).
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
        if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            let name = String::from_utf8_lossy(&buf[..end]).into_owned();
            if !name.is_empty() {
                return name;
            }
        }
    }
    std::env::var("HOSTNAME")
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

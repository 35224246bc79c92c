//! Output files of the subcommands (`eval --out`, `export --out`, `preview --out`): checked
//! before any work is done, written through a staging file in the same directory and put in
//! place by a rename (or a hard link, which cannot replace a file that appeared meanwhile).
//!
//! What is at the path is never destroyed by accident: a FIFO, device node, socket, directory
//! or symbolic link is refused (writing "over" `/dev/null` as root would replace it with a
//! regular file), so is the input being read (`export --out SRC`), and an existing regular
//! file is replaced only when the caller allows it.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// When an existing regular file at the output path may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Never (`--force` not given).
    Never,
    /// Always (`--force`).
    Always,
    /// Only a file that starts with these bytes (e.g. a PNG signature: `preview` replaces an
    /// earlier preview, never a checkpoint that happens to sit at the path).
    IfStartsWith(&'static [u8]),
}

/// The PNG file signature.
pub const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// An output path that passed [`OutputFile::check`].
#[derive(Debug, Clone)]
pub struct OutputFile {
    flag: &'static str,
    path: PathBuf,
    replace: Replace,
    sources: Vec<PathBuf>,
}

impl OutputFile {
    /// Checks that `path` (given as `flag`) can be written, before any work is done: its
    /// directory exists and accepts a new file, and anything already at the path is a regular
    /// file that `replace` allows replacing and that is none of `sources` (the inputs of the
    /// command). Errors are one line naming the flag and the path.
    pub fn check(
        flag: &'static str,
        path: &Path,
        replace: Replace,
        sources: &[&Path],
    ) -> Result<Self> {
        let out = Self {
            flag,
            path: path.to_path_buf(),
            replace,
            sources: sources.iter().map(|p| p.to_path_buf()).collect(),
        };
        if path.file_name().is_none() {
            bail!("{flag} {}: not a file path", path.display());
        }
        out.check_target()?;
        // A directory that does not exist or cannot take a new file fails now, not after an
        // evaluation of many minutes: create (and remove) the staging file.
        let staging = out.staging_path();
        let probe = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
            .with_context(|| format!("{flag} {}: cannot create a file there", path.display()))?;
        drop(probe);
        let _ = std::fs::remove_file(&staging);
        Ok(out)
    }

    /// What is at the path now: nothing, or a regular file that may be replaced.
    fn check_target(&self) -> Result<()> {
        let (flag, path) = (self.flag, &self.path);
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("{flag} {}", path.display())),
        };
        let kind = file_kind(&meta);
        if kind != "regular file" {
            bail!(
                "{flag} {}: is a {kind}, not a regular file; name a new file to write",
                path.display()
            );
        }
        for src in &self.sources {
            if same_file(path, src) {
                bail!(
                    "{flag} {}: is the input file {} itself; name another file",
                    path.display(),
                    src.display()
                );
            }
        }
        match self.replace {
            Replace::Always => Ok(()),
            Replace::Never => bail!(
                "{flag} {}: exists; pass --force to replace it",
                path.display()
            ),
            Replace::IfStartsWith(magic) => {
                let mut head = vec![0u8; magic.len()];
                let starts = File::open(path)
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                    .is_ok()
                    && head == magic;
                if starts {
                    Ok(())
                } else {
                    bail!(
                        "{flag} {}: exists and is not a file this command wrote; pass --force to replace it",
                        path.display()
                    )
                }
            }
        }
    }

    /// The staging file beside the output: hidden, named after it and this process.
    fn staging_path(&self) -> PathBuf {
        let mut name = OsString::from(".");
        name.push(self.path.file_name().expect("checked"));
        name.push(format!(".partial-{}", std::process::id()));
        self.path.with_file_name(name)
    }

    /// Writes the file: `write` fills the staging file (created with the process's umask, so
    /// the result has a new file's permissions), which is synced and put in place. The target
    /// is checked again just before (it may have changed since [`OutputFile::check`]). A
    /// failed attempt leaves no staging file behind and the target as it was.
    pub fn write(&self, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let (flag, path) = (self.flag, &self.path);
        let staging = self.staging_path();
        let placed = write(&staging)
            .and_then(|()| {
                File::open(&staging)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("{}: cannot sync", staging.display()))
            })
            .and_then(|()| self.check_target())
            .and_then(|()| self.place(&staging));
        // After a hard link the staging name is a second name of the output; after a rename
        // or a failure it may be gone already.
        let _ = std::fs::remove_file(&staging);
        placed.with_context(|| format!("{flag} {}", path.display()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Persists the new directory entry (not possible on every platform).
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    fn place(&self, staging: &Path) -> Result<()> {
        let path = &self.path;
        if self.replace != Replace::Never {
            return std::fs::rename(staging, path).map_err(Into::into);
        }
        match std::fs::hard_link(staging, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("exists; pass --force to replace it")
            }
            // A file system without hard links: fall back to a checked rename.
            Err(_) if !path.exists() => std::fs::rename(staging, path).map_err(Into::into),
            Err(e) => Err(e.into()),
        }
    }
}

/// A short name of a file's type for error messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        return "regular file";
    }
    if t.is_dir() {
        return "directory";
    }
    if t.is_symlink() {
        return "symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "device node";
        }
        if t.is_socket() {
            return "socket";
        }
    }
    "special file"
}

/// Whether two paths name the same file (same device and inode on Unix; the same canonical
/// path elsewhere).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
        false
    }
    #[cfg(not(unix))]
    {
        match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_text(out: &OutputFile, text: &str) -> Result<()> {
        out.write(|tmp| std::fs::write(tmp, text).map_err(Into::into))
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_new_file_is_written_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        let out = OutputFile::check("--out", &p, Replace::Never, &[]).unwrap();
        assert_eq!(
            entries(dir.path()),
            Vec::<String>::new(),
            "the probe is removed"
        );
        write_text(&out, "{}").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{}");
        assert_eq!(entries(dir.path()), vec!["r.json"]);
    }

    #[cfg(unix)]
    #[test]
    fn the_file_gets_a_new_files_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        write_text(
            &OutputFile::check("--out", &p, Replace::Never, &[]).unwrap(),
            "{}",
        )
        .unwrap();
        let reference = dir.path().join("reference");
        File::create(&reference).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), mode(&reference));
    }

    #[test]
    fn an_existing_file_is_replaced_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(&p, "keep").unwrap();
        let e = OutputFile::check("--out", &p, Replace::Never, &[]).unwrap_err();
        assert!(format!("{e:#}").contains("exists; pass --force"), "{e:#}");
        let out = OutputFile::check("--out", &p, Replace::Always, &[]).unwrap();
        write_text(&out, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
    }

    #[test]
    fn a_file_appearing_after_the_check_is_not_replaced_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        let out = OutputFile::check("--out", &p, Replace::Never, &[]).unwrap();
        std::fs::write(&p, "theirs").unwrap();
        let e = write_text(&out, "mine").unwrap_err();
        assert!(format!("{e:#}").contains("exists"), "{e:#}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "theirs");
        assert_eq!(entries(dir.path()), vec!["r.json"]);
    }

    #[test]
    fn only_files_with_the_signature_are_replaced_by_a_magic_rule() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("a.png");
        std::fs::write(&png, [PNG_SIGNATURE, b"rest"].concat()).unwrap();
        OutputFile::check("--out", &png, Replace::IfStartsWith(PNG_SIGNATURE), &[]).unwrap();
        let ckpt = dir.path().join("epoch_1.safetensors");
        std::fs::write(&ckpt, b"not a png at all").unwrap();
        let e = OutputFile::check("--out", &ckpt, Replace::IfStartsWith(PNG_SIGNATURE), &[])
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("not a file this command wrote"),
            "{e:#}"
        );
    }

    #[test]
    fn the_input_itself_is_refused_even_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("epoch_1.safetensors");
        std::fs::write(&src, "weights").unwrap();
        // Also through another spelling of the same path.
        let other = dir.path().join(".").join("epoch_1.safetensors");
        let e = OutputFile::check("--out", &other, Replace::Always, &[&src]).unwrap_err();
        assert!(format!("{e:#}").contains("is the input file"), "{e:#}");
        assert_eq!(std::fs::read_to_string(&src).unwrap(), "weights");
    }

    #[cfg(unix)]
    #[test]
    fn special_files_directories_and_links_are_refused_even_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.map(|s| s.success()).unwrap_or(false) {
            let e = OutputFile::check("--out", &fifo, Replace::Always, &[]).unwrap_err();
            assert!(format!("{e:#}").contains("is a FIFO"), "{e:#}");
            use std::os::unix::fs::FileTypeExt;
            assert!(std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo());
        }
        let e =
            OutputFile::check("--out", Path::new("/dev/null"), Replace::Always, &[]).unwrap_err();
        assert!(format!("{e:#}").contains("is a device node"), "{e:#}");
        let e = OutputFile::check("--out", dir.path(), Replace::Always, &[]).unwrap_err();
        assert!(format!("{e:#}").contains("is a directory"), "{e:#}");
        let target = dir.path().join("t.json");
        std::fs::write(&target, "x").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = OutputFile::check("--out", &link, Replace::Always, &[]).unwrap_err();
        assert!(format!("{e:#}").contains("is a symbolic link"), "{e:#}");
    }

    #[test]
    fn a_missing_directory_fails_at_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no/such/dir/r.json");
        let e = OutputFile::check("--out", &p, Replace::Never, &[]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("--out ") && msg.contains("cannot create a file there"),
            "{msg}"
        );
    }
}

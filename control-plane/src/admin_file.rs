//! Drains that survive a restart: the `state_file`.
//!
//! `switchyard drain` / `undrain` change admin state held in memory. With
//! `state_file` configured, the control plane writes the set of drained
//! endpoints there after every change (a temporary file beside it, synced,
//! then renamed over it: a crash leaves the old set or the new one, never
//! half of one) and drains them again when it starts. Drains in the config
//! (`endpoint_config.<url>.draining`) apply at every start as well; the
//! two add up.
//!
//! The file is JSON, `{"version": 1, "drained": ["http://10.0.0.5:11434"]}`.
//! A missing file is an empty set (first start). A file that cannot be read
//! or parsed stops the start-up with an error naming it: starting without
//! drains an operator made would send traffic to backends taken out for
//! maintenance.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The format version written and understood.
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    version: u32,
    drained: Vec<String>,
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminFileError {
    /// Reading or writing failed.
    #[error("state_file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not what this version writes.
    #[error(
        "state_file {path}: {detail}; fix or delete it (it holds the endpoints drained with `switchyard drain`)"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// The configured state file; writes are serialized.
#[derive(Debug)]
pub struct AdminFile {
    path: PathBuf,
    writing: Mutex<()>,
}

impl AdminFile {
    /// The file at `path` (nothing is read or written yet).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            writing: Mutex::new(()),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The drained endpoint URLs saved, or none when the file does not
    /// exist yet.
    pub fn load(&self) -> Result<Vec<String>, AdminFileError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(AdminFileError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let saved: Saved = serde_json::from_str(&text).map_err(|e| AdminFileError::Invalid {
            path: self.path.clone(),
            detail: format!("not valid JSON of the expected shape: {e}"),
        })?;
        if saved.version != VERSION {
            return Err(AdminFileError::Invalid {
                path: self.path.clone(),
                detail: format!(
                    "version {} is not the version this control plane writes ({VERSION})",
                    saved.version
                ),
            });
        }
        Ok(saved.drained)
    }

    /// [`AdminFile::load`], then a check that the file can be written
    /// where it is (its temporary file is created and removed): a
    /// directory that does not exist or is read-only would otherwise show
    /// only when `switchyard drain` fails to save, long after start-up.
    pub fn load_checked(&self) -> Result<Vec<String>, AdminFileError> {
        let drained = self.load()?;
        self.check_writable()?;
        Ok(drained)
    }

    /// Whether the file can be written where it is: a probe file of this
    /// process's own beside it is created and removed (never the name
    /// [`AdminFile::save`] writes, which a running control plane may be
    /// using).
    pub fn check_writable(&self) -> Result<(), AdminFileError> {
        let tmp = self.beside(&format!(".check-{}", std::process::id()));
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|source| AdminFileError::Io {
                path: self.path.clone(),
                source: io::Error::new(
                    source.kind(),
                    format!("cannot be written there ({source}); drains could not be saved"),
                ),
            })?;
        let _ = fs::remove_file(&tmp);
        Ok(())
    }

    /// The file's path with `suffix` appended (a file beside it).
    fn beside(&self, suffix: &str) -> PathBuf {
        let mut path = self.path.clone().into_os_string();
        path.push(suffix);
        PathBuf::from(path)
    }

    /// Replaces the saved set with `drained()`, read while holding the
    /// write lock, so concurrent changes never leave an older set last.
    pub fn save(&self, drained: impl FnOnce() -> Vec<String>) -> Result<(), AdminFileError> {
        let _writing = self.writing.lock();
        let saved = Saved {
            version: VERSION,
            drained: drained(),
        };
        let io_err = |source| AdminFileError::Io {
            path: self.path.clone(),
            source,
        };
        let mut text =
            serde_json::to_string_pretty(&saved).map_err(|e| io_err(io::Error::other(e)))?;
        text.push('\n');
        let tmp = self.beside(".tmp");
        {
            use std::io::Write as _;
            let mut f = fs::File::create(&tmp).map_err(io_err)?;
            f.write_all(text.as_bytes()).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        if let Err(e) = fs::rename(&tmp, &self.path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(e));
        }
        // The rename itself reaches the disk with the directory.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn missing_file_is_empty_and_a_saved_set_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = AdminFile::new(dir.path().join("state.json"));
        assert!(f.load().unwrap().is_empty());
        f.save(|| vec!["http://a:1".into(), "http://b:1".into()])
            .unwrap();
        assert_eq!(f.load().unwrap(), ["http://a:1", "http://b:1"]);
        f.save(Vec::new).unwrap();
        assert!(f.load().unwrap().is_empty());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"], "no temporary file left behind");
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let f = AdminFile::new(path.clone());
        fs::write(&path, "{\"drained\": [").unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("fix or delete it"), "{e}");
        fs::write(&path, "{\"version\": 7, \"drained\": []}").unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("version 7"), "{e}");
        // A file in a directory that does not exist cannot be written:
        // said at start, not at the first drain.
        let f = AdminFile::new(dir.path().join("missing").join("state.json"));
        let e = f.save(Vec::new).unwrap_err().to_string();
        assert!(e.starts_with("state_file "), "{e}");
        let e = f.load_checked().unwrap_err().to_string();
        assert!(e.contains("cannot be written there"), "{e}");
        let ok = AdminFile::new(dir.path().join("fresh.json"));
        assert!(ok.load_checked().unwrap().is_empty());
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["state.json"], "a probe file was left behind");
    }
}

//! The usage lake's one owner: where its bytes live and how they are laid
//! out. The ingester writes by it, compaction rewrites by it, and the query
//! service reads by it; nobody else formats a lake key.
//!
//! Its parts: [`layout`] (the `usage/` and `dead_letters/` prefixes, the
//! `date`/`hour` partitions, the file names that record progress) and
//! [`store`] (a local directory or an S3-compatible object store, where
//! every written object appears whole or not at all).

pub mod layout;
pub mod store;

use std::path::{Path, PathBuf};

pub use layout::PartName;
pub use store::Store;

/// Why the lake could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lake store: {0}")]
    Store(String),
}

impl LakeError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LakeError {
        let path = path.to_path_buf();
        move |source| LakeError::Io { path, source }
    }
}

//! Where the lake's bytes live: a local directory, or an object store
//! (S3 and S3-compatible) through the `object_store` crate.
//!
//! Keys are `/`-separated paths relative to the lake's root. Both backends
//! make a written object appear whole or not at all: a directory through a
//! synced temporary file renamed into place, an object store by the nature
//! of its PUT. Names starting with `.` are temporaries and never listed.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::LakeError;

#[derive(Clone)]
pub enum Store {
    Dir(PathBuf),
    Object {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        url: String,
        /// Object store calls are async; the lake's callers are threads.
        runtime: Arc<IoRuntime>,
    },
}

/// The runtime object store calls run on. Shut down without waiting, so a
/// lake may be dropped anywhere, async code included.
pub struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    fn block_on<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, LakeError>>,
    ) -> Result<T, LakeError> {
        self.0
            .as_ref()
            .ok_or_else(|| LakeError::Store("the lake's I/O runtime is gone".into()))?
            .block_on(f)
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn store_err(e: impl std::fmt::Display) -> LakeError {
    LakeError::Store(e.to_string())
}

/// The S3 (or S3-compatible) bucket of an `s3://` lake; `options` are
/// `object_store`'s S3 settings over the `AWS_*` environment variables.
pub fn s3_bucket(
    bucket: &str,
    options: &[(String, String)],
) -> Result<Arc<dyn ObjectStore>, LakeError> {
    let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    for (k, v) in options {
        let key: object_store::aws::AmazonS3ConfigKey = k
            .parse()
            .map_err(|_| LakeError::Store(format!("unknown S3 setting {k:?}")))?;
        builder = builder.with_config(key, v);
    }
    Ok(Arc::new(builder.build().map_err(store_err)?))
}

impl Store {
    /// `s3://bucket/prefix` or a local directory. For S3, `options` are
    /// `object_store`'s S3 settings (`endpoint`, `region`, `access_key_id`,
    /// `secret_access_key`, `allow_http`, ...), over the `AWS_*`
    /// environment variables.
    pub fn open(location: &str, options: &[(String, String)]) -> Result<Store, LakeError> {
        let Some(rest) = location.strip_prefix("s3://") else {
            if location.contains("://") {
                return Err(LakeError::Store(format!(
                    "{location}: a lake is a local directory or s3://bucket/prefix"
                )));
            }
            return Ok(Store::Dir(PathBuf::from(location)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let store = s3_bucket(bucket, options)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-lake-io")
            .enable_all()
            .build()
            .map_err(|e| LakeError::Store(format!("starting the lake's I/O runtime: {e}")))?;
        Ok(Store::Object {
            store,
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            url: location.to_string(),
            runtime: Arc::new(IoRuntime(Some(runtime))),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Store::Dir(d) => d.display().to_string(),
            Store::Object { url, .. } => url.clone(),
        }
    }

    fn object(prefix: &ObjectPath, key: &str) -> ObjectPath {
        let mut p = prefix.clone();
        for part in key.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    /// Writes several objects; each appears whole. In a directory every
    /// file is written and synced before the first is renamed into place.
    pub fn put_all(&self, items: Vec<(String, Vec<u8>)>) -> Result<(), LakeError> {
        match self {
            Store::Dir(root) => {
                let mut staged = Vec::with_capacity(items.len());
                for (key, bytes) in items {
                    let path = root.join(&key);
                    let dir = path
                        .parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| root.clone());
                    fs::create_dir_all(&dir).map_err(LakeError::io(&dir))?;
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let tmp = dir.join(format!(".{name}.tmp"));
                    let mut f = File::create(&tmp).map_err(LakeError::io(&tmp))?;
                    f.write_all(&bytes).map_err(LakeError::io(&tmp))?;
                    f.sync_all().map_err(LakeError::io(&tmp))?;
                    staged.push((tmp, path, dir));
                }
                for (tmp, path, dir) in staged {
                    fs::rename(&tmp, &path).map_err(LakeError::io(&path))?;
                    sync_dir(&dir)?;
                }
                Ok(())
            }
            Store::Object {
                store,
                prefix,
                runtime,
                ..
            } => runtime.block_on(async {
                for (key, bytes) in items {
                    store
                        .put(&Self::object(prefix, &key), Bytes::from(bytes).into())
                        .await
                        .map_err(store_err)?;
                }
                Ok(())
            }),
        }
    }

    /// Writes `key` only if no object has that key: `Ok(false)` when one
    /// does. Atomic among processes sharing the lake (a hard link in a
    /// directory; a conditional PUT, `If-None-Match: *`, on an object
    /// store), so it can decide which of several writers goes first.
    pub fn create(&self, key: &str, bytes: Vec<u8>) -> Result<bool, LakeError> {
        match self {
            Store::Dir(root) => {
                let path = root.join(key);
                let dir = path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.clone());
                fs::create_dir_all(&dir).map_err(LakeError::io(&dir))?;
                let unique = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let tmp = dir.join(format!(".create.{}.{unique}.tmp", std::process::id()));
                let mut f = File::create(&tmp).map_err(LakeError::io(&tmp))?;
                f.write_all(&bytes).map_err(LakeError::io(&tmp))?;
                f.sync_all().map_err(LakeError::io(&tmp))?;
                let linked = fs::hard_link(&tmp, &path);
                let _ = fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {
                        sync_dir(&dir)?;
                        Ok(true)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(LakeError::io(&path)(e)),
                }
            }
            Store::Object {
                store,
                prefix,
                runtime,
                ..
            } => runtime.block_on(async {
                let opts = object_store::PutOptions::from(object_store::PutMode::Create);
                match store
                    .put_opts(&Self::object(prefix, key), Bytes::from(bytes).into(), opts)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => Ok(false),
                    Err(e) => Err(store_err(e)),
                }
            }),
        }
    }

    /// The object at `key`, `None` when there is none.
    pub fn read(&self, key: &str) -> Result<Option<Bytes>, LakeError> {
        match self {
            Store::Dir(root) => {
                let path = root.join(key);
                match fs::read(&path) {
                    Ok(b) => Ok(Some(Bytes::from(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(LakeError::io(&path)(e)),
                }
            }
            Store::Object {
                store,
                prefix,
                runtime,
                ..
            } => runtime.block_on(async {
                match store.get(&Self::object(prefix, key)).await {
                    Ok(r) => r.bytes().await.map(Some).map_err(store_err),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(store_err(e)),
                }
            }),
        }
    }

    pub fn get(&self, key: &str) -> Result<Bytes, LakeError> {
        match self {
            Store::Dir(root) => {
                let path = root.join(key);
                fs::read(&path)
                    .map(Bytes::from)
                    .map_err(LakeError::io(&path))
            }
            Store::Object {
                store,
                prefix,
                runtime,
                ..
            } => runtime.block_on(async {
                store
                    .get(&Self::object(prefix, key))
                    .await
                    .map_err(store_err)?
                    .bytes()
                    .await
                    .map_err(store_err)
            }),
        }
    }

    pub fn delete(&self, key: &str) -> Result<(), LakeError> {
        match self {
            Store::Dir(root) => {
                let path = root.join(key);
                match fs::remove_file(&path) {
                    Ok(()) => path.parent().map_or(Ok(()), sync_dir),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(LakeError::io(&path)(e)),
                }
            }
            Store::Object {
                store,
                prefix,
                runtime,
                ..
            } => runtime.block_on(async {
                match store.delete(&Self::object(prefix, key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(store_err(e)),
                }
            }),
        }
    }

    /// Keys under `under` (recursively), sorted; temporaries excluded.
    pub fn list(&self, under: &str) -> Result<Vec<String>, LakeError> {
        let mut keys = match self {
            Store::Dir(root) => {
                let mut out = Vec::new();
                walk(root, &root.join(under), &mut out)?;
                out
            }
            Store::Object {
                store,
                prefix,
                runtime,
                ..
            } => runtime.block_on(async {
                let base = Self::object(prefix, under);
                let metas: Vec<_> = store
                    .list(Some(&base))
                    .try_collect()
                    .await
                    .map_err(store_err)?;
                // Locations come back percent-encoded, part by part; keys
                // are the decoded parts below the prefix.
                let skip = prefix.parts().count();
                Ok::<_, LakeError>(
                    metas
                        .into_iter()
                        .map(|m| {
                            m.location
                                .parts()
                                .skip(skip)
                                .map(|p| {
                                    percent_encoding::percent_decode_str(p.as_ref())
                                        .decode_utf8_lossy()
                                        .into_owned()
                                })
                                .collect::<Vec<_>>()
                                .join("/")
                        })
                        .collect(),
                )
            })?,
        };
        keys.retain(|k| !k.rsplit('/').next().unwrap_or("").starts_with('.'));
        keys.sort();
        Ok(keys)
    }

    /// Leftover temporaries under `under` whose names start with `prefix`
    /// (a directory's staged files; object stores have none).
    pub fn remove_temporaries(&self, under: &str, prefix: &str) -> Result<(), LakeError> {
        let Store::Dir(root) = self else {
            return Ok(());
        };
        let mut dirs = Vec::new();
        walk_dirs(&root.join(under), &mut dirs);
        let prefix = format!(".{prefix}");
        for d in dirs {
            for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) && name.ends_with(".tmp") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }
}

pub fn sync_dir(dir: &Path) -> Result<(), LakeError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(LakeError::io(dir))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), LakeError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(LakeError::io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(LakeError::io(dir))?;
        let path = entry.path();
        if entry.file_type().map_err(LakeError::io(&path))?.is_dir() {
            walk(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

fn walk_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    out.push(dir.to_path_buf());
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk_dirs(&entry.path(), out);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn create_writes_a_key_once_and_read_tells_missing_from_present() {
        let dir =
            std::env::temp_dir().join(format!("tollgate-store-create-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(dir.to_str().unwrap(), &[]).unwrap();
        assert!(store.read("alerts/claims/k").unwrap().is_none());
        assert!(store.create("alerts/claims/k", b"first".to_vec()).unwrap());
        assert!(!store.create("alerts/claims/k", b"second".to_vec()).unwrap());
        assert_eq!(
            &store.read("alerts/claims/k").unwrap().unwrap()[..],
            b"first"
        );
        // Racing creators: exactly one wins.
        let won: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = store.clone();
                    s.spawn(move || usize::from(store.create("race", vec![i]).unwrap()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(won, 1);
        assert!(
            store
                .list("alerts")
                .unwrap()
                .iter()
                .all(|k| !k.contains(".tmp"))
        );
        let _ = fs::remove_dir_all(&dir);
    }
}

//! A store in an S3-compatible bucket, through `object_store`. The only module that
//! knows object storage: its tokio runtime stays inside, behind blocking calls.
//!
//! Endpoint, region and credentials come from the standard AWS variables
//! (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`, `AWS_REGION`, `AWS_DEFAULT_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), then from the
//! profile `AWS_PROFILE` (else `default`) of the shared files (`AWS_SHARED_CREDENTIALS_FILE`,
//! else `~/.aws/credentials`; `AWS_CONFIG_FILE`, else `~/.aws/config`). Requests use
//! path-style addressing (self-hosted stores rarely have wildcard DNS); plain `http://`
//! endpoints are allowed because self-hosted stores on a private network often use them.
//!
//! Every request is retried with exponential backoff (100 ms doubling to 5 s) on
//! connection errors, timeouts, 5xx answers and bodies cut short, for at most
//! `VOLSNAP_S3_RETRY_SECONDS` (default 60) in all; one attempt waits at most
//! `VOLSNAP_S3_TIMEOUT_SECONDS` (default 30) for an answer.

use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};

use super::{Object, Store, Upload};
use crate::error::{Error, Result};

/// Small objects `get_many` asks for at once.
const GETS_IN_FLIGHT: usize = 16;

pub struct S3Store {
    bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    prefix: String,
    client: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    /// The most time a request may take with its retries.
    budget: Duration,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn seconds(name: &str, default: u64) -> Result<Duration> {
    match env(name) {
        None => Ok(Duration::from_secs(default)),
        Some(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0 && *s < 86_400.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| Error::Usage(format!("{name}={v:?} is not a number of seconds"))),
    }
}

/// The `[section]` of an AWS shared file (`credentials` names sections by the profile,
/// `config` by `profile NAME` except for `default`), as key/value pairs.
fn profile_section(path: &Path, section: &str) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside && let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

/// Settings from the shared AWS files for the profile in use.
fn profile_settings() -> Vec<(String, String)> {
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, name: &str| {
        env(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    let mut out = Vec::new();
    if let Some(p) = file("AWS_SHARED_CREDENTIALS_FILE", "credentials") {
        out.extend(profile_section(&p, &profile));
    }
    if let Some(p) = file("AWS_CONFIG_FILE", "config") {
        let section = if profile == "default" {
            profile.clone()
        } else {
            format!("profile {profile}")
        };
        out.extend(profile_section(&p, &section));
    }
    out
}

impl S3Store {
    pub fn new(bucket: &str, prefix: &str) -> Result<S3Store> {
        let files = profile_settings();
        let from_file = |key: &str| files.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let endpoint = env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"))
            .or_else(|| from_file("endpoint_url"));
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| from_file("region"))
            .unwrap_or_else(|| "us-east-1".into());
        let key_id = env("AWS_ACCESS_KEY_ID").or_else(|| from_file("aws_access_key_id"));
        let secret = env("AWS_SECRET_ACCESS_KEY").or_else(|| from_file("aws_secret_access_key"));
        let token = env("AWS_SESSION_TOKEN").or_else(|| from_file("aws_session_token"));
        let (Some(key_id), Some(secret)) = (key_id, secret) else {
            return Err(Error::Usage(format!(
                "no credentials for s3://{bucket}: set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials (AWS_PROFILE)"
            )));
        };
        let timeout = seconds("VOLSNAP_S3_TIMEOUT_SECONDS", 30)?;
        let budget = seconds("VOLSNAP_S3_RETRY_SECONDS", 60)?;
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: 1000,
            retry_timeout: budget,
        };
        let options = ClientOptions::new()
            .with_allow_http(true)
            .with_timeout(timeout)
            .with_connect_timeout(timeout.min(Duration::from_secs(10)));
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_access_key_id(key_id)
            .with_secret_access_key(secret)
            .with_virtual_hosted_style_request(false)
            .with_retry(retry)
            .with_client_options(options);
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(token) = token {
            builder = builder.with_token(token);
        }
        let client = builder
            .build()
            .map_err(|e| Error::Usage(format!("cannot use s3://{bucket}: {}", one_line(&e))))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("volsnap-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::Store {
                op: "start the object-store client for",
                object: format!("s3://{bucket}"),
                detail: e.to_string(),
            })?;
        Ok(S3Store {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            client: Arc::new(client),
            rt,
            budget,
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn fail(&self, op: &'static str, key: &str, e: &object_store::Error) -> Error {
        Error::Store {
            op,
            object: self.display(key).display().to_string(),
            detail: one_line(e),
        }
    }

    /// Strips the repository prefix from an object's path.
    fn key_of(&self, path: &ObjectPath) -> Option<String> {
        let full = path.as_ref();
        if self.prefix.is_empty() {
            return Some(full.to_string());
        }
        full.strip_prefix(&self.prefix)
            .and_then(|k| k.strip_prefix('/'))
            .map(str::to_string)
    }
}

/// An error and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3Store {
    /// The whole object `key`, or `None` if there is none.
    async fn fetch(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        self.retrying(|| async {
            match self.client.get(&path).await {
                Ok(g) => Ok(Some(g.bytes().await?.to_vec())),
                Err(e) if not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| self.fail("read", key, &e))
    }

    /// `retry` within this store's budget.
    async fn retrying<T, F, Fut>(&self, attempt: F) -> std::result::Result<T, object_store::Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, object_store::Error>>,
    {
        retry(self.budget, attempt).await
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the retry budget
/// (`VOLSNAP_S3_RETRY_SECONDS`) is spent. `object_store` already retries each request
/// on connection errors, 5xx answers and GET bodies cut short; this outer loop also
/// covers what it does not retry: a listing or a HEAD whose answer is cut short, a
/// connection reset while a response body is read. An answer that will not change
/// (not found, 4xx, refused credentials) is not retried.
async fn retry<T, F, Fut>(
    budget: Duration,
    mut attempt: F,
) -> std::result::Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, object_store::Error>>,
{
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if !transient(&e) || started.elapsed() + pause > budget => {
                return Err(e);
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Whether an error may go away by asking again: transport and server errors, not a
/// missing object, a refusal, or a client error (4xx).
fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        E::NotFound { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::NotImplemented
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::NotSupported { .. }
        | E::InvalidPath { .. }
        | E::UnknownConfigurationKey { .. } => false,
        other => {
            let text = one_line(other);
            !(text.contains("status code: 4") || text.contains("Client error with status 4"))
        }
    }
}

impl Store for S3Store {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn display(&self, key: &str) -> PathBuf {
        PathBuf::from(format!("{}/{key}", self.location()))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.rt.block_on(self.fetch(key))
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        self.rt.block_on(async {
            futures_util::stream::iter(keys)
                .map(|key| self.fetch(key))
                .buffered(GETS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect()
        })
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Vec<u8>>> {
        if range.is_empty() {
            return self.size(key).map(|s| s.map(|_| Vec::new()));
        }
        let path = self.path(key);
        self.rt
            .block_on(self.retrying(|| async {
                // A range past the end is an error in S3: clamp it to the object's size.
                let size = match self.client.head(&path).await {
                    Ok(m) => m.size,
                    Err(e) if not_found(&e) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let end = range.end.min(size);
                if range.start >= end {
                    return Ok(Some(Vec::new()));
                }
                match self.client.get_range(&path, range.start..end).await {
                    Ok(b) => Ok(Some(b.to_vec())),
                    Err(e) if not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            }))
            .map_err(|e| self.fail("read", key, &e))
    }

    fn open(&self, key: &str, tmp: &Path) -> Result<Option<File>> {
        let path = self.path(key);
        let fetched = self.rt.block_on(self.retrying(|| async {
            let got = match self.client.get(&path).await {
                Ok(g) => g,
                Err(e) if not_found(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            // A new file per attempt: an attempt cut short leaves nothing behind.
            let mut file =
                tempfile::tempfile_in(tmp).map_err(|e| object_store::Error::Generic {
                    store: "local",
                    source: Box::new(e),
                })?;
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                file.write_all(&chunk?)
                    .map_err(|e| object_store::Error::Generic {
                        store: "local",
                        source: Box::new(e),
                    })?;
            }
            Ok(Some(file))
        }));
        fetched.map_err(|e| self.fail("read", key, &e))
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key);
        self.rt
            .block_on(self.retrying(|| async {
                match self.client.head(&path).await {
                    Ok(m) => Ok(Some(m.size)),
                    Err(e) if not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            }))
            .map_err(|e| self.fail("stat", key, &e))
    }

    fn put(&self, key: &str, bytes: &[u8], staged: Option<&'static str>) -> Result<()> {
        if let Some(point) = staged {
            crate::crash::point(point);
        }
        let path = self.path(key);
        let body = bytes::Bytes::copy_from_slice(bytes);
        self.rt
            .block_on(self.retrying(|| async {
                self.client
                    .put(&path, PutPayload::from(body.clone()))
                    .await
                    .map(drop)
            }))
            .map_err(|e| self.fail("write", key, &e))
    }

    fn put_started(
        &self,
        key: &str,
        bytes: Vec<u8>,
        staged: Option<&'static str>,
    ) -> Result<Upload> {
        if let Some(point) = staged {
            crate::crash::point(point);
        }
        let path = self.path(key);
        let body = bytes::Bytes::from(bytes);
        let client = self.client.clone();
        let budget = self.budget;
        // The request runs on the store's runtime while the caller goes on.
        let task = self.rt.spawn(async move {
            retry(budget, || {
                let (client, path) = (client.clone(), path.clone());
                let body = PutPayload::from(body.clone());
                async move { client.put(&path, body).await.map(drop) }
            })
            .await
        });
        let rt = self.rt.handle().clone();
        let object = self.display(key).display().to_string();
        Ok(Upload::pending(move || {
            let detail = match rt.block_on(task) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => one_line(&e),
                Err(e) => e.to_string(),
            };
            Err(Error::Store {
                op: "write",
                object,
                detail,
            })
        }))
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        // Not atomic (some stores ignore conditional writes): callers tolerate a race.
        if self.size(key)?.is_some() {
            return Ok(false);
        }
        self.put(key, bytes, None)?;
        Ok(true)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        self.rt
            .block_on(self.retrying(|| async {
                match self.client.delete(&path).await {
                    Err(e) if not_found(&e) => Ok(()),
                    other => other,
                }
            }))
            .map_err(|e| self.fail("delete", key, &e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Object>> {
        let path = self.path(prefix.trim_end_matches('/'));
        self.rt
            .block_on(self.retrying(|| async {
                let mut stream = self.client.list(Some(&path));
                let mut out = Vec::new();
                while let Some(meta) = stream.next().await {
                    let meta = meta?;
                    if let Some(key) = self.key_of(&meta.location) {
                        out.push(Object {
                            key,
                            size: meta.size,
                            modified: Some(meta.last_modified.into()),
                        });
                    }
                }
                Ok(out)
            }))
            .map_err(|e| self.fail("list", prefix, &e))
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.path(prefix.trim_end_matches('/'));
        let listed = self
            .rt
            .block_on(self.retrying(|| self.client.list_with_delimiter(Some(&path))))
            .map_err(|e| self.fail("list", prefix, &e))?;
        let mut out: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| self.key_of(p))
            .map(|k| format!("{k}/"))
            .collect();
        out.sort();
        Ok(out)
    }

    fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<Object>> {
        let path = self.path(prefix.trim_end_matches('/'));
        let offset = self.path(after);
        let mut out = self
            .rt
            .block_on(self.retrying(|| async {
                let mut stream = self.client.list_with_offset(Some(&path), &offset);
                let mut out = Vec::new();
                while let Some(meta) = stream.next().await {
                    let meta = meta?;
                    if let Some(key) = self.key_of(&meta.location)
                        && key.as_str() > after
                    {
                        out.push(Object {
                            key,
                            size: meta.size,
                            modified: Some(meta.last_modified.into()),
                        });
                    }
                }
                Ok(out)
            }))
            .map_err(|e| self.fail("list", prefix, &e))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn punch(&self, _key: &str, _runs: &[(u64, u64)]) -> Result<Option<u64>> {
        Ok(None)
    }

    fn allocated(&self, _key: &str, size: u64) -> u64 {
        size
    }

    fn is_local(&self) -> bool {
        false
    }
}

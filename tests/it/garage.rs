//! Garage on loopback: the S3-compatible store the object-storage tests run against.
//!
//! `Garage::single()` starts one node (`garage server --single-node --default-bucket`,
//! `replication_factor = 1`), `Garage::cluster3()` three nodes with
//! `replication_factor = 3` whose layout, key and bucket are set up through the admin
//! API. Every listener is on 127.0.0.1, the data and metadata in a scratch directory;
//! the nodes are killed and the directory removed on drop. A fixture is returned once
//! a signed S3 request through every node succeeds, never after a fixed wait.
//!
//! Without a `garage` on PATH the constructors return `None` after a skip note, except
//! in CI (`CI` set to a true value), where a missing Garage fails the test. `.ci/test`
//! installs the pinned version.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use serde_json::{Value, json};

use crate::support::*;

/// Garage's `s3_region` in every fixture (requests signed for another region are refused).
pub const REGION: &str = "garage";
/// The bucket every fixture has, readable and writable with its key.
pub const BUCKET: &str = "volsnap-test";
/// How long a node may take from its start to serving signed requests (about a second
/// is usual; a loaded machine is slower).
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A running Garage: one node or a cluster of three, with a key and a bucket.
pub struct Garage {
    nodes: Vec<Node>,
    key_id: String,
    secret: String,
    rpc_secret: String,
    admin_token: String,
    // Dropped after the nodes (fields drop in order), so no node writes into a
    // directory being removed.
    tmp: tempfile::TempDir,
}

struct Node {
    dir: PathBuf,
    config: PathBuf,
    rpc: u16,
    s3: u16,
    admin: u16,
    /// Hex node id (Garage's public key), read from the metadata directory.
    id: String,
    child: Option<Child>,
    /// Extra arguments of `garage server` (`--single-node --default-bucket`).
    server_args: Vec<&'static str>,
}

/// The `garage` binary on PATH, or `None` after the skip note (a panic in CI).
fn garage_bin() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing_component("no garage on PATH (.ci/test installs it with cargo install)");
    }
    found
}

impl Garage {
    /// One node with `replication_factor = 1` and its default key and bucket. `None`
    /// when garage is missing outside CI (the caller returns: the test is skipped).
    pub fn single() -> Option<Garage> {
        let bin = garage_bin()?;
        let mut last = String::new();
        // A port probed free can be taken by another process before Garage binds it:
        // then start again on other ports.
        for _ in 0..5 {
            let mut g = Garage::scratch();
            g.configure(0, 1, &[]);
            match g.start(&bin, 0) {
                Ok(()) => {
                    g.wait_serving(0);
                    return Some(g);
                }
                Err(PortTaken(log)) => last = log,
            }
        }
        panic!("garage could not bind its ports in 5 tries:\n{last}");
    }

    /// Three nodes on loopback sharing an rpc secret, `replication_factor = 3` (reads
    /// and writes need 2 of them), layout applied, key and bucket created.
    pub fn cluster3() -> Option<Garage> {
        let bin = garage_bin()?;
        let mut last = String::new();
        'attempt: for _ in 0..5 {
            let mut g = Garage::scratch();
            for i in 0..3 {
                g.configure(i, 3, &[]);
            }
            for i in 0..3 {
                if let Err(PortTaken(log)) = g.start(&bin, i) {
                    last = log;
                    continue 'attempt;
                }
            }
            // Each node knows the others from its configuration from now on, so a
            // restarted node finds the cluster again; node 0 connects them now.
            let peers: Vec<String> = (0..3).map(|i| g.peer(i)).collect();
            for i in 0..3 {
                let others: Vec<String> = (0..3)
                    .filter(|&j| j != i)
                    .map(|j| peers[j].clone())
                    .collect();
                g.configure(i, 3, &others);
            }
            let connected = g.admin_call(0, "POST", "/v2/ConnectClusterNodes", &json!(&peers[1..]));
            assert!(
                connected
                    .as_array()
                    .is_some_and(|a| a.iter().all(|r| r["success"] == true)),
                "node 0 could not connect the others: {connected}"
            );
            let roles: Vec<Value> = g
                .nodes
                .iter()
                .map(|n| {
                    let capacity = 1_000_000_000u64;
                    json!({"id": n.id, "zone": "dc1", "capacity": capacity, "tags": []})
                })
                .collect();
            g.admin_call(
                0,
                "POST",
                "/v2/UpdateClusterLayout",
                &json!({ "roles": roles }),
            );
            g.admin_call(0, "POST", "/v2/ApplyClusterLayout", &json!({"version": 1}));
            for i in 0..3 {
                g.wait_healthy(i, 3);
            }
            g.admin_call(
                0,
                "POST",
                "/v2/ImportKey",
                &json!({
                    "accessKeyId": g.key_id,
                    "secretAccessKey": g.secret,
                    "name": "volsnap-test",
                }),
            );
            let bucket = g.admin_call(
                0,
                "POST",
                "/v2/CreateBucket",
                &json!({"globalAlias": BUCKET}),
            );
            g.admin_call(
                0,
                "POST",
                "/v2/AllowBucketKey",
                &json!({
                    "bucketId": bucket["id"],
                    "accessKeyId": g.key_id,
                    "permissions": {"read": true, "write": true, "owner": true},
                }),
            );
            for i in 0..3 {
                g.wait_serving(i);
            }
            return Some(g);
        }
        panic!("garage could not bind its ports in 5 tries:\n{last}");
    }

    fn scratch() -> Garage {
        let tmp = tempfile::Builder::new()
            .prefix("volsnap-garage-")
            .tempdir_in(std::env::temp_dir())
            .expect("create tempdir");
        Garage {
            nodes: Vec::new(),
            key_id: format!("GK{}", random_hex(12)),
            rpc_secret: random_hex(32),
            secret: random_hex(32),
            admin_token: random_hex(32),
            tmp,
        }
    }

    /// Writes node `i`'s configuration (a new node gets its directory and ports).
    fn configure(&mut self, i: usize, replication: usize, peers: &[String]) {
        if i == self.nodes.len() {
            let dir = self.tmp.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            self.nodes.push(Node {
                config: dir.join("garage.toml"),
                dir,
                rpc: free_port(),
                s3: free_port(),
                admin: free_port(),
                id: String::new(),
                child: None,
                server_args: if replication == 1 {
                    vec!["--single-node", "--default-bucket"]
                } else {
                    vec![]
                },
            });
        }
        let node = &self.nodes[i];
        let (dir, rpc, s3, admin) = (node.dir.display(), node.rpc, node.s3, node.admin);
        let peers = peers
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "lmdb"
replication_factor = {replication}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"
bootstrap_peers = [{peers}]

[s3_api]
api_bind_addr = "127.0.0.1:{s3}"
s3_region = "{REGION}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"#,
            rpc_secret = self.rpc_secret,
            token = self.admin_token,
        );
        std::fs::write(&node.config, config).unwrap();
    }

    /// Node `i` as its peers name it: `ID@127.0.0.1:RPC_PORT`.
    fn peer(&self, i: usize) -> String {
        format!("{}@127.0.0.1:{}", self.nodes[i].id, self.nodes[i].rpc)
    }

    /// Starts node `i` and waits until its admin API answers (its id is then known).
    fn start(&mut self, bin: &Path, i: usize) -> Result<(), PortTaken> {
        let (key_id, secret) = (self.key_id.clone(), self.secret.clone());
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("garage.log"))
            .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .args(&node.server_args)
            .env("GARAGE_DEFAULT_ACCESS_KEY", &key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &secret)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=info,netapp=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        node.child = Some(child);
        let admin = SocketAddr::from(([127, 0, 0, 1], node.admin));
        self.poll(i, "its admin API to answer", || {
            http(admin, "GET", "/health", None, None)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })?;
        let node = &mut self.nodes[i];
        let key = node.dir.join("meta/node_key.pub");
        let id = std::fs::read(&key).unwrap_or_default();
        assert_eq!(id.len(), 32, "{}: not a node key", key.display());
        node.id = id.iter().map(|b| format!("{b:02x}")).collect();
        Ok(())
    }

    /// Polls `ready` until it gives a value (an error says what it saw instead). A
    /// port taken when node `i` exits is `Err`; its exit for another reason and the
    /// deadline are panics, with what `ready` saw last and the node's log.
    fn poll<T>(
        &mut self,
        i: usize,
        what: &str,
        mut ready: impl FnMut() -> Result<T, String>,
    ) -> Result<T, PortTaken> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            let last = match ready() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let node = &mut self.nodes[i];
            if let Some(status) = node.child.as_mut().unwrap().try_wait().unwrap() {
                node.child = None;
                let log = node.log();
                if log.contains("Address already in use") {
                    return Err(PortTaken(log));
                }
                panic!("garage node {i} exited ({status}) before {what} (last: {last}):\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "garage node {i}: no {what} after {READY_DEADLINE:?} (last: {last}):\n{}",
                node.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Like `poll`, for a node whose ports are known to be its own.
    #[track_caller]
    fn poll_running<T>(
        &mut self,
        i: usize,
        what: &str,
        ready: impl FnMut() -> Result<T, String>,
    ) -> T {
        match self.poll(i, what, ready) {
            Ok(v) => v,
            Err(PortTaken(log)) => panic!("garage node {i} lost a port before {what}:\n{log}"),
        }
    }

    /// Waits until node `i` has a connection to `up` storage nodes (itself included)
    /// and a quorum for every partition; with every node up, until it is connected to
    /// all the nodes of every partition (`healthy`).
    fn wait_healthy(&mut self, i: usize, up: usize) {
        let admin = SocketAddr::from(([127, 0, 0, 1], self.nodes[i].admin));
        let token = self.admin_token.clone();
        let all = self.nodes.len();
        let what = format!("cluster health with {up} storage nodes up");
        self.poll_running(i, &what, || {
            let (status, body) = http(admin, "GET", "/v2/GetClusterHealth", Some(&token), None)
                .map_err(|e| e.to_string())?;
            let h: Value = serde_json::from_str(&body).map_err(|_| body.clone())?;
            (status == 200
                && h["storageNodesUp"] == up
                && h["partitionsQuorum"] == h["partitions"]
                && (up < all || h["status"] == "healthy"))
                .then_some(())
                .ok_or(body)
        });
    }

    /// Waits until a signed listing through node `i` succeeds.
    fn wait_serving(&mut self, i: usize) {
        let client = self.client_via(&self.endpoint_of(i), false);
        self.poll_running(i, "signed S3 request served", || {
            client.list("").map(|_| ()).map_err(|e| e.to_string())
        });
    }

    /// Node `i`'s view of the cluster (the admin API's `GetClusterHealth`: `status`
    /// `healthy`, `degraded` or `unavailable`, `storageNodesUp`, `partitionsQuorum`...).
    pub fn health(&self, i: usize) -> Value {
        self.admin_call(i, "GET", "/v2/GetClusterHealth", &Value::Null)
    }

    /// A call to the admin API of node `i` (JSON in and out, `Value::Null` for no
    /// body); panics unless it succeeds.
    fn admin_call(&self, i: usize, method: &str, path: &str, body: &Value) -> Value {
        let admin = SocketAddr::from(([127, 0, 0, 1], self.nodes[i].admin));
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, out) = http(admin, method, path, Some(&self.admin_token), Some(&body))
            .unwrap_or_else(|e| panic!("garage admin {path}: {e}"));
        assert_eq!(status, 200, "garage admin {path} {body}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("garage admin {path}: {e}: {out}"))
    }

    /// SIGKILLs node `i` (of a cluster) and reaps it.
    pub fn kill_node(&mut self, i: usize) {
        let child = self.nodes[i].child.as_mut().expect("node is running");
        child.kill().unwrap();
        child.wait().unwrap();
        self.nodes[i].child = None;
    }

    /// Starts node `i` again on its directory and ports, and waits until every running
    /// node sees every running node and serves signed requests.
    pub fn restart_node(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is running");
        let bin = garage_bin().expect("garage was there at the start");
        if let Err(PortTaken(log)) = self.start(&bin, i) {
            panic!("garage node {i}: its ports were taken while it was down:\n{log}");
        }
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| self.nodes[j].child.is_some())
            .collect();
        // The others would retry their connection to it only after a while (Garage
        // waits 30 s between attempts): have each connect now.
        let me = self.peer(i);
        for &j in up.iter().filter(|&&j| j != i) {
            let connected = self.admin_call(j, "POST", "/v2/ConnectClusterNodes", &json!([me]));
            assert_eq!(
                connected[0]["success"], true,
                "node {j} to node {i}: {connected}"
            );
        }
        for &j in &up {
            self.wait_healthy(j, up.len());
        }
        self.wait_serving(i);
    }

    /// The S3 endpoint of node 0 (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        self.endpoint_of(0)
    }

    pub fn endpoint_of(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[node].s3)
    }

    /// Node `i`'s S3 listener, for a proxy in front of it.
    pub fn s3_addr(&self, node: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[node].s3))
    }

    /// Node `i`'s admin API listener (requests carry `admin_token` as a bearer token).
    pub fn admin_addr(&self, node: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[node].admin))
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn region(&self) -> &str {
        REGION
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// The repository location of `prefix` in the bucket: `s3://BUCKET/PREFIX`.
    pub fn repo_url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The environment that points an S3 client (the volsnap binary, `object_store`'s
    /// `AmazonS3Builder::from_env`) at node 0: endpoint, region, key, plain HTTP allowed,
    /// path-style addressing.
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_via(&self.endpoint())
    }

    /// `env()` with another endpoint: another node, or a proxy in front of one.
    pub fn env_via(&self, endpoint: &str) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", &self.key_id),
            ("AWS_SECRET_ACCESS_KEY", &self.secret),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Sets `env()` on `cmd` after removing every inherited `AWS_*` variable (a
    /// profile, session token or `AWS_ENDPOINT_URL_S3` of the machine would win over it).
    pub fn apply_env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env())
    }

    /// A blocking S3 client of the bucket through node 0, with `object_store`'s retries.
    pub fn client(&self) -> S3 {
        self.client_via(&self.endpoint(), true)
    }

    /// A client through `endpoint` (a node or a proxy); without retries every failed
    /// request is an error at once.
    pub fn client_via(&self, endpoint: &str, retries: bool) -> S3 {
        let retry = if retries {
            RetryConfig::default()
        } else {
            RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            }
        };
        self.client_with(endpoint, retry, ClientOptions::new())
    }

    /// A client through `endpoint` with these retries and HTTP options, and the
    /// variables of `env_via` as `from_env` reads them (set after `options`, which
    /// would otherwise replace `AWS_ALLOW_HTTP`).
    pub fn client_with(&self, endpoint: &str, retry: RetryConfig, options: ClientOptions) -> S3 {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_retry(retry)
            .with_client_options(options);
        for (k, v) in self.env_via(endpoint) {
            let key: AmazonS3ConfigKey = k
                .to_ascii_lowercase()
                .parse()
                .unwrap_or_else(|e| panic!("object_store does not read {k}: {e}"));
            builder = builder.with_config(key, v);
        }
        S3 {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            store: builder.build().expect("an S3 client for the fixture"),
        }
    }

    /// The scratch directory holding every node's data, metadata and log.
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The process id of node `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(|c| c.id())
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Node {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
    }
}

/// Garage exited because another process took one of its ports.
struct PortTaken(String);

/// A blocking `object_store` client of the fixture's bucket.
pub struct S3 {
    rt: tokio::runtime::Runtime,
    pub store: AmazonS3,
}

impl S3 {
    pub fn put(&self, key: &str, bytes: &[u8]) -> object_store::Result<()> {
        let payload = PutPayload::from(bytes.to_vec());
        self.rt
            .block_on(self.store.put(&ObjectPath::from(key), payload))
            .map(|_| ())
    }

    pub fn get(&self, key: &str) -> object_store::Result<Vec<u8>> {
        self.rt.block_on(async {
            let got = self.store.get(&ObjectPath::from(key)).await?;
            Ok(got.bytes().await?.to_vec())
        })
    }

    pub fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> object_store::Result<Vec<u8>> {
        self.rt
            .block_on(self.store.get_range(&ObjectPath::from(key), range))
            .map(|b| b.to_vec())
    }

    /// Every key under `prefix` ("" for the whole bucket) with its size, sorted.
    pub fn list(&self, prefix: &str) -> object_store::Result<Vec<(String, u64)>> {
        let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
        let mut all: Vec<(String, u64)> = self.rt.block_on(
            self.store
                .list(prefix.as_ref())
                .map_ok(|m| (m.location.to_string(), m.size))
                .try_collect(),
        )?;
        all.sort();
        Ok(all)
    }

    pub fn delete(&self, key: &str) -> object_store::Result<()> {
        self.rt.block_on(self.store.delete(&ObjectPath::from(key)))
    }
}

/// A port on 127.0.0.1 nothing listens on. Handed out once per test process, from
/// below the kernel's ephemeral range (32768 and up by default) so no outgoing
/// connection takes it before Garage binds it, starting at a place drawn from the
/// process id so that two test processes rarely probe the same ones; each is
/// probed with a bind, since another process may hold it.
fn free_port() -> u16 {
    const FIRST: u32 = 20000;
    const COUNT: u32 = 12000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2654435761) % COUNT;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < COUNT, "no free port left for garage");
        let port = (FIRST + (start + n) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `len` random bytes as hex, different in every call.
fn random_hex(len: usize) -> String {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let seed = format!(
        "{}-{nanos}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    );
    random_bytes(&seed, len)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One HTTP/1.1 request on a connection of its own: the status and the body (a
/// chunked body decoded).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut rest = &raw[end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("cut chunk"))?;
            let size_text = String::from_utf8_lossy(&rest[..eol]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size + 2 {
                return Err(bad("cut chunk"));
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        out
    } else {
        rest.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

// ---------------------------------------------------------------- self-tests

#[test]
fn a_single_node_serves_puts_gets_listings_and_ranges() {
    let started = Instant::now();
    let Some(g) = Garage::single() else { return };
    eprintln!("single node serving after {:?}", started.elapsed());
    let s3 = g.client();
    assert_eq!(s3.list("").unwrap(), vec![], "a new bucket is empty");
    let data = random_bytes("garage", 300_000);
    s3.put("p/a", &data).unwrap();
    s3.put("p/b", b"bee").unwrap();
    s3.put("q/c", b"").unwrap();
    assert_eq!(s3.get("p/a").unwrap(), data);
    assert_eq!(s3.get_range("p/a", 1000..1010).unwrap(), &data[1000..1010]);
    assert_eq!(
        s3.get_range("p/a", 299_990..300_000).unwrap(),
        &data[299_990..]
    );
    assert_eq!(
        s3.list("p").unwrap(),
        vec![("p/a".to_owned(), 300_000), ("p/b".to_owned(), 3)]
    );
    assert_eq!(s3.list("").unwrap().len(), 3);
    s3.delete("p/b").unwrap();
    assert!(matches!(
        s3.get("p/b"),
        Err(object_store::Error::NotFound { .. })
    ));

    // The variables are the standard ones, each read by object_store's from_env
    // (client_via builds from them), pointing at this node over plain HTTP.
    let env = g.env();
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for want in [
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ALLOW_HTTP",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let value = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_eq!(value("AWS_ENDPOINT_URL"), g.endpoint());
    assert_eq!(g.endpoint(), format!("http://{}", g.s3_addr(0)));
    assert_eq!(value("AWS_REGION"), g.region());
    assert_eq!(value("AWS_ACCESS_KEY_ID"), g.key_id());
    assert_eq!(value("AWS_SECRET_ACCESS_KEY"), g.secret());
    assert_eq!(g.repo_url("host-a/repo"), "s3://volsnap-test/host-a/repo");
    assert_eq!(g.bucket(), "volsnap-test");

    // A wrong secret is refused: the bucket is not open to anyone.
    let mut wrong = g.client_via(&g.endpoint(), false);
    wrong.store = AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_endpoint(g.endpoint())
        .with_region(REGION)
        .with_access_key_id(g.key_id())
        .with_secret_access_key("0".repeat(64))
        .with_allow_http(true)
        .with_retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        })
        .build()
        .unwrap();
    let refused = wrong.get("p/a").unwrap_err().to_string();
    assert!(refused.contains("403"), "{refused}");
}

#[test]
fn apply_env_replaces_every_inherited_aws_variable() {
    // Variables of the machine (a profile, a token, an S3 endpoint, which would win
    // over AWS_ENDPOINT_URL) must not reach the binary: run this test again in a
    // process that inherited some, and look at what a child of it sees.
    if std::env::var_os("AWS_PROFILE").is_none() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "garage::apply_env_replaces_every_inherited_aws_variable",
                "--test-threads=1",
            ])
            .env("AWS_PROFILE", "elsewhere")
            .env("AWS_SESSION_TOKEN", "stale")
            .env("AWS_ENDPOINT_URL_S3", "http://192.0.2.1:1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    let Some(g) = Garage::single() else { return };
    let mut cmd = Command::new("env");
    g.apply_env(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut seen: Vec<(String, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("AWS_"))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    seen.sort();
    let mut want = g.env();
    want.sort();
    assert_eq!(seen, want);
}

#[test]
fn dropping_the_fixture_kills_garage_and_removes_its_directory() {
    let Some(g) = Garage::single() else { return };
    let pid = g.pid(0).unwrap();
    let dir = g.dir().to_owned();
    let addr = g.s3_addr(0);
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(g);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "garage {pid} still runs"
    );
    assert!(
        TcpStream::connect(addr).is_err(),
        "something still listens on {addr}"
    );
}

#[test]
fn without_garage_the_object_storage_tests_fail_in_ci() {
    // The test binary itself, asked to run one Garage test with no garage on PATH:
    // it fails in CI, skips outside.
    let me = std::env::current_exe().unwrap();
    let empty = tempfile::tempdir().unwrap();
    for (ci, fails) in [("1", true), ("yes", true), ("true", true), ("", false)] {
        let out = Command::new(&me)
            .args([
                "--exact",
                "garage::dropping_the_fixture_kills_garage_and_removes_its_directory",
                "--test-threads=1",
                "--nocapture",
            ])
            .env("PATH", empty.path())
            .env("CI", ci)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(!out.status.success(), fails, "CI={ci:?}: {text}");
        assert!(text.contains("no garage on PATH"), "CI={ci:?}: {text}");
    }
}

/// The regular files under `dir`, recursively.
fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap())
                .map(|e| {
                    let t = e.file_type().unwrap();
                    if t.is_dir() {
                        files_under(&e.path())
                    } else {
                        usize::from(t.is_file())
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_cluster_of_three_keeps_serving_with_a_node_killed() {
    let started = Instant::now();
    let Some(mut g) = Garage::cluster3() else {
        return;
    };
    eprintln!("three nodes serving after {:?}", started.elapsed());
    let blocks = |g: &Garage, i: usize| files_under(&g.dir().join(format!("node{i}/data")));
    let before: Vec<usize> = (0..3).map(|i| blocks(&g, i)).collect();
    let data = random_bytes("cluster", 100_000);
    g.client().put("before", &data).unwrap();
    // Three replicas: every node comes to hold the object's data block (the third
    // may be written after the PUT returned, which waits for two), and serves it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..3).any(|i| blocks(&g, i) == before[i]) {
        assert!(Instant::now() < deadline, "a node holds no block");
        std::thread::sleep(Duration::from_millis(10));
    }
    for i in 0..3 {
        let s3 = g.client_via(&g.endpoint_of(i), false);
        assert_eq!(s3.get("before").unwrap(), data, "through node {i}");
    }

    // One node down: a quorum of 2 remains for reads and writes of every partition.
    g.kill_node(2);
    assert_eq!(g.pid(2), None);
    let s3 = g.client_via(&g.endpoint(), false);
    assert_eq!(s3.get("before").unwrap(), data);
    s3.put("while-2-down", b"written with node 2 down").unwrap();
    let s3_1 = g.client_via(&g.endpoint_of(1), false);
    assert_eq!(
        s3_1.get("while-2-down").unwrap(),
        b"written with node 2 down"
    );
    let health = g.health(0);
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["partitionsQuorum"], 256, "{health}");

    // Back: it serves what was written while it was down.
    let down = Instant::now();
    g.restart_node(2);
    eprintln!("a node restarted in {:?}", down.elapsed());
    assert_eq!(g.health(2)["status"], "healthy");
    let s3_2 = g.client_via(&g.endpoint_of(2), false);
    assert_eq!(s3_2.get("before").unwrap(), data);
    assert_eq!(
        s3_2.get("while-2-down").unwrap(),
        b"written with node 2 down"
    );
    s3_2.put("after", b"all up").unwrap();
    assert_eq!(s3.get("after").unwrap(), b"all up");
}

//! Starting gateways and simulators as real processes, and reading what
//! they recorded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tollgate_schemas::UsageEvent;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Secrets that must never show up in a log, an event or an error body.
pub const CLIENT_KEY: &str = "tg-canary-client-5f0c1d2e3a4b";
pub const OTHER_KEY: &str = "tg-canary-limited-9a8b7c6d5e4f";
pub const UPSTREAM_KEY: &str = "sk-canary-upstream-7e6d5c4b3a29";

/// A fresh directory for one test's files, under cargo's target tmp dir so
/// the test command can sweep all of them for canaries afterwards.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("e2e")
        .join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process killed when dropped.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
}

impl Proc {
    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Proc {
    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `tollgate simulate` process.
pub fn simulator(dir: &Path, name: &str, args: &[&str]) -> Proc {
    let mut all = vec!["simulate", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    // Every simulator demands the upstream key, so tests prove the gateway
    // sends it (and only there).
    spawn(
        &all,
        &dir.join(format!("{name}.log")),
        &[("TOLLGATE_SIM_API_KEY", UPSTREAM_KEY)],
    )
}

/// A running gateway and where it writes.
pub struct Gateway {
    pub proc: Proc,
    /// The gateway's Parquet lake (embedded mode): where events land.
    pub lake: PathBuf,
    pub log: PathBuf,
}

impl Gateway {
    /// Starts `tollgate serve` with `body` appended to a `[gateway]` and
    /// `[pipeline]` section that put everything in `dir`. `body` may use
    /// `${UPSTREAM_KEY}`, provided through the environment.
    pub fn start(dir: &Path, body: &str) -> Gateway {
        Gateway::start_with(dir, "serve", "", body, &[])
    }

    /// `tollgate <command>` (serve or proxy) with extra `[pipeline]` lines
    /// and extra environment.
    pub fn start_with(
        dir: &Path,
        command: &str,
        pipeline: &str,
        body: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        let lake = dir.join("lake");
        // Quick flushes unless the test sets its own.
        let lake_line = format!("{:?}", lake.display().to_string());
        let defaults: String = [
            ("flush_ms", "100"),
            ("commit_ms", "2"),
            ("lake", lake_line.as_str()),
        ]
        .iter()
        .filter(|(k, _)| !pipeline.contains(&format!("{k} =")))
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
        let config = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 65536\ninstance = \"e2e\"\n\n\
             [pipeline]\nspool_dir = {:?}\n{defaults}{pipeline}\n\n{body}",
            dir.join("spool").display().to_string(),
        );
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!(
            "gateway-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        ));
        // The upstream key reaches the child through its environment only.
        let mut all_env = vec![("UPSTREAM_KEY", UPSTREAM_KEY)];
        all_env.extend_from_slice(env);
        let proc = spawn(
            &[command, "--config", path.to_str().unwrap()],
            &log,
            &all_env,
        );
        Gateway { proc, lake, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proc.addr)
    }

    /// Waits until at least `n` events are written, then returns them all.
    pub fn events(&self, n: usize) -> Vec<UsageEvent> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let events = read_events(&self.lake);
            if events.len() >= n {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {n} events, have {}",
                events.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exactly `n` events, and makes sure no more arrive.
    pub fn exactly(&self, n: usize) -> Vec<UsageEvent> {
        let events = self.events(n);
        std::thread::sleep(Duration::from_millis(300));
        let again = read_events(&self.lake);
        assert_eq!(again.len(), n, "expected exactly {n} events: {again:#?}");
        assert_eq!(events.len(), n);
        again
    }
}

/// Spawns `tollgate args...` with stderr to `log`, and waits for the line
/// `... listening on http://ADDR` on stdout.
#[allow(clippy::zombie_processes)] // the child is waited for by `Proc`'s Drop
pub fn spawn(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Proc {
    let err = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("TOLLGATE_LOG", "info")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(err).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        // A child that never prints the line exits (and so closes stdout)
        // on its own error; the read cannot hang past that.
        let n = lines.read_line(&mut line).unwrap_or(0);
        if n == 0 {
            let status = child.wait();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("tollgate {args:?} exited early ({status:?}); log: {log}");
        }
        if let Some(rest) = line.trim().split("listening on http://").nth(1) {
            let addr = rest.parse().unwrap();
            std::thread::spawn(move || {
                let mut sink = String::new();
                let _ = lines.read_to_string(&mut sink);
            });
            return Proc { child, addr };
        }
    }
}

/// Every event in the Parquet lake at `lake`.
pub fn read_events(lake: &Path) -> Vec<UsageEvent> {
    if !lake.exists() {
        return Vec::new();
    }
    let mut events = tollgate_ingest::Lake::open(lake)
        .and_then(|l| l.read_events())
        .unwrap_or_else(|e| panic!("reading the lake {}: {e}", lake.display()));
    // Files keep rows by consumer and model; tests read them in the order
    // the requests were made.
    events.sort_by_key(|e| (e.ts_start, e.event_id));
    events
}

/// `sha256:` config form of a key.
pub fn hash(key: &str) -> String {
    use std::process::Command;
    let mut child = Command::new(BIN)
        .args(["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{key}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Consumers used by most tests: `app` may call anything, `limited` only
/// qwq-*.
pub fn consumers() -> String {
    format!(
        "[[consumers]]\nname = \"app\"\nteam = \"search\"\napi_keys = [\"{}\"]\n\n[[consumers]]\nname = \"limited\"\napi_keys = [\"{}\"]\nmodels = [\"qwq-*\"]\n",
        hash(CLIENT_KEY),
        hash(OTHER_KEY)
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

pub async fn post(
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = client()
        .post(gw.url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (status, headers, text)
}

/// POSTs a chat completion as the `app` consumer.
pub async fn chat_as_app(gw: &Gateway, body: &str) -> (u16, reqwest::header::HeaderMap, String) {
    post(gw, "/v1/chat/completions", Some(CLIENT_KEY), body).await
}

/// A gateway with `openai` upstreams at the given simulators, `routes`
/// (TOML) and the usual consumers.
pub fn gateway_with(dir: &Path, upstreams: &[(&str, &Proc)], routes: &str) -> Gateway {
    let mut body: String = upstreams
        .iter()
        .map(|(name, sim)| upstream(name, sim))
        .collect();
    body.push_str(routes);
    body.push_str(&consumers());
    Gateway::start(dir, &body)
}

/// A gateway routing `qwq-32b` to one simulator.
pub fn qwq_gateway(dir: &Path, sim: &Proc) -> Gateway {
    gateway_with(
        dir,
        &[("primary", sim)],
        "[[routes]]\nmodel = \"qwq-32b\"\ntargets = [{ upstream = \"primary\" }]\n\n",
    )
}

pub fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "How much did search spend on reasoning tokens?"}],
    })
    .to_string()
}

/// One raw HTTP/1.1 exchange, for request targets a client library would
/// normalise. Returns the status and the body.
pub fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Parses the `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Every file under `dir`, concatenated, for secret sweeps.
pub fn all_text_under(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.push_str(&all_text_under(&p));
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    out
}

pub fn assert_no_secrets(text: &str, what: &str) {
    for s in [CLIENT_KEY, OTHER_KEY, UPSTREAM_KEY] {
        assert!(!text.contains(s), "{what} contains a secret");
    }
}

/// TOML for an `openai` upstream pointing at a simulator process.
pub fn upstream(name: &str, sim: &Proc) -> String {
    format!(
        "[upstreams.{name}]\nkind = \"openai\"\nbase_url = \"http://{}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\nfirst_byte_timeout_ms = 3000\nidle_timeout_ms = 3000\n\n",
        sim.addr
    )
}

/// The cost of tokens at $/1M prices, computed independently of the
/// gateway's code.
pub fn dollars(
    input: u64,
    cached: u64,
    output: u64,
    p_in: &str,
    p_cached: &str,
    p_out: &str,
) -> rust_decimal::Decimal {
    use rust_decimal::Decimal;
    use std::str::FromStr;
    let m = Decimal::from(1_000_000u64);
    (Decimal::from(input - cached) * Decimal::from_str(p_in).unwrap()
        + Decimal::from(cached) * Decimal::from_str(p_cached).unwrap()
        + Decimal::from(output) * Decimal::from_str(p_out).unwrap())
        / m
}

/// Saves a response body into the test's directory for the secret sweep.
pub fn keep(dir: &Path, body: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("bodies.txt"))
        .unwrap();
    writeln!(f, "{body}").unwrap();
}

//! A canned upstream on 127.0.0.1: it answers each request with the reply
//! scripted for the request's `user` field (which the gateway forwards
//! untouched), byte for byte, with pauses and abrupt closes where the
//! script says. It reproduces what real providers and the proxies in front
//! of them send: errors inside a 200, HTML pages, usage in odd places,
//! keep-alive comments, every SSE framing, streams cut mid-line.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// One piece of a scripted reply body.
#[derive(Clone, Debug)]
pub enum Part {
    /// Bytes written as one HTTP chunk.
    Bytes(Vec<u8>),
    Pause(Duration),
    /// Close the connection here, without ending the body.
    Break,
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<String>,
    pub parts: Vec<Part>,
}

impl Reply {
    pub fn new(status: u16, content_type: &str, body: &str) -> Reply {
        Reply {
            status,
            content_type: Some(content_type.to_string()),
            parts: vec![Part::Bytes(body.as_bytes().to_vec())],
        }
    }

    pub fn json(body: &Value) -> Reply {
        Reply::new(200, "application/json", &body.to_string())
    }

    /// An event stream: each item is written as it is, one chunk each.
    pub fn sse(parts: Vec<Part>) -> Reply {
        Reply {
            status: 200,
            content_type: Some("text/event-stream".into()),
            parts,
        }
    }
}

/// `s` as a body part.
pub fn raw(s: &str) -> Part {
    Part::Bytes(s.as_bytes().to_vec())
}

/// One `data:` event with `json` as its payload.
pub fn data(json: &Value) -> Part {
    raw(&format!("data: {json}\n\n"))
}

pub fn pause_ms(ms: u64) -> Part {
    Part::Pause(Duration::from_millis(ms))
}

/// A chat chunk from `model` with one choice's delta.
pub fn delta(model: &str, index: u32, delta: Value) -> Value {
    serde_json::json!({
        "id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 1,
        "model": model, "choices": [{"index": index, "delta": delta, "finish_reason": null}],
    })
}

/// A non-streamed chat answer from `model`.
pub fn answer(model: &str, content: &str, usage: Option<Value>) -> Value {
    let mut v = serde_json::json!({
        "id": "chatcmpl-canned", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    });
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

pub struct Canned {
    pub addr: SocketAddr,
    script: Arc<Mutex<HashMap<String, Reply>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Canned {
    pub fn start() -> Canned {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let script: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (s, h) = (script.clone(), hits.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, h) = (s.clone(), h.clone());
                std::thread::spawn(move || serve(conn, &s, &h));
            }
        });
        Canned { addr, script, hits }
    }

    /// Requests whose `user` is `case` get `reply`.
    pub fn on(&self, case: &str, reply: Reply) {
        self.script.lock().unwrap().insert(case.to_string(), reply);
    }

    /// How many requests came for `case`.
    pub fn hits(&self, case: &str) -> usize {
        self.hits.lock().unwrap().get(case).copied().unwrap_or(0)
    }

    /// TOML for an `openai` upstream named `name` pointing here.
    pub fn upstream(&self, name: &str) -> String {
        format!(
            "[upstreams.{name}]\nkind = \"openai\"\nbase_url = \"http://{}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\nfirst_byte_timeout_ms = 5000\nidle_timeout_ms = 5000\n\n",
            self.addr
        )
    }
}

fn serve(
    conn: TcpStream,
    script: &Mutex<HashMap<String, Reply>>,
    hits: &Mutex<HashMap<String, usize>>,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let case = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["user"].as_str().map(str::to_string))
        .unwrap_or_default();
    *hits.lock().unwrap().entry(case.clone()).or_default() += 1;
    let reply = script.lock().unwrap().get(&case).cloned();
    let reply = reply
        .unwrap_or_else(|| Reply::new(500, "text/plain", &format!("no canned reply for {case:?}")));
    let _ = write_reply(conn, &reply);
}

fn write_reply(mut conn: TcpStream, reply: &Reply) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} Canned\r\n", reply.status);
    if let Some(ct) = &reply.content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    conn.write_all(head.as_bytes())?;
    conn.flush()?;
    for part in &reply.parts {
        match part {
            Part::Bytes(b) if b.is_empty() => {}
            Part::Bytes(b) => {
                conn.write_all(format!("{:x}\r\n", b.len()).as_bytes())?;
                conn.write_all(b)?;
                conn.write_all(b"\r\n")?;
                conn.flush()?;
            }
            Part::Pause(d) => std::thread::sleep(*d),
            Part::Break => {
                // Let what was written reach the gateway, then reset.
                std::thread::sleep(Duration::from_millis(100));
                let _ = conn.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
        }
    }
    conn.write_all(b"0\r\n\r\n")?;
    conn.flush()
}

//! A real Kafka-protocol broker (tansu, SQLite storage) per test, on its
//! own loopback port and directory, plus a plain rdkafka producer and
//! consumer for what a test sends or counts directly.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// The tansu binary: `$TOLLGATE_TANSU`, else `tansu` on PATH, else cargo's.
fn tansu() -> PathBuf {
    if let Ok(p) = std::env::var("TOLLGATE_TANSU") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("tansu"))
        .find(|p| p.exists());
    on_path.unwrap_or_else(|| {
        Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/tansu")
    })
}

pub struct Broker {
    child: Option<Child>,
    pub addr: String,
    dir: PathBuf,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        let dir = dir.join("broker");
        std::fs::create_dir_all(&dir).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut b = Broker {
            child: None,
            addr: format!("127.0.0.1:{port}"),
            dir,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let url = format!("tcp://{}", self.addr);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .unwrap();
        let child = Command::new(tansu())
            .current_dir(&self.dir)
            .args([
                "broker",
                "--storage-engine=sqlite://tansu.db",
                &format!("--listener-url={url}"),
                &format!("--advertised-listener-url={url}"),
                "--silent",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting tansu ({}): {e}; scripts/test.sh installs it",
                    tansu().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker (SIGKILL: it gets no say in the matter).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The `[pipeline]` line pointing a gateway or ingester here. A
    /// `member` name gives static group membership: tansu does not expire
    /// the session of a member that died without leaving, so a restarted
    /// process must come back under the same name.
    pub fn pipeline(&self, topic: &str, group: &str, member: Option<&str>) -> String {
        let member = member.map_or(String::new(), |m| format!(", member = \"{m}\""));
        format!(
            "kafka = {{ brokers = \"{}\", topic = \"{topic}\", group = \"{group}\", partitions = 4{member} }}\n",
            self.addr
        )
    }

    /// Produces `messages` as (key, payload) and waits for every delivery.
    pub fn produce(&self, topic: &str, messages: &[(String, Vec<u8>)]) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("linger.ms", "5")
            .create()
            .unwrap();
        for (k, v) in messages {
            let mut rec = BaseRecord::to(topic)
                .key(k.as_bytes())
                .payload(v.as_slice());
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => panic!("producing to {topic}: {e}"),
                }
            }
        }
        producer.flush(Duration::from_secs(60)).unwrap();
    }

    /// Counts every message in `topic` (all partitions, from the start):
    /// the raw-consume baseline, and the check for duplicates in Kafka.
    pub fn count(&self, topic: &str, partitions: i32) -> usize {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("group.id", format!("count-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut ends = Vec::new();
        for p in 0..partitions {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            ends.push(high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let total: i64 = ends.iter().sum();
        let mut seen = 0i64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen < total && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let _ = m.offset();
                seen += 1;
            }
        }
        seen as usize
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

//! Real `redis-server` processes for the cluster tests, on free loopback
//! ports, with AOF on, stopped by PID. The binary is `redis-server` from
//! PATH or `$SWITCHYARD_REDIS_SERVER`. Commands go over a raw RESP socket,
//! so the tests do not share the broker's Redis client.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::WAIT;

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

fn redis_binary() -> String {
    std::env::var("SWITCHYARD_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free port whose Redis Cluster bus port (port + 10000) is free and valid too.
pub fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let port = free_port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a Redis Cluster node");
}

impl Redis {
    /// Starts a Redis with AOF (`appendfsync always`) in a fresh directory.
    pub async fn start() -> Redis {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> Redis {
        let mut dir = tempfile::tempdir().unwrap();
        let mut last = None;
        for _ in 0..5 {
            let mut r = Redis {
                child: None,
                port: free_port(),
                dir,
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            match r.launch().await {
                Ok(()) => return r,
                Err(e) => {
                    last = Some(e);
                    dir = r.take_dir();
                }
            }
        }
        panic!("redis-server did not start: {last:?}");
    }

    fn take_dir(self) -> tempfile::TempDir {
        let mut me = self;
        me.kill();
        std::mem::replace(&mut me.dir, tempfile::tempdir().unwrap())
    }

    async fn launch(&mut self) -> Result<(), String> {
        let child = Command::new(redis_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("spawn {}: {e} (install redis-server or set SWITCHYARD_REDIS_SERVER)", redis_binary())
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("redis-server exited: {status}"));
            }
            if let Ok(Ok(reply)) =
                tokio::time::timeout(Duration::from_millis(500), self.try_cmd(&["PING"])).await
            {
                if reply.starts_with("+PONG") {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("redis-server did not answer PING".into())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGTERM (Redis writes its AOF and exits) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory (its AOF is reloaded).
    pub async fn restart(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.launch().await {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("redis-server did not restart: {e}"),
                Err(_) => {
                    self.kill();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// One command; returns the raw RESP reply.
    pub async fn cmd(&self, args: &[&str]) -> String {
        tokio::time::timeout(WAIT, self.try_cmd(args))
            .await
            .expect("redis answers in time")
            .expect("redis command")
    }

    async fn try_cmd(&self, args: &[&str]) -> std::io::Result<String> {
        resp_cmd(self.port, args).await
    }
}

/// Sends one command to 127.0.0.1:`port` and reads one reply (whatever
/// arrives within 200 ms of the first bytes).
pub async fn resp_cmd(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await?;
    let mut out = buf[..n].to_vec();
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

//! Chaos tests on the project's own test hosts: two network namespaces
//! joined by a veth pair (made and torn down here, with `ip` and
//! `iptables`; CI installs them and runs as root). The broker runs in one,
//! clients and publishers in the other, behind random packet loss
//! (`iptables -m statistic`) and a userspace proxy that adds delay and
//! stalls (`tests/chaos/delay_proxy.py`; this kernel has no netem). All
//! traffic stays inside the namespaces.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{spawn_logged, WAIT};

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, `a` (the broker's host) and `b` (the clients'), on one
/// /24, torn down on drop with every process started in them.
struct Lab {
    a: String,
    b: String,
    veth_b: String,
    addr_a: String,
    children: Vec<Child>,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| {
        panic!("{args:?}: {e} (the chaos tests need iproute2 and iptables; scripts/test installs them)")
    });
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn repo_file(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel).display().to_string()
}

/// The load generator, built beside the broker (`cargo test --workspace`),
/// or where `SWITCHYARD_LOAD_BIN` says.
fn load_bin() -> String {
    let path = std::env::var("SWITCHYARD_LOAD_BIN").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_BIN_EXE_switchyard")).with_file_name("switchyard-load")
    });
    assert!(path.exists(), "{} is missing: build the workspace (cargo build --workspace)", path.display());
    path.display().to_string()
}

impl Lab {
    fn new() -> Lab {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let (a, b) = (format!("sya{id}"), format!("syb{id}"));
        let (veth_a, veth_b) = (format!("va{id}"), format!("vb{id}"));
        let net = format!("10.{}.{}", 200 + n, std::process::id() % 250);
        let (addr_a, addr_b) = (format!("{net}.1"), format!("{net}.2"));
        sh(&["ip", "netns", "add", &a]);
        sh(&["ip", "netns", "add", &b]);
        let lab = Lab { a, b, veth_b: veth_b.clone(), addr_a: addr_a.clone(), children: Vec::new() };
        sh(&[
            "ip", "link", "add", &veth_a, "netns", &lab.a, "type", "veth", "peer", "name", &veth_b, "netns",
            &lab.b,
        ]);
        for (ns, dev, addr) in [(&lab.a, &veth_a, &addr_a), (&lab.b, &veth_b, &addr_b)] {
            sh(&["ip", "-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn cmd(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Starts the broker in `a` on the veth address; returns its pid and addresses.
    fn broker(&mut self, extra: &[&str]) -> (u32, String, String) {
        let mut cmd = Lab::cmd(&self.a, env!("CARGO_BIN_EXE_switchyard"));
        let bind = format!("{}:0", self.addr_a);
        cmd.args(["--listen", &bind, "--api-listen", &bind, "--allow-anonymous", "--api-key", "k"])
            .args(extra);
        let (child, client, api) = spawn_logged(cmd);
        let pid = child.id();
        self.children.push(child);
        (pid, client, api)
    }

    /// Starts a helper in `ns` and returns the first line it prints.
    fn helper(&mut self, ns_b: bool, args: &[&str]) -> String {
        let ns = if ns_b { self.b.clone() } else { self.a.clone() };
        let mut child =
            Lab::cmd(&ns, args[0]).args(&args[1..]).stdout(Stdio::piped()).spawn().expect("spawn helper");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        self.children.push(child);
        rx.recv_timeout(WAIT).expect("helper started").trim().to_string()
    }

    /// Runs `iptables` in `b`.
    fn iptables_b(&self, rule: &[&str]) {
        let mut args = vec!["ip", "netns", "exec", &self.b, "iptables"];
        args.extend_from_slice(rule);
        sh(&args);
    }

    /// `GET /v1/stats` from inside `a`.
    fn stats(&self, api: &str) -> Value {
        let out = Lab::cmd(&self.a, "python3")
            .args([&repo_file("tests/chaos/http_get.py"), &format!("http://{api}/v1/stats"), "k"])
            .output()
            .expect("http_get");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Runs the load generator in `b`; asserts it passed and returns its JSON summary.
    fn load(&self, args: &[&str]) -> Value {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("summary.json");
        let out = Lab::cmd(&self.b, &load_bin())
            .args(args)
            .args(["--api-key", "k", "--json", &json.display().to_string()])
            .output()
            .expect("switchyard-load runs");
        let text =
            format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("{text}");
        assert!(out.status.success(), "switchyard-load failed:\n{text}");
        let v: Value = serde_json::from_slice(&std::fs::read(&json).expect("summary")).expect("JSON summary");
        for k in ["lost", "duplicated", "reordered", "misrouted"] {
            assert_eq!(v[k], 0, "{k} in {v}\n{text}");
        }
        assert!(v["received"].as_u64().unwrap_or(0) > 0, "{v}");
        v
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Polls `f` every 50 ms until it holds or `WAIT` passes.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while t0.elapsed() < WAIT {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for: {what}");
}

#[test]
fn chaos_clients_behind_loss_and_a_delaying_proxy_get_everything_once_in_order() {
    let mut lab = Lab::new();
    for chain in ["INPUT", "OUTPUT"] {
        lab.iptables_b(&[
            "-A",
            chain,
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.05",
            "-j",
            "DROP",
        ]);
    }
    let (_, client, api) = lab.broker(&["--shards", "2"]);
    // 20 ms each way, and one chunk in 100 stalled 300 ms more.
    let proxy = repo_file("tests/chaos/delay_proxy.py");
    let port = lab.helper(true, &["python3", &proxy, "127.0.0.1:0", &client, "20", "0.01", "300"]);
    let v = lab.load(&[
        "run",
        "--target",
        &format!("ws://127.0.0.1:{port}"),
        "--api",
        &format!("http://{api}"),
        "--users",
        "20",
        "--conns-per-user",
        "2",
        "--publishers",
        "2",
        "--rate",
        "200",
        "--duration",
        "5s",
        "--churn",
        "4",
        "--retry-timeout",
        "2s",
        "--drain",
        "20s",
    ]);
    assert!(v["resumes"].as_u64().unwrap_or(0) > 0, "churned reconnects resumed through the proxy: {v}");
}

#[test]
fn chaos_a_client_whose_network_vanishes_is_closed_by_the_idle_timeout_and_freed() {
    vanished_client_is_closed_and_freed("connections", "ws");
}

#[test]
fn chaos_an_sse_client_whose_network_vanishes_is_found_by_its_writes_and_freed() {
    // An SSE client cannot send, so no idle timeout applies to it: the
    // broker finds it dead when its pings go unacknowledged (TCP_USER_TIMEOUT
    // set to --idle-timeout on client sockets).
    vanished_client_is_closed_and_freed("sse_connections", "sse");
}

/// An idle client of `transport` (`tests/chaos/idle_client.py`, counted
/// under `counter` in the stats) connects from the second namespace, then its link goes down — no FIN, no
/// RST, nothing: the broker closes it and frees its file descriptor, and
/// once the link is back well-behaved clients of that transport are served.
fn vanished_client_is_closed_and_freed(counter: &str, transport: &str) {
    let mut lab = Lab::new();
    let (pid, client, api) = lab.broker(&["--ping-interval", "200ms", "--idle-timeout", "1s"]);
    eventually("the broker answers stats", || lab.stats(&api)["connections"] == 0);
    let fds0 = fd_count(pid);
    let helper = repo_file("tests/chaos/idle_client.py");
    assert_eq!(lab.helper(true, &["python3", &helper, &client, "ghost", transport]), "ready");
    assert_eq!(lab.stats(&api)[counter], 1);
    sh(&["ip", "-n", &lab.b, "link", "set", &lab.veth_b, "down"]);
    eventually("the vanished client is closed", || lab.stats(&api)["connections"] == 0);
    eventually("its file descriptor is freed", || fd_count(pid) <= fds0);
    sh(&["ip", "-n", &lab.b, "link", "set", &lab.veth_b, "up"]);
    let target = format!("ws://{client}");
    let api_url = format!("http://{api}");
    lab.load(&[
        "run",
        "--target",
        &target,
        "--api",
        &api_url,
        "--users",
        "5",
        "--rate",
        "100",
        "--duration",
        "1s",
        "--transport",
        transport,
    ]);
}

#[test]
fn chaos_a_retrying_publisher_behind_a_lossy_link_causes_no_duplicate() {
    let mut lab = Lab::new();
    let (_, client, api) = lab.broker(&["--shards", "2"]);
    // 20% of the publisher's packets (to and from the API port) are dropped;
    // clients connect cleanly.
    let api_port = api.rsplit(':').next().unwrap_or_default().to_string();
    for (chain, dir) in [("OUTPUT", "--dport"), ("INPUT", "--sport")] {
        lab.iptables_b(&[
            "-A",
            chain,
            "-p",
            "tcp",
            dir,
            &api_port,
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.2",
            "-j",
            "DROP",
        ]);
    }
    let v = lab.load(&[
        "run",
        "--target",
        &format!("ws://{client}"),
        "--api",
        &format!("http://{api}"),
        "--users",
        "10",
        "--publishers",
        "2",
        "--rate",
        "300",
        "--duration",
        "5s",
        "--retry-timeout",
        "100ms",
        "--drain",
        "20s",
    ]);
    assert!(v["retried"].as_u64().unwrap_or(0) > 0, "the lossy link made publishers retry: {v}");
    let stats = lab.stats(&api);
    let dups: u64 =
        stats["shards"].as_array().map_or(0, |s| s.iter().filter_map(|x| x["duplicates"].as_u64()).sum());
    eprintln!("publisher retries: {}, duplicates the broker dropped: {dups}", v["retried"]);
}

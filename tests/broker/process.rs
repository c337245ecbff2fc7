//! The real binary: flags, refusals, and SIGTERM.

use std::process::Command;

use serde_json::json;

use crate::util::*;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

#[test]
fn bad_flag_values_exit_2_naming_the_flag() {
    for (args, flag) in [
        (vec!["--ping-interval", "soon"], "--ping-interval"),
        (vec!["--max-payload", "12GiB"], "--max-payload"),
        (vec!["--listen", "nowhere"], "--listen"),
        (vec!["--log-format", "xml"], "--log-format"),
        (vec!["--history-size", "2000000"], "--history-size"),
        (vec!["--history-ttl", "100000h"], "--history-ttl"),
        (vec!["--history-memory", "0"], "--history-memory"),
        (vec!["--echo-path", "/ws"], "--echo-path"),
        (vec!["--echo-path", "/echo", "--listen", "0.0.0.0:0", "--allow-anonymous"], "--allow-public-echo"),
        (
            vec!["--api-tls-cert", "/nonexistent/cert.pem", "--api-tls-key", "/nonexistent/key.pem"],
            "--api-tls-cert",
        ),
        (vec!["--max-queue-bytes", "1KiB"], "--max-queue-bytes"),
        (vec!["--tls-cert", "/nonexistent/cert.pem"], "--tls-key"), // needs its pair
        (vec!["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], "--tls-cert"),
    ] {
        let out = Command::new(BIN).args(&args).output().expect("runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}

#[test]
fn env_vars_set_flags() {
    let out = Command::new(BIN).env("SWITCHYARD_IDLE_TIMEOUT", "never").output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--idle-timeout"));
}

#[test]
fn unsafe_exposure_is_refused_with_2() {
    let out = Command::new(BIN).args(["--listen", "0.0.0.0:0"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
    let out = Command::new(BIN).args(["--api-listen", "0.0.0.0:0"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-listen"));
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--api-listen",
        "--jwt-secret",
        "--api-key",
        "--max-queue",
        "--tls-cert",
        "--echo-path",
        "SWITCHYARD_LISTEN",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[tokio::test]
async fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let (mut child, client, api) = spawn_binary(&["--shards", "2"]);
    let mut clients = Vec::new();
    for i in 0..6 {
        let url = format!("ws://{client}/ws?user=t{i}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
        assert_eq!(next_json(&mut ws).await["type"], "welcome");
        clients.push(ws);
    }
    // An event queued just before the signal is flushed before the close.
    let api: std::net::SocketAddr = api.parse().unwrap();
    let body = json!({"user": "t0", "event": "last"}).to_string();
    let (status, _, _) = http(api, "POST", "/v1/publish", body.into(), None).await;
    assert_eq!(status, 200);
    sigterm(&child);
    assert_eq!(next_json(&mut clients[0]).await["event"], "last");
    for ws in clients.iter_mut() {
        assert_eq!(close_code(ws).await, 1001);
    }
    assert_eq!(exit_code(&mut child), Some(0), "exit status after SIGTERM");
}

/// The exit code of `child`, waited for at most [`WAIT`] (then killed: None).
fn exit_code(child: &mut std::process::Child) -> Option<i32> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return s.code(),
            _ if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                return None;
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}

fn sigterm(child: &std::process::Child) {
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(term.success());
}

/// The handlers are in place before the broker says it is listening: a
/// SIGTERM sent the moment the address is logged is a clean shutdown (exit
/// 0), not the signal's default action (killed, no exit code). CI once lost
/// that race on a loaded machine.
#[test]
fn sigterm_at_the_listening_line_is_a_clean_exit() {
    for _ in 0..10 {
        let (mut child, _, _) = spawn_binary(&["--shards", "1"]);
        sigterm(&child);
        assert_eq!(exit_code(&mut child), Some(0), "exit status after an early SIGTERM");
    }
}

/// A log collector that goes away (stderr closed) costs the log lines, not
/// the broker: clients are still served and SIGTERM still exits 0. (A failed
/// log write used to fall back to `eprintln!`, which panics.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_does_not_stop_the_broker() {
    let (mut child, client, api) = spawn_then_close_stderr(loopback_broker(&["--shards", "2"]));
    // Connections, refusals and publishes all log something now and then.
    for i in 0..4 {
        let (status, body) = raw_upgrade(client.parse().unwrap(), "/ws?user=", "").await;
        assert!((400..500).contains(&status), "{status} {body}");
        let (mut ws, _) = connect_welcomed(&format!("ws://{client}/ws?user=c{i}")).await;
        let body = json!({"user": format!("c{i}"), "event": "e", "data": i}).to_string();
        let (status, _, _) = http(api.parse().unwrap(), "POST", "/v1/publish", body.into(), None).await;
        assert_eq!(status, 200);
        assert_eq!(next_events(&mut ws, 1).await[0]["data"], i);
    }
    sigterm(&child);
    assert_eq!(exit_code(&mut child), Some(0), "exit status after SIGTERM with stderr closed");
}

#[tokio::test]
async fn token_subcommand_mints_a_token_the_broker_accepts() {
    let out = Command::new(BIN)
        .args(["token", "--user", "carol", "--ttl", "5m", "--jwt-secret", "s3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (mut child, client, _api) = spawn_binary(&["--jwt-secret", "s3"]);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{client}/ws?token={token}")).await.expect("accepted");
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["user"], "carol");
    // A secret file works the same; bad input exits 2 naming the flag.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3\n").unwrap();
    let file = dir.path().join("secret").display().to_string();
    let out =
        Command::new(BIN).args(["token", "--user", "carol", "--jwt-secret-file", &file]).output().unwrap();
    assert!(out.status.success());
    for (args, flag) in [
        (vec!["token", "--user", "bad user", "--jwt-secret", "s"], "--user"),
        (vec!["token", "--user", "u", "--ttl", "soon", "--jwt-secret", "s"], "--ttl"),
        (vec!["token", "--user", "u"], "--jwt-secret"),
        (vec!["token", "--user", "u", "--jwt-secret-file", "/nonexistent/secret"], "--jwt-secret-file"),
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(flag), "{args:?}");
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

#[test]
fn check_config_validates_like_start_up_without_listening() {
    // The port is taken: a broker could not start, but check-config does not bind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN).args(["check-config", "--listen", &addr, "--shards", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
    for (args, flag) in [
        (vec!["check-config", "--listen", "0.0.0.0:0"], "--listen"),
        (vec!["check-config", "--max-queue-bytes", "10"], "--max-queue-bytes"),
        (
            vec!["check-config", "--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"],
            "--tls-cert",
        ),
        (vec!["check-config", "--ping-interval", "soon"], "--ping-interval"),
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(flag),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The broker turns transparent huge pages off for itself (a fault on a
/// fresh 2 MiB huge page stalled a shard ~5 ms: PERFORMANCE.md).
#[test]
fn the_broker_runs_without_transparent_huge_pages() {
    let (mut child, _, _) = spawn_binary(&[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("proc status");
    let _ = child.kill();
    let _ = child.wait();
    let line =
        status.lines().find(|l| l.starts_with("THP_enabled:")).expect("the kernel reports THP_enabled");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}

//! The operator subcommands beside the broker itself (contract §12):
//! `switchyard token` mints a client token the broker accepts, and
//! `switchyard check-config` validates flags and files exactly as start-up
//! does, without listening. `switchyard [flags]` (no subcommand) is the
//! broker, as always; `main` dispatches on the first argument.
//!
//! Both print to stdout on success and exit 0, or print why to stderr and
//! exit 2 (naming the flag), like a refused start-up.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::config::{parse_duration, Config, Flags};
use crate::protocol::UserId;

/// Prints an HS256 token for a user, accepted by a broker with the same secret.
#[derive(Debug, Parser)]
#[command(name = "switchyard token")]
pub struct TokenArgs {
    /// The user ID (the token's `sub`).
    #[arg(long)]
    pub user: String,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// The broker's --jwt-secret.
    #[arg(
        long,
        env = "SWITCHYARD_JWT_SECRET",
        hide_env_values = true,
        required_unless_present = "jwt_secret_file"
    )]
    pub jwt_secret: Option<String>,
    /// A file holding the broker's secret (trailing newline ignored).
    #[arg(long, env = "SWITCHYARD_JWT_SECRET_FILE", conflicts_with = "jwt_secret")]
    pub jwt_secret_file: Option<PathBuf>,
}

fn refuse(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("switchyard: {message}");
    ExitCode::from(2)
}

/// `switchyard token ...`; `args[0]` is `token`.
pub fn token(args: &[OsString]) -> ExitCode {
    let a = match TokenArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let user = match UserId::parse(&a.user) {
        Ok(u) => u,
        Err(e) => return refuse(format_args!("--user {:?}: {e}", a.user)),
    };
    if a.ttl.is_zero() {
        return refuse("--ttl must be greater than zero");
    }
    let secret = match (a.jwt_secret, a.jwt_secret_file) {
        (Some(s), _) => s.into_bytes(),
        (None, Some(path)) => match std::fs::read(&path) {
            Ok(raw) => raw.trim_ascii_end().to_vec(),
            Err(e) => return refuse(format_args!("--jwt-secret-file {}: {e}", path.display())),
        },
        (None, None) => return refuse("give --jwt-secret or --jwt-secret-file"),
    };
    if secret.is_empty() {
        return refuse("--jwt-secret must not be empty");
    }
    match crate::auth::mint(&secret, &user, a.ttl) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => refuse(format_args!("cannot sign the token: {e}")),
    }
}

/// `switchyard check-config [flags]`; `args[0]` is `check-config`.
pub fn check_config(args: &[OsString]) -> ExitCode {
    let flags = match Flags::try_parse_from(args) {
        Ok(f) => f,
        Err(e) => e.exit(),
    };
    let config = match Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => return refuse(e),
    };
    match crate::broker::validate(&config) {
        Ok(()) => {
            println!(
                "configuration OK: clients on {}, API on {}, {} shards{}",
                config.listen,
                config.api_listen,
                config.shards,
                if config.jwt_secret.is_none() { ", dev mode (no --jwt-secret)" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => refuse(e),
    }
}

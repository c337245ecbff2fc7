//! A minimal client for the README walkthrough: connects to the broker as a
//! user (dev mode), or with a token, and prints every frame it receives.
//!
//! `cargo run --example watch -- u1 [ws://127.0.0.1:8080]`
//! `cargo run --example watch -- --token TOKEN [ws://127.0.0.1:8080]`

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let first = args.next().unwrap_or_else(|| "u1".to_string());
    let query = if first == "--token" {
        format!("token={}", args.next().ok_or("--token needs a value")?)
    } else {
        format!("user={first}")
    };
    let base = args.next().unwrap_or_else(|| "ws://127.0.0.1:8080".to_string());
    let url = format!("{base}/ws?{query}");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
    eprintln!("connected to {url}; waiting for events (Ctrl-C to stop)");
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(t) => println!("{t}"),
            Message::Close(c) => {
                println!("closed: {c:?}");
                break;
            }
            _ => {}
        }
    }
    Ok(())
}

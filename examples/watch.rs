//! A minimal client for the README walkthrough: connects to the broker as a
//! user (dev mode) and prints every frame it receives.
//!
//! `cargo run --example watch -- u1 [ws://127.0.0.1:8080]`

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let user = args.next().unwrap_or_else(|| "u1".to_string());
    let base = args.next().unwrap_or_else(|| "ws://127.0.0.1:8080".to_string());
    let url = format!("{base}/ws?user={user}");
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

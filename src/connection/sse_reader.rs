//! The read side of a `GET /sse` stream: an SSE client sends nothing after
//! its request, so this only watches for the peer going away (EOF or an
//! error) and discards anything it does send. It holds no buffer while the
//! socket is quiet, and never stamps `last_recv`: the idle timeout does not
//! apply to a client that cannot send (dead peers are found by writes).

use std::rc::Rc;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{Conn, ReadSide};

/// Runs until the client closes or the connection ends.
pub async fn run(conn: Rc<Conn>, mut read: ReadSide, _leftover: Bytes) {
    loop {
        if read.ready().await.is_err() {
            conn.abandon();
            return;
        }
        let mut scratch = [0u8; 512];
        match read.read(&mut scratch).await {
            Ok(0) | Err(_) => {
                conn.abandon();
                return;
            }
            Ok(_) => continue,
        }
    }
}

//! Names of everything the Redis engine keeps in Redis, in one place.
//!
//! Every key of a user carries the user ID as its hash tag (`{alice}`), so in
//! a Redis Cluster all of a user's keys sit in one slot and one Lua script
//! may touch them together. User IDs cannot contain braces (contract §3), and
//! `--cluster-prefix` cannot either, so the tag is always the user ID.

use crate::protocol::UserId;

/// Key and channel names under one `--cluster-prefix`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// The four keys of one user.
pub struct UserKeys {
    /// Hash: `e` (epoch), `s` (last seq).
    pub meta: String,
    /// Stream: one entry per held event, ID `<seq>-0`.
    pub stream: String,
    /// Sorted set: idempotency key → seq.
    pub ids: String,
    /// Sorted set: `<node>/<conn>` → attach order, the user's live connections.
    pub conns: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.to_string() }
    }

    pub fn user(&self, user: &UserId) -> UserKeys {
        let base = format!("{}:{{{}}}", self.prefix, user.as_str());
        UserKeys {
            meta: format!("{base}:m"),
            stream: format!("{base}:s"),
            ids: format!("{base}:i"),
            conns: format!("{base}:c"),
        }
    }

    /// The Pub/Sub channel carrying a user's events and control messages.
    pub fn channel(&self, user: &UserId) -> String {
        format!("{}:ch:{}", self.prefix, user.as_str())
    }

    /// The user a channel name belongs to.
    pub fn user_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.prefix)?.strip_prefix(":ch:")
    }

    /// The channel every node listens on for broadcasts.
    pub fn broadcast_channel(&self) -> String {
        format!("{}:broadcast", self.prefix)
    }

    /// Sorted set: node id → last heartbeat (unix ms).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_keys_share_one_hash_tag_and_its_channel_maps_back() {
        let keys = Keys::new("sy");
        let user = UserId::parse("a:b@c").unwrap();
        let k = keys.user(&user);
        for key in [&k.meta, &k.stream, &k.ids, &k.conns] {
            assert!(key.starts_with("sy:{a:b@c}:"), "{key}");
        }
        let ch = keys.channel(&user);
        assert_eq!(keys.user_of_channel(&ch), Some("a:b@c"));
        assert_eq!(keys.user_of_channel("other:ch:x"), None);
    }
}

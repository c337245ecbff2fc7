//! The Lua scripts that make each change to a user's state in Redis atomic.
//!
//! A script runs alone on its Redis, so what it does happens at once or not
//! at all: the publish script assigns the next seq, appends to history,
//! records the idempotency key and publishes to the user's channel in one
//! step — so the order of a user's Pub/Sub messages is seq order, and two
//! nodes never assign one seq. Each script first creates the user's epoch
//! when its meta is missing (never seen, expired, or lost with Redis's
//! data), deleting whatever history is left, so a lost state is never
//! continued under its old epoch.
//!
//! Scripts are called by SHA (`EVALSHA`), with `EVAL` of the body when Redis
//! does not know it yet (after a restart or `SCRIPT FLUSH`).

use sha1::{Digest, Sha1};

/// Creates the epoch when meta is missing. Expects KEYS[1] meta, and the
/// fresh epoch in `fresh`; leaves the epoch in `epoch`. Deletes the other
/// keys named in `stale` (a Lua list).
const ENSURE_EPOCH: &str = r#"
local function ensure_epoch(meta, fresh, stale)
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch then
    epoch = fresh
    for _, k in ipairs(stale) do redis.call('DEL', k) end
    redis.call('HSET', meta, 'e', epoch, 's', 0)
  end
  return epoch
end
"#;

/// KEYS: meta, stream, ids. ARGV: channel, maxlen, ttl ms, fresh epoch,
/// id ('' for none), tail (the event JSON after the seq), priority, unix µs
/// accepted. Returns {epoch, seq, duplicate (0/1), receivers}.
const PUBLISH: &str = r#"
local epoch = ensure_epoch(KEYS[1], ARGV[4], {KEYS[2], KEYS[3]})
if ARGV[5] ~= '' then
  local prev = redis.call('ZSCORE', KEYS[3], ARGV[5])
  if prev then return {epoch, tonumber(prev), 1, 0} end
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
local body = '{"type":"event","seq":' .. seq .. ARGV[6]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-0', 'p', ARGV[7], 't', ARGV[8], 'b', body)
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[3], seq, ARGV[5])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -65537)
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local n = redis.call('PUBLISH', ARGV[1],
  'e|' .. epoch .. '|' .. seq .. '|' .. ARGV[7] .. '|' .. ARGV[8] .. '|' .. body)
return {epoch, seq, 0, n}
"#;

/// KEYS: meta, stream, ids, conns. ARGV: fresh epoch, ttl ms, from seq (0:
/// no events), member ('' for none), max connections, channel.
/// Adds the member (a new connection) and evicts the oldest over the
/// limit (published as `x|m1 m2 ...`); reads the events from `from` on.
/// Returns {epoch, seq, events (XRANGE entries), evicted}.
const SYNC: &str = r#"
local epoch = ensure_epoch(KEYS[1], ARGV[1], {KEYS[2], KEYS[3]})
local seq = tonumber(redis.call('HGET', KEYS[1], 's'))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local evicted = 0
if ARGV[4] ~= '' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[4], tonumber(t[1]) * 1000000 + tonumber(t[2]), ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[2])
  local over = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[5])
  if over > 0 then
    local victims = redis.call('ZRANGE', KEYS[4], 0, over - 1)
    redis.call('ZREMRANGEBYRANK', KEYS[4], 0, over - 1)
    redis.call('PUBLISH', ARGV[6], 'x|' .. table.concat(victims, ' '))
    evicted = over
  end
end
local events = {}
local from = tonumber(ARGV[3])
if from > 0 and from <= seq then
  events = redis.call('XRANGE', KEYS[2], from .. '-0', '+')
end
return {epoch, seq, events, evicted}
"#;

/// KEYS: conns. ARGV: channel. Closes the user's connections everywhere
/// (`d` on its channel); returns the members that were live.
const DROP: &str = r#"
local m = redis.call('ZRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], 'd')
return m
"#;

/// KEYS: meta, stream, ids, conns. ARGV: ttl ms, members of this node's
/// live connections. Keeps a user with live connections from expiring.
const TOUCH: &str = r#"
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
if #ARGV > 1 and redis.call('EXISTS', KEYS[1]) == 1 then
  local t = redis.call('TIME')
  local score = tonumber(t[1]) * 1000000 + tonumber(t[2])
  for i = 2, #ARGV do redis.call('ZADD', KEYS[4], 'NX', score, ARGV[i]) end
  redis.call('PEXPIRE', KEYS[4], ARGV[1])
end
return 0
"#;

/// KEYS: meta, stream, ids. ARGV: the epoch seen to regress, fresh epoch,
/// ttl ms. Redis went back in time (a restart that lost acknowledged
/// writes): if the user is still on that epoch, start a new one at seq 0,
/// so no (epoch, seq) is ever given to two events. Returns the epoch now.
const RENEW: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if epoch ~= ARGV[1] then return epoch end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'e', ARGV[2], 's', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return ARGV[2]
"#;

/// One script: its body and SHA-1.
pub struct Script {
    pub body: String,
    pub sha: String,
}

impl Script {
    fn new(parts: &[&str]) -> Self {
        let body = parts.concat();
        let sha = Sha1::digest(body.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        Script { body, sha }
    }
}

/// Every script the engine runs.
pub struct Scripts {
    pub publish: Script,
    pub sync: Script,
    pub drop: Script,
    pub touch: Script,
    pub renew: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            publish: Script::new(&[ENSURE_EPOCH, PUBLISH]),
            sync: Script::new(&[ENSURE_EPOCH, SYNC]),
            drop: Script::new(&[DROP]),
            touch: Script::new(&[TOUCH]),
            renew: Script::new(&[RENEW]),
        }
    }
}

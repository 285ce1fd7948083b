//! One atomic step on one hash slot: a compare-and-set script. The server reads what a
//! change depends on (a user's version, a chain's tail), decides and merges in Rust, and
//! sends the script the bytes it read and the writes it wants; the script applies the
//! writes only if every compared key still holds those bytes, all at once (Redis runs a
//! script without interleaving any other command). When something moved, nothing is
//! written and the caller reads again and decides again.

use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Value};

/// The compare-and-set script. `ARGV[1]` is the number `c` of compared keys: `KEYS[1..c]`
/// must hold `ARGV[2..c+1]` (the empty string for a missing key). Then come the writes,
/// each an operation letter, the index of its key in `KEYS`, and its arguments:
/// `S v` set, `X v ms` set with an expiry, `D` delete, `H f v` set a hash field, `h f`
/// delete a hash field, `R v` push on a list, `Z m` add a member (score 0) to a sorted
/// set, `z m` remove one. Returns 1 when written, 0 when a compared key had moved.
const COMPARE_AND_SET: &str = r"
local c = tonumber(ARGV[1])
for i = 1, c do
  local v = redis.call('GET', KEYS[i])
  if v == false then v = '' end
  if v ~= ARGV[i + 1] then return 0 end
end
local a = c + 2
while a <= #ARGV do
  local op = ARGV[a]
  local k = KEYS[tonumber(ARGV[a + 1])]
  if op == 'S' then redis.call('SET', k, ARGV[a + 2]); a = a + 3
  elseif op == 'X' then redis.call('SET', k, ARGV[a + 2], 'PX', ARGV[a + 3]); a = a + 4
  elseif op == 'D' then redis.call('DEL', k); a = a + 2
  elseif op == 'H' then redis.call('HSET', k, ARGV[a + 2], ARGV[a + 3]); a = a + 4
  elseif op == 'h' then redis.call('HDEL', k, ARGV[a + 2]); a = a + 3
  elseif op == 'R' then redis.call('RPUSH', k, ARGV[a + 2]); a = a + 3
  elseif op == 'Z' then redis.call('ZADD', k, 0, ARGV[a + 2]); a = a + 3
  elseif op == 'z' then redis.call('ZREM', k, ARGV[a + 2]); a = a + 3
  else return redis.error_reply('unknown operation ' .. op) end
end
return 1
";

/// Writes to one hash slot, applied only if the compared keys hold what was read.
#[derive(Debug, Default)]
pub(super) struct Step {
    keys: Vec<String>,
    compared: Vec<Vec<u8>>,
    writes: Vec<Vec<u8>>,
}

impl Step {
    /// The index (from 1, as Lua counts) of `key` in the step's keys, added if new.
    fn key(&mut self, key: &str) -> Vec<u8> {
        let index = match self.keys.iter().position(|known| known == key) {
            Some(index) => index,
            None => {
                self.keys.push(key.to_string());
                self.keys.len() - 1
            }
        };
        (index + 1).to_string().into_bytes()
    }

    /// Applies the step only if `key` still holds `expected` (`None`: missing). Every
    /// comparison must come before the first write.
    pub fn compare(&mut self, key: &str, expected: Option<&[u8]>) {
        debug_assert!(self.writes.is_empty(), "comparisons come first");
        debug_assert_eq!(self.keys.len(), self.compared.len());
        self.keys.push(key.to_string());
        self.compared.push(expected.unwrap_or_default().to_vec());
    }

    fn write(&mut self, operation: &str, key: &str, arguments: &[&[u8]]) {
        let index = self.key(key);
        self.writes.push(operation.as_bytes().to_vec());
        self.writes.push(index);
        self.writes
            .extend(arguments.iter().map(|argument| argument.to_vec()));
    }

    pub fn set(&mut self, key: &str, value: &[u8]) {
        self.write("S", key, &[value]);
    }

    /// Sets `key`, which the engine deletes after `expires_in_millis`.
    pub fn set_expiring(&mut self, key: &str, value: &[u8], expires_in_millis: u64) {
        let millis = expires_in_millis.max(1).to_string();
        self.write("X", key, &[value, millis.as_bytes()]);
    }

    pub fn delete(&mut self, key: &str) {
        self.write("D", key, &[]);
    }

    pub fn hash_set(&mut self, key: &str, field: &[u8], value: &[u8]) {
        self.write("H", key, &[field, value]);
    }

    pub fn hash_delete(&mut self, key: &str, field: &[u8]) {
        self.write("h", key, &[field]);
    }

    pub fn push(&mut self, key: &str, value: &[u8]) {
        self.write("R", key, &[value]);
    }

    pub fn set_add(&mut self, key: &str, member: &[u8]) {
        self.write("Z", key, &[member]);
    }

    pub fn set_remove(&mut self, key: &str, member: &[u8]) {
        self.write("z", key, &[member]);
    }

    /// Whether the step writes anything.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The route of the step: the master of its keys' slot.
    pub fn route(&self) -> Option<SingleNodeRoutingInfo> {
        self.keys
            .first()
            .map(|key| SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master)))
    }

    /// The script's call. It is sent whole (`EVAL`): a node compiles it once and finds it
    /// again by its hash, and a node that has just taken over a slot needs nothing loaded.
    pub fn command(&self) -> Cmd {
        let mut command = redis::cmd("EVAL");
        command
            .arg(COMPARE_AND_SET)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(self.compared.len())
            .arg(&self.compared)
            .arg(&self.writes);
        command
    }
}

/// What the script answered: whether it wrote.
pub(super) fn written(value: &Value) -> Option<bool> {
    match value {
        Value::Int(1) => Some(true),
        Value::Int(0) => Some(false),
        _ => None,
    }
}

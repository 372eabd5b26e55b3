//! The Lua scripts that keep the shared counters in Redis, each run
//! atomically by Redis.
//!
//! A counter is a hash: field `<bucket>` = used in that bucket
//! (reservations included), `r<bucket>` = reserved in it, and running sums
//! `u` (used) and `r` (reserved) over the live buckets, `o` the oldest
//! bucket held and `n` the newest with a figure. An admission reads the
//! sums (O(1)); only when `o` has left the window does it sweep the hash.

/// Shared by the scripts: drop the buckets of `k` older than `from` and
/// recompute its sums (run only when `o` says one has left the window).
pub const SWEEP: &str = r"
local function sweep(k, from)
  local h = redis.call('HGETALL', k)
  local u, r, o = 0, 0, nil
  for j = 1, #h, 2 do
    local f = h[j]
    local c = string.sub(f, 1, 1)
    if c ~= 'u' and c ~= 'o' and c ~= 'n' and f ~= 'r' then
      local isr = c == 'r'
      local idx = tonumber(isr and string.sub(f, 2) or f)
      local v = tonumber(h[j + 1]) or 0
      if idx == nil or idx < from then
        redis.call('HDEL', k, f)
      elseif isr then
        r = r + v
      else
        u = u + v
        if o == nil or idx < o then o = idx end
      end
    end
  end
  redis.call('HSET', k, 'u', u, 'r', r)
  if o then redis.call('HSET', k, 'o', o) else redis.call('HDEL', k, 'o', 'n') end
end
local function sums(k, from)
  local f = redis.call('HMGET', k, 'u', 'r', 'o', 'n')
  local o = tonumber(f[3])
  if o and o < from then
    sweep(k, from)
    f = redis.call('HMGET', k, 'u', 'r', 'o', 'n')
  end
  return tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[4]) or -1
end
local function add(k, bucket, used, reserved)
  redis.call('HINCRBY', k, bucket, used)
  redis.call('HINCRBY', k, 'u', used)
  if reserved ~= 0 then
    redis.call('HINCRBY', k, 'r' .. bucket, reserved)
    redis.call('HINCRBY', k, 'r', reserved)
  end
  local o = tonumber(redis.call('HGET', k, 'o'))
  if o == nil or tonumber(bucket) < o then redis.call('HSET', k, 'o', bucket) end
  local n = tonumber(redis.call('HGET', k, 'n'))
  if used > 0 and (n == nil or tonumber(bucket) > n) then redis.call('HSET', k, 'n', bucket) end
end
";

/// Check every counter, then reserve in all or none. KEYS: the counters;
/// The last KEY is this gateway's lease (see [`JANITOR`]). ARGV, six per
/// counter: bucket now, oldest live bucket, ceiling, amount,
/// enforce (1/0), milliseconds to keep the key. Returns `{0, used,
/// reserved, newest, ...}` per key after the reservation, or `{i, frees}`
/// for the first key that would go over (`frees`: the bucket whose expiry
/// leaves room, -1 if none will).
pub const ADMIT: &str = r"
local lease = KEYS[#KEYS]
local figs = {}
for i = 1, #KEYS - 1 do
  local b = (i - 1) * 6
  local from, ceiling, amount = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local used, reserved, newest = sums(KEYS[i], from)
  if ARGV[b + 5] == '1' and used + amount > ceiling then
    local frees = -1
    if amount <= ceiling then
      local h = redis.call('HGETALL', KEYS[i])
      local buckets = {}
      for j = 1, #h, 2 do
        local idx = tonumber(h[j])
        if idx and idx >= from then buckets[#buckets + 1] = {idx, tonumber(h[j + 1]) or 0} end
      end
      table.sort(buckets, function(x, y) return x[1] < y[1] end)
      local left = used
      for _, bk in ipairs(buckets) do
        left = left - bk[2]
        if left + amount <= ceiling then frees = bk[1] break end
      end
    end
    return {i, frees}
  end
  figs[i] = {used + amount, reserved + amount, newest}
end
local out = {0}
for i = 1, #KEYS - 1 do
  local b = (i - 1) * 6
  local amount = tonumber(ARGV[b + 4])
  add(KEYS[i], ARGV[b + 1], amount, amount)
  redis.call('PEXPIRE', KEYS[i], ARGV[b + 6])
  if amount > 0 then redis.call('HINCRBY', lease, KEYS[i] .. '|' .. ARGV[b + 1], amount) end
  local f = figs[i]
  if amount > 0 and tonumber(ARGV[b + 1]) > f[3] then f[3] = tonumber(ARGV[b + 1]) end
  out[#out + 1] = f[1]
  out[#out + 1] = f[2]
  out[#out + 1] = f[3]
end
redis.call('PEXPIRE', lease, 3456000000)
return out
";

/// A batch of settlements. KEYS: the counters, then this gateway's lease,
/// then the batch's own key (kept 10 minutes, so that a batch sent again
/// after a broken connection is applied once). ARGV, five per counter:
/// bucket, oldest live bucket, used delta, reserved delta, milliseconds to
/// keep the key. A reservation the lease no longer holds was released by
/// [`JANITOR`]: only the actual use is added for it. A bucket that left the
/// window is skipped (its figures no longer count).
pub const SETTLE: &str = r"
if not redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', 600000) then return 0 end
local lease = KEYS[#KEYS - 1]
for i = 1, #KEYS - 2 do
  local b = (i - 1) * 5
  local bucket, from = ARGV[b + 1], tonumber(ARGV[b + 2])
  local used, reserved = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  if reserved < 0 then
    local f = KEYS[i] .. '|' .. bucket
    local held = math.min(tonumber(redis.call('HGET', lease, f)) or 0, -reserved)
    if held > 0 and redis.call('HINCRBY', lease, f, -held) <= 0 then redis.call('HDEL', lease, f) end
    used = used - reserved - held
    reserved = -held
  end
  if tonumber(bucket) >= from then
    sums(KEYS[i], from)
    add(KEYS[i], bucket, used, reserved)
    if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[b + 5]) then
      redis.call('PEXPIRE', KEYS[i], ARGV[b + 5])
    end
  end
end
return #KEYS
";

/// Releases the reservations of a gateway that stopped without settling
/// them (killed mid-request): each gateway keeps what it holds in its
/// lease hash (`<counter>|<bucket>` = reserved) and refreshes its alive
/// key; when the alive key has expired, a surviving gateway runs this.
/// KEYS: the lease, the alive key.
pub const JANITOR: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local h = redis.call('HGETALL', KEYS[1])
for j = 1, #h, 2 do
  local k, bucket = string.match(h[j], '^(.*)|(%-?%d+)$')
  local amount = tonumber(h[j + 1]) or 0
  if k and amount > 0 and redis.call('HEXISTS', k, bucket) == 1 then
    add(k, bucket, -amount, -amount)
  end
end
redis.call('DEL', KEYS[1])
return 1
";

/// Figures of counters (for `/v1/limits`). ARGV: one oldest live bucket
/// per key. Returns `{used, reserved, newest}` per key.
pub const READ: &str = r"
local out = {}
for i = 1, #KEYS do
  local u, r, n = sums(KEYS[i], tonumber(ARGV[i]))
  out[#out + 1] = u
  out[#out + 1] = r
  out[#out + 1] = n
end
return out
";

/// Raises a budget's counter to at least the spend the ledger (or this
/// gateway) knows: a counter can only lag the truth by losing data, never
/// lead it, so raising is always safe. ARGV: bucket, oldest live bucket,
/// spend, milliseconds to keep.
pub const SEED: &str = r"
if tonumber(ARGV[1]) < tonumber(ARGV[2]) then return 0 end
local u, r = sums(KEYS[1], tonumber(ARGV[2]))
local short = tonumber(ARGV[3]) - (u - r)
if short <= 0 then return 0 end
add(KEYS[1], ARGV[1], short, 0)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
";

/// The scripts, each with the shared helpers in front.
pub struct Scripts {
    pub admit: redis::Script,
    pub settle: redis::Script,
    pub read: redis::Script,
    pub seed: redis::Script,
    pub janitor: redis::Script,
    /// Their sources, for `SCRIPT LOAD` before pipelined `EVALSHA`s.
    pub code: Vec<String>,
}

impl Default for Scripts {
    fn default() -> Self {
        let code: Vec<String> = [ADMIT, SETTLE, READ, SEED, JANITOR]
            .iter()
            .map(|body| format!("{SWEEP}\n{body}"))
            .collect();
        let script = |i: usize| redis::Script::new(&code[i]);
        Self {
            admit: script(0),
            settle: script(1),
            read: script(2),
            seed: script(3),
            janitor: script(4),
            code,
        }
    }
}

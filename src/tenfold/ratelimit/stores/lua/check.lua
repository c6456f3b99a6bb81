-- One rate-limit check over every policy that applies, in one round trip, atomically.
-- Mirrors tenfold/ratelimit/algorithms.py line for line; integers stay below 2^53 so
-- doubles are exact. KEYS: two per probe (state, log meta). ARGV: now, weight, commit, n,
-- then per probe: algorithm code, rate, window_ms, burst, shadow.
-- Reply: per probe {allowed, limit, remaining, reset_ms, retry_ms}.

local now = tonumber(ARGV[1])
local weight = tonumber(ARGV[2])
local commit = ARGV[3] == '1'
local n = tonumber(ARGV[4])

local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cdiv(a, b) return -idiv(-a, b) end
local function fmt(...)
  local parts = {}
  for i, v in ipairs({...}) do parts[i] = string.format('%d', v) end
  return table.concat(parts, ' ')
end
local function nums(raw)
  if not raw then return nil end
  local out = {}
  for token in string.gmatch(raw, '%S+') do out[#out + 1] = tonumber(token) end
  return out
end

local results, writes = {}, {}
local denied = false

for i = 1, n do
  local base = 4 + (i - 1) * 5
  local code = tonumber(ARGV[base + 1])
  local rate = tonumber(ARGV[base + 2])
  local w = tonumber(ARGV[base + 3])
  local burst = tonumber(ARGV[base + 4])
  local shadow = ARGV[base + 5] == '1'
  local key, meta = KEYS[2 * i - 1], KEYS[2 * i]
  local allowed, limit, remaining, reset, retry
  local write = nil

  if code == 1 then -- token bucket
    local full = burst * w
    local st = nums(redis.call('GET', key))
    local level, last = full, now
    if st then
      level, last = st[1], st[2]
      local elapsed = now - last
      if elapsed > 0 then
        if elapsed >= cdiv(full - level, rate) then level = full else level = level + elapsed * rate end
      end
      if now > last then last = now end
    end
    local need = weight * w
    limit = burst
    if level >= need then
      level = level - need
      allowed, retry = true, 0
    else
      allowed, retry = false, cdiv(need - level, rate)
    end
    remaining, reset = idiv(level, w), cdiv(full - level, rate)
    write = {'SET', key, fmt(level, last), reset + 1}
  elseif code == 2 then -- GCRA
    local tolerance = burst * w
    local diff = 0
    local st = nums(redis.call('GET', key))
    if st and st[1] >= now then diff = (st[1] - now) * rate + st[2] end
    local new_diff = diff + weight * w
    limit = burst
    if new_diff <= tolerance then
      diff = new_diff
      allowed, retry = true, 0
    else
      allowed, retry = false, cdiv(new_diff - tolerance, rate)
    end
    remaining, reset = idiv(tolerance - diff, w), cdiv(diff, rate)
    local q = idiv(diff, rate)
    write = {'SET', key, fmt(now + q, diff - q * rate), reset + 1}
  elseif code == 3 then -- fixed window
    local wid = idiv(now, w)
    local st = nums(redis.call('GET', key))
    local count = 0
    if st and st[1] == wid then count = st[2] end
    reset = (wid + 1) * w - now
    limit = rate
    if count + weight <= rate then
      count = count + weight
      allowed, retry = true, 0
    else
      allowed, retry = false, reset
    end
    remaining = rate - count
    write = {'SET', key, fmt(wid, count), reset}
  elseif code == 5 then -- sliding-window counter
    local wid = idiv(now, w)
    local cur, prev = 0, 0
    local st = nums(redis.call('GET', key))
    if st then
      if st[1] == wid then cur, prev = st[2], st[3]
      elseif st[1] == wid - 1 then prev = st[2] end
    end
    local elapsed = now - wid * w
    local estimate = prev * (w - elapsed) + cur * w
    limit = rate
    if estimate + weight * w <= rate * w then
      cur = cur + weight
      estimate = estimate + weight * w
      allowed, retry = true, 0
    else
      allowed = false
      retry = nil
      if prev > 0 and cur + weight <= rate then
        local wait = cdiv(prev * (w - elapsed) + (cur + weight - rate) * w, prev)
        if wait < w - elapsed then retry = wait end
      end
      if retry == nil then
        local start_next = (wid + 1) * w
        if cur == 0 then
          retry = start_next - now
        else
          local into = cdiv(cur * w + (weight - rate) * w, cur)
          if into < 0 then into = 0 end
          retry = start_next + into - now
        end
      end
    end
    if cur > 0 then reset = (wid + 2) * w - now
    elseif prev > 0 then reset = (wid + 1) * w - now
    else reset = 0 end
    remaining = idiv(rate * w - estimate, w)
    write = {'SET', key, fmt(wid, cur, prev), reset + 1}
  elseif code == 4 then -- sliding-window log: ZSET of "ts:seq:weight", meta "total seq"
    local horizon = now - w
    local m = nums(redis.call('GET', meta)) or {0, 0}
    local total, seq = m[1], m[2]
    local gone = redis.call('ZRANGEBYSCORE', key, '-inf', horizon)
    if #gone > 0 then
      for _, member in ipairs(gone) do
        total = total - tonumber(string.match(member, ':(%d+)$'))
      end
      redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
      if total <= 0 then
        total = 0
        redis.call('DEL', meta)
      else
        redis.call('SET', meta, fmt(total, seq), 'KEEPTTL')
      end
    end
    limit = rate
    if total + weight <= rate then
      allowed, retry = true, 0
      remaining, reset = rate - total - weight, w
      write = {'LOG', key, meta, total, seq, w}
    else
      allowed = false
      local excess = total + weight - rate
      local freed, start = 0, 0
      retry = w
      local done = false
      while not done do
        local chunk = redis.call('ZRANGE', key, start, start + 63, 'WITHSCORES')
        if #chunk == 0 then break end
        for j = 1, #chunk, 2 do
          freed = freed + tonumber(string.match(chunk[j], ':(%d+)$'))
          if freed >= excess then
            retry = tonumber(chunk[j + 1]) + w - now
            done = true
            break
          end
        end
        start = start + 64
      end
      local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      if #newest > 0 then reset = tonumber(newest[2]) + w - now else reset = 0 end
      remaining = rate - total
    end
  else
    return redis.error_reply('unknown algorithm code ' .. tostring(code))
  end

  if not allowed and not shadow then denied = true end
  results[i] = {allowed and 1 or 0, limit, remaining, reset, retry}
  if allowed then writes[i] = write end
end

if commit and not denied then
  for i = 1, n do
    local wr = writes[i]
    if wr then
      if wr[1] == 'SET' then
        redis.call('SET', wr[2], wr[3], 'PX', wr[4])
      else
        local seq = wr[5] + 1
        redis.call('ZADD', wr[2], now, string.format('%d:%d:%d', now, seq, weight))
        redis.call('PEXPIRE', wr[2], wr[6])
        redis.call('SET', wr[3], fmt(wr[4] + weight, seq), 'PX', wr[6])
      end
    end
  end
end
return results

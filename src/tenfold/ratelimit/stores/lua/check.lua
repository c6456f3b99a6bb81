-- One rate-limit check over every policy that applies, in one round trip, atomically.
-- Mirrors tenfold/ratelimit/algorithms.py line for line; integers stay below 2^53 so
-- doubles are exact. KEYS: two per probe (state, log meta). ARGV: now, weight, commit, n,
-- then per probe: algorithm code, rate, window_ms, burst, shadow.
-- Reply: per probe {allowed, limit, remaining, reset_ms, retry_ms}.
-- States are space-separated integers: "level last", "tat diff", "window count",
-- "window current previous"; the log's meta is "total seq oldest" (oldest: the lowest score
-- in the ZSET; a meta without it, as older versions wrote, makes the next check look it up).
-- Numbers go to redis.call as strings formatted here: Redis would format them with %.17g,
-- which costs more than the command itself.

local now = tonumber(ARGV[1])
local weight = tonumber(ARGV[2])
local commit = ARGV[3] == '1'
local n = tonumber(ARGV[4])
local call, format, match, floor = redis.call, string.format, string.match, math.floor

local function idiv(a, b)
  local q = floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function cdiv(a, b) return -idiv(-a, b) end

local results, writes = {}, {}
local denied = false

for i = 1, n do
  local base = 4 + (i - 1) * 5
  local code = tonumber(ARGV[base + 1])
  local rate = tonumber(ARGV[base + 2])
  local w_arg = ARGV[base + 3]
  local w = tonumber(w_arg)
  local burst = tonumber(ARGV[base + 4])
  local shadow = ARGV[base + 5] == '1'
  local key, meta = KEYS[2 * i - 1], KEYS[2 * i]
  local allowed, limit, remaining, reset, retry
  local write = nil

  if code == 1 then -- token bucket
    local full = burst * w
    local level, last = full, now
    local raw = call('GET', key)
    if raw then
      local a, b = match(raw, '(%S+)%s+(%S+)')
      level, last = tonumber(a), tonumber(b)
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
    write = {key, format('%d %d', level, last), reset + 1}
  elseif code == 2 then -- GCRA
    local tolerance = burst * w
    local diff = 0
    local raw = call('GET', key)
    if raw then
      local a, b = match(raw, '(%S+)%s+(%S+)')
      a = tonumber(a)
      if a >= now then diff = (a - now) * rate + tonumber(b) end
    end
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
    write = {key, format('%d %d', now + q, diff - q * rate), reset + 1}
  elseif code == 3 then -- fixed window
    local wid = idiv(now, w)
    local count = 0
    local raw = call('GET', key)
    if raw then
      local a, b = match(raw, '(%S+)%s+(%S+)')
      if tonumber(a) == wid then count = tonumber(b) end
    end
    reset = (wid + 1) * w - now
    limit = rate
    if count + weight <= rate then
      count = count + weight
      allowed, retry = true, 0
    else
      allowed, retry = false, reset
    end
    remaining = rate - count
    write = {key, format('%d %d', wid, count), reset}
  elseif code == 5 then -- sliding-window counter
    local wid = idiv(now, w)
    local cur, prev = 0, 0
    local raw = call('GET', key)
    if raw then
      local a, b, c = match(raw, '(%S+)%s+(%S+)%s+(%S+)')
      a = tonumber(a)
      if a == wid then cur, prev = tonumber(b), tonumber(c)
      elseif a == wid - 1 then prev = tonumber(b) end
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
    write = {key, format('%d %d %d', wid, cur, prev), reset + 1}
  elseif code == 4 then -- sliding-window log: ZSET of "ts:seq:weight", meta "total seq oldest"
    local horizon = now - w
    local total, seq, oldest = 0, 0, nil
    local raw = call('GET', meta)
    if raw then
      local a, b, c = match(raw, '(%S+)%s+(%S+)%s*(%S*)')
      total, seq, oldest = tonumber(a), tonumber(b), tonumber(c)
    end
    if oldest == nil or oldest <= horizon then
      -- Drop the entries at or before the horizon (the oldest first), learning the new oldest.
      local gone, start = 0, 0
      oldest = nil
      while true do
        local chunk = call('ZRANGE', key, format('%d', start), format('%d', start + 7), 'WITHSCORES')
        for j = 1, #chunk, 2 do
          local score = tonumber(chunk[j + 1])
          if score > horizon then
            oldest = score
            break
          end
          total = total - tonumber(match(chunk[j], ':(%d+)$'))
          gone = gone + 1
        end
        if oldest ~= nil or #chunk < 16 then break end
        start = start + 8
      end
      if gone > 0 then
        call('ZREMRANGEBYRANK', key, '0', format('%d', gone - 1))
        if total <= 0 then
          total = 0
          call('DEL', meta)
        elseif oldest ~= nil then
          call('SET', meta, format('%d %d %d', total, seq, oldest), 'KEEPTTL')
        else
          call('SET', meta, format('%d %d', total, seq), 'KEEPTTL')
        end
      end
    end
    limit = rate
    if total + weight <= rate then
      allowed, retry = true, 0
      remaining, reset = rate - total - weight, w
      if oldest == nil or now < oldest then oldest = now end
      write = {key, meta, total, seq, oldest, w_arg}
    else
      allowed = false
      local excess = total + weight - rate
      local freed, start = 0, 0
      retry = w
      local done = false
      while not done do
        local chunk = call('ZRANGE', key, format('%d', start), format('%d', start + 63), 'WITHSCORES')
        if #chunk == 0 then break end
        for j = 1, #chunk, 2 do
          freed = freed + tonumber(match(chunk[j], ':(%d+)$'))
          if freed >= excess then
            retry = tonumber(chunk[j + 1]) + w - now
            done = true
            break
          end
        end
        start = start + 64
      end
      local newest = call('ZRANGE', key, '-1', '-1', 'WITHSCORES')
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
      if #wr == 3 then -- {key, state, ttl}
        call('SET', wr[1], wr[2], 'PX', format('%d', wr[3]))
      else -- {key, meta, total, seq, oldest, window}
        local seq = wr[4] + 1
        call('ZADD', wr[1], ARGV[1], format('%d:%d:%d', now, seq, weight))
        call('PEXPIRE', wr[1], wr[6])
        call('SET', wr[2], format('%d %d %d', wr[3] + weight, seq, wr[5]), 'PX', wr[6])
      end
    end
  end
end
return results

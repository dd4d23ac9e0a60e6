-- Apply one state transition to a job, atomically.
--
-- ARGV: prefix, job_id, target, allowed_from (comma-separated states),
--       history_entry (JSON), now_iso, now_epoch, fields (JSON object of
--       string values to set on the job hash), expect_worker ('' = any),
--       is_terminal ('1'/'0'), events_maxlen, reason,
--       duration buckets (comma-separated seconds)
-- Returns {'OK', previous_state, event_id} or {'REFUSED', current_state}
-- or {'NOT_FOUND'}.
local prefix, id, target, allowed_from = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local history_entry, now_iso, now_epoch = ARGV[5], ARGV[6], tonumber(ARGV[7])
local fields = cjson.decode(ARGV[8])
local expect_worker, is_terminal = ARGV[9], ARGV[10] == '1'
local maxlen, reason, buckets = ARGV[11], ARGV[12], ARGV[13]

local job = prefix .. 'job:' .. id
local current = redis.call('HGET', job, 'state')
if not current then
  return {'NOT_FOUND'}
end

local allowed = false
for state in string.gmatch(allowed_from, '[^,]+') do
  if state == current then allowed = true end
end
if not allowed then
  return {'REFUSED', current}
end
if expect_worker ~= '' and redis.call('HGET', job, 'worker_id') ~= expect_worker then
  return {'REFUSED', current}
end

local seq = redis.call('HGET', job, 'seq')
local operation = redis.call('HGET', job, 'operation')
local priority = redis.call('HGET', job, 'priority')
local queue = redis.call('HGET', job, 'queue')

redis.call('HSET', job, 'state', target, 'updated_at', now_iso)
for key, value in pairs(fields) do
  if value == cjson.null or value == '' then
    redis.call('HDEL', job, key)
  else
    redis.call('HSET', job, key, value)
  end
end
redis.call('RPUSH', job .. ':history', history_entry)

redis.call('ZREM', prefix .. 'jobs:state:' .. current, id)
redis.call('ZADD', prefix .. 'jobs:state:' .. target, seq, id)

local by_priority = prefix .. 'queued:by_priority'
if current == 'QUEUED' then
  redis.call('ZREM', prefix .. 'queued:' .. queue, id)
  if redis.call('HINCRBY', by_priority, priority, -1) <= 0 then
    redis.call('HDEL', by_priority, priority)
  end
end
if target == 'QUEUED' then
  local score = (100 - tonumber(priority)) * 1e12 + tonumber(seq)
  redis.call('ZADD', prefix .. 'queued:' .. queue, score, id)
  redis.call('HINCRBY', by_priority, priority, 1)
end
if target == 'RUNNING' then
  redis.call('HSET', job, 'started_at', now_epoch)
end

if is_terminal then
  local status = string.lower(target)
  redis.call('HINCRBY', prefix .. 'metrics:total', status .. '|' .. operation, 1)
  local started = tonumber(redis.call('HGET', job, 'started_at'))
  if started then
    local duration = math.max(0, now_epoch - started)
    local hist = prefix .. 'metrics:duration:' .. operation
    for bound in string.gmatch(buckets, '[^,]+') do
      if duration <= tonumber(bound) then
        redis.call('HINCRBY', hist, bound, 1)
      end
    end
    redis.call('HINCRBY', hist, '+Inf', 1)
    redis.call('HINCRBYFLOAT', hist, 'sum', duration)
    redis.call('HSET', job, 'duration_seconds', tostring(duration))
  end
end

local event = cjson.encode({
  job_id = id,
  state = target,
  previous_state = current,
  timestamp = now_iso,
  reason = reason,
})
local event_id = redis.call(
  'XADD', job .. ':events', 'MAXLEN', '~', maxlen, '*',
  'type', 'state', 'data', event)
redis.call('PUBLISH', prefix .. 'sse:job:' .. id,
  '{"data":' .. event .. ',"type":"state","id":"' .. event_id .. '"}')
return {'OK', current, event_id}

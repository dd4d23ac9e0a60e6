-- Store a new job as CREATED then VALIDATED, or report the one that exists.
--
-- ARGV: prefix, job_id, spec (canonical JSON), operation, priority, queue,
--       created_at (ISO), history (JSON array of entries), events_maxlen
-- Returns {'CREATED', seq} or {'EXISTS', stored_spec, state}.
local prefix, id, spec, operation = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local priority, queue, created_at = ARGV[5], ARGV[6], ARGV[7]
local history, maxlen = cjson.decode(ARGV[8]), ARGV[9]

local job = prefix .. 'job:' .. id
if redis.call('EXISTS', job) == 1 then
  return {'EXISTS', redis.call('HGET', job, 'spec'), redis.call('HGET', job, 'state')}
end

local seq = redis.call('INCR', prefix .. 'job_seq')
redis.call('HSET', job,
  'job_id', id, 'spec', spec, 'operation', operation, 'priority', priority,
  'queue', queue, 'created_at', created_at, 'updated_at', created_at,
  'seq', seq, 'state', 'VALIDATED')
local previous = ''
for _, entry in ipairs(history) do
  redis.call('RPUSH', job .. ':history', cjson.encode(entry))
  local event = cjson.encode({
    job_id = id, state = entry.state, previous_state = previous,
    timestamp = entry.timestamp, reason = entry.reason,
  })
  redis.call('XADD', job .. ':events', 'MAXLEN', '~', maxlen, '*',
    'type', 'state', 'data', event)
  previous = entry.state
end
redis.call('ZADD', prefix .. 'jobs', seq, id)
redis.call('ZADD', prefix .. 'jobs:state:VALIDATED', seq, id)
return {'CREATED', seq}

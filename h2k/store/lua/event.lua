-- Append a progress event to a job's stream and publish it, unless the job
-- is unknown or already terminal.
--
-- ARGV: prefix, job_id, event (JSON), events_maxlen
-- Returns the stream id, or false.
local prefix, id, event, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local job = prefix .. 'job:' .. id
local state = redis.call('HGET', job, 'state')
if not state or state == 'COMPLETED' or state == 'FAILED' or state == 'CANCELLED' then
  return false
end
local event_id = redis.call(
  'XADD', job .. ':events', 'MAXLEN', '~', maxlen, '*',
  'type', 'progress', 'data', event)
redis.call('HSET', job, 'latest_event', event)
redis.call('PUBLISH', prefix .. 'sse:job:' .. id,
  '{"data":' .. event .. ',"type":"progress","id":"' .. event_id .. '"}')
return event_id

-- recover_jobs: put back the jobs of workers whose lease expired, and retire workers whose heartbeat
-- expired (run by every worker's heartbeat loop and by every API process; whoever comes first does it).
-- KEYS[8] workers:active
-- ARGV[17] most expired leases to handle in this call
-- Returns {jobs recovered, dead worker ids...}.
local recovered = recover_expired(tonumber(ARGV[FIRST_ARG]))
local result = { recovered }
for _, worker_id in ipairs(redis.call('SMEMBERS', KEYS[FIRST_KEY])) do
  local worker_key = P_WORKER .. worker_id
  if redis.call('EXISTS', worker_key .. S_HEARTBEAT) == 0 then
    redis.call('SREM', KEYS[FIRST_KEY], worker_id)
    redis.call('DEL', worker_key, worker_key .. S_WORKER_JOBS)
    redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', 'worker_disconnected',
      'worker_id', worker_id, 'reason', 'heartbeat expired', 'updated_at', NOW_ISO)
    result[#result + 1] = worker_id
  end
end
return result

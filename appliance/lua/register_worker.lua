-- register_worker: record a worker and its capabilities, mark it active and start its heartbeat.
-- KEYS[8] worker:{id}   KEYS[9] worker:{id}:heartbeat   KEYS[10] workers:active
-- ARGV[10] worker id   ARGV[11] heartbeat TTL (s)   ARGV[12..] field, value pairs for the worker hash
-- Returns {"ok"}.
local worker_key, heartbeat_key, active_key = KEYS[FIRST_KEY], KEYS[FIRST_KEY + 1], KEYS[FIRST_KEY + 2]
local worker_id, ttl_s = ARGV[FIRST_ARG], tonumber(ARGV[FIRST_ARG + 1])
local fields = {}
for i = FIRST_ARG + 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('DEL', worker_key)
redis.call('HSET', worker_key, 'worker_id', worker_id, 'status', 'idle', 'current_job_id', '',
  'current_jobs', 0, 'connected_at', NOW_ISO, 'last_heartbeat', NOW_ISO, 'last_status_change', NOW_ISO,
  'total_jobs_completed', 0, 'total_jobs_failed', 0, unpack(fields))
redis.call('SET', heartbeat_key, NOW_ISO, 'EX', ttl_s)
redis.call('SADD', active_key, worker_id)
redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', 'worker_connected',
  'worker_id', worker_id, 'updated_at', NOW_ISO)
return { 'ok' }

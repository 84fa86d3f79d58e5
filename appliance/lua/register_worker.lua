-- register_worker: record a worker and its capabilities, mark it active and start its heartbeat.
-- KEYS[8] worker:{id}   KEYS[9] worker:{id}:heartbeat   KEYS[10] workers:active   KEYS[11] worker:{id}:jobs
-- KEYS[12] workers:offered   KEYS[13] workers:serving   KEYS[14] workers:unhealthy
-- KEYS[15..14+n] jobs:unoffered:{service} of each of the worker's n services
-- ARGV[17] worker id   ARGV[18] heartbeat TTL (s)
-- ARGV[19] n   ARGV[20..19+2n] service, health error ('' if healthy) pairs: the services it is configured for
-- ARGV[20+2n..] field, value pairs for the worker hash
-- Jobs still held under this worker id belong to an earlier process with the same id that died (a
-- restarted worker): they are recovered at once, counting a retry, instead of waiting for their lease.
-- Its services count as offered now, and their unworkable jobs go back in line (see offer in _lib).
-- Returns {"ok", jobs recovered, unworkable jobs of its services left (to revive with revive_unworkable)}.
local worker_key, heartbeat_key, active_key = KEYS[FIRST_KEY], KEYS[FIRST_KEY + 1], KEYS[FIRST_KEY + 2]
local worker_id, ttl_s = ARGV[FIRST_ARG], tonumber(ARGV[FIRST_ARG + 1])
local fields = {}
for i = FIRST_ARG + 3 + 2 * tonumber(ARGV[FIRST_ARG + 2]), #ARGV do fields[#fields + 1] = ARGV[i] end
local orphans = 0
for _, job_id in ipairs(redis.call('SMEMBERS', KEYS[FIRST_KEY + 3])) do
  local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'worker_id')
  if ACTIVE[job[1]] and job[2] == worker_id then
    redis.call('ZADD', K_LEASES, 0, job_id)
    orphans = orphans + 1
  end
end
if orphans > 0 then recover_expired(orphans) end
redis.call('DEL', worker_key, KEYS[FIRST_KEY + 3])
redis.call('HSET', worker_key, 'worker_id', worker_id, 'status', 'idle', 'current_job_id', '',
  'current_jobs', 0, 'connected_at', NOW_ISO, 'last_heartbeat', NOW_ISO, 'last_status_change', NOW_ISO,
  'total_jobs_completed', 0, 'total_jobs_failed', 0, unpack(fields))
redis.call('SET', heartbeat_key, NOW_ISO, 'EX', ttl_s)
redis.call('SADD', active_key, worker_id)
redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', 'worker_connected',
  'worker_id', worker_id, 'updated_at', NOW_ISO)
local _, left = offer(worker_id, FIRST_ARG + 2, FIRST_KEY + 4, ttl_s * 1000)
return { 'ok', orphans, left }

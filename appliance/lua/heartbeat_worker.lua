-- heartbeat_worker: refresh a worker's heartbeat and telemetry, and renew the leases of its jobs.
-- KEYS[8] worker:{id}   KEYS[9] worker:{id}:heartbeat   KEYS[10] workers:active   KEYS[11] worker:{id}:jobs
-- ARGV[10] worker id   ARGV[11] heartbeat TTL (s)   ARGV[12] lease (ms)   ARGV[13..] field, value pairs
-- A job whose lease this worker no longer holds (it was recovered elsewhere) leaves its set and is
-- reported back, so the worker stops working on it.
-- Returns {"ok", lost job ids...} or {"unknown"} if the worker record is gone (it must register again).
local worker_key, heartbeat_key, active_key, jobs_key = KEYS[FIRST_KEY], KEYS[FIRST_KEY + 1],
  KEYS[FIRST_KEY + 2], KEYS[FIRST_KEY + 3]
local worker_id, ttl_s, lease_ms = ARGV[FIRST_ARG], tonumber(ARGV[FIRST_ARG + 1]), tonumber(ARGV[FIRST_ARG + 2])
if redis.call('EXISTS', worker_key) == 0 then return { 'unknown' } end
local fields = {}
for i = FIRST_ARG + 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', worker_key, 'last_heartbeat', NOW_ISO, unpack(fields))
redis.call('SET', heartbeat_key, NOW_ISO, 'EX', ttl_s)
redis.call('SADD', active_key, worker_id)
local result = { 'ok' }
for _, job_id in ipairs(redis.call('SMEMBERS', jobs_key)) do
  local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'worker_id')
  if ACTIVE[job[1]] and job[2] == worker_id then
    redis.call('ZADD', K_LEASES, NOW_MS + lease_ms, job_id)
  else
    redis.call('SREM', jobs_key, job_id)
    result[#result + 1] = job_id
  end
end
return result

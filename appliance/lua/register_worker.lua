-- register_worker: record a worker and its capabilities, mark it active and start its heartbeat.
-- KEYS worker_key       worker:{id}
-- KEYS heartbeat_key    worker:{id}:heartbeat
-- KEYS jobs_key         worker:{id}:jobs
-- KEYS offered_key      workers:offered
-- KEYS serving_key      workers:serving
-- KEYS unhealthy_key    workers:unhealthy
-- KEYS unoffered...     jobs:unoffered:{service} of each of the worker's m services
-- ARGV worker_id
-- ARGV ttl_s:num        heartbeat TTL (s)
-- ARGV lease_ms:num     lease of its jobs (ms)
-- ARGV n:num            the number of jobs this process runs (a process registering again after its record was
-- lost, e.g. it was retired while frozen; 0 at its start)
-- ARGV running...       n job id, attempt pairs: those jobs; then m, then m service, health error ('' if
-- healthy) pairs: the services it is configured for; then field, value pairs for the worker hash
-- Jobs still held under this worker id that this process does not run belong to an earlier process with the same
-- id that died (a restarted worker): they are recovered at once, like any lost worker's (a retry counted, after
-- its backoff), instead of waiting for their lease. The jobs it runs and still holds stay its own.
-- Its services count as offered now, and their unworkable jobs go back in line (see offer in _lib).
-- Returns {"ok", jobs recovered, unworkable jobs of its services left (to revive with revive_unworkable)}.
keep_running_when_full()
local offers_at = running_at + 2 * n
local fields = {}
for i = offers_at + 1 + 2 * tonumber(ARGV[offers_at]), #ARGV do fields[#fields + 1] = ARGV[i] end
local running, candidates = {}, {}
for i = 1, n do
  local job_id = ARGV[running_at + 2 * i - 2]
  running[job_id] = ARGV[running_at + 2 * i - 1]
  candidates[#candidates + 1] = job_id
end
for _, job_id in ipairs(redis.call('SMEMBERS', jobs_key)) do
  if not running[job_id] then candidates[#candidates + 1] = job_id end
end
local kept, orphans = {}, 0
for _, job_id in ipairs(candidates) do
  local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'worker_id', 'attempt')
  if ACTIVE[job[1]] and job[2] == worker_id then
    if running[job_id] == job[3] then
      kept[#kept + 1] = job_id
    else
      redis.call('ZADD', K_LEASES, 0, job_id)
      orphans = orphans + 1
    end
  end
end
if orphans > 0 then recover_expired(orphans, 'restarted while running it') end
-- A record left by an earlier process under this id (it died without deregistering: kill -9, a crash) is that
-- process lost: monitors are told so before this one connects. The same process registering again (a register
-- whose reply an outage lost, or one after its record was lost) is known by its pid and hostname.
local sent = {}
for i = 1, #fields, 2 do sent[fields[i]] = fields[i + 1] end
local before = redis.call('HMGET', worker_key, 'worker_id', 'pid', 'hostname')
if before[1] and ((before[2] or '') ~= (sent['pid'] or '') or (before[3] or '') ~= (sent['hostname'] or '')) then
  lose_worker(worker_id, 'restarted: its previous process ended without deregistering')
end
redis.call('DEL', worker_key, jobs_key)
redis.call('HSET', worker_key, 'worker_id', worker_id, 'status', 'idle', 'current_job_id', '',
  'current_jobs', 0, 'connected_at', NOW_ISO, 'last_heartbeat', NOW_ISO, 'last_status_change', NOW_ISO,
  'total_jobs_completed', 0, 'total_jobs_failed', 0, 'last_heartbeat_ms', NOW_MS, unpack(fields))
redis.call('SET', heartbeat_key, NOW_ISO, 'EX', ttl_s)
redis.call('SADD', K_ACTIVE, worker_id)
redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', 'worker_connected',
  'worker_id', worker_id, 'updated_at', NOW_ISO)
for _, job_id in ipairs(kept) do
  redis.call('SADD', jobs_key, job_id)
  redis.call('ZADD', K_LEASES, 'GT', deadline(lease_ms), job_id)
end
if #kept > 0 then busy(worker_id, kept[#kept]) end
local _, left = offer(worker_id, offers_at, offered_key, serving_key, unhealthy_key, unoffered_at, ttl_s * 1000)
return { 'ok', orphans, left }

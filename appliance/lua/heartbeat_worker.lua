-- heartbeat_worker: refresh a worker's heartbeat and telemetry, and renew the leases of the jobs it runs.
-- KEYS worker_key       worker:{id}
-- KEYS heartbeat_key    worker:{id}:heartbeat
-- KEYS jobs_key         worker:{id}:jobs
-- KEYS offered_key      workers:offered
-- KEYS serving_key      workers:serving
-- KEYS unhealthy_key    workers:unhealthy
-- KEYS unoffered...     jobs:unoffered:{service} of each of the worker's m services
-- ARGV worker_id
-- ARGV ttl_s:num        heartbeat TTL (s)
-- ARGV lease_ms:num     lease (ms)
-- ARGV n:num            the number of jobs this process is running
-- ARGV running...       n job id, attempt pairs: the jobs this process is running; then m, then m service,
-- health error ('' if healthy) pairs: the services it is configured for (refreshed as offered; their unworkable
-- jobs go back in line, a batch per beat: see offer in _lib); then field, value pairs for the worker hash
-- It runs while Redis is full (keep_running_when_full), and first notes that Redis is there (present: after an
-- outage every lease is moved on by it, before this worker renews its own).
-- A job this worker no longer holds (its lease expired and it was recovered, or it was cancelled) is reported
-- back as lost, so the worker stops working on it; a job whose cancel was requested is reported too (in case
-- the worker missed the cancel message). A job Redis holds for this worker that it does not run, handed to it
-- more than ORPHAN_MS ago (the hand-off message was lost with a connection), is reported as an orphan (id and
-- attempt), for the worker to give back at once rather than leave it until its lease runs out.
-- A beat that waited in Redis's input while Redis was frozen (SIGSTOP, a stall) runs late, with the clock of its
-- sending: it never moves a lease deadline or the last beat back (present may have moved them on meanwhile).
-- Returns {"ok", {lost job ids...}, {cancelled job ids...}, {orphan id, attempt, ...}} or {"unknown"} if the
-- worker record is gone (it must register again).
keep_running_when_full()
if redis.call('EXISTS', worker_key) == 0 then return { 'unknown' } end
present()
local after = offer(worker_id, running_at + 2 * n, offered_key, serving_key, unhealthy_key, unoffered_at,
  ttl_s * 1000)
local fields = {}
for i = after, #ARGV do fields[#fields + 1] = ARGV[i] end
if (tonumber(redis.call('HGET', worker_key, 'last_heartbeat_ms')) or 0) <= NOW_MS then
  redis.call('HSET', worker_key, 'last_heartbeat', NOW_ISO, 'last_heartbeat_ms', NOW_MS, unpack(fields))
  redis.call('SET', heartbeat_key, NOW_ISO, 'EX', ttl_s)
elseif #fields > 0 then
  redis.call('HSET', worker_key, unpack(fields))
end
redis.call('SADD', K_ACTIVE, worker_id)
local ORPHAN_MS = 5000
local lost, cancel, orphans, reported = {}, {}, {}, {}
for i = 1, n do
  local job_id, attempt = ARGV[running_at + 2 * i - 2], ARGV[running_at + 2 * i - 1]
  reported[job_id] = true
  local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'worker_id', 'attempt', 'cancel_requested')
  if ACTIVE[job[1]] and job[2] == worker_id and job[3] == attempt then
    redis.call('ZADD', K_LEASES, 'GT', NOW_MS + lease_ms, job_id)
    if job[4] and job[4] ~= '' then cancel[#cancel + 1] = job_id end
  else
    redis.call('SREM', jobs_key, job_id)
    lost[#lost + 1] = job_id
  end
end
for _, job_id in ipairs(redis.call('SMEMBERS', jobs_key)) do
  if not reported[job_id] then
    local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'worker_id', 'attempt')
    local lease = tonumber(redis.call('ZSCORE', K_LEASES, job_id))
    if not (ACTIVE[job[1]] and job[2] == worker_id) then
      redis.call('SREM', jobs_key, job_id)  -- moved on without this worker long ago
    elseif lease and lease - lease_ms < NOW_MS - ORPHAN_MS then
      orphans[#orphans + 1] = job_id
      orphans[#orphans + 1] = job[3]
    end
  end
end
return { 'ok', lost, cancel, orphans }

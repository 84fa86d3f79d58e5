-- _lib: the shared helpers, loaded into every script after the generated prelude (appliance/scripts.py):
-- the KEYS and ARGV every script receives first are named locals there (PRELUDE_SLOTS: K_PENDING, K_LEASES,
-- P_JOB, NOW_MS, ...), with the status tables ACTIVE and TERMINAL (from appliance.record.JobStatus). Each
-- script's own KEYS and ARGV follow, bound to the names its header declares. Keys named only at run time (the
-- job a claim picks) are built from the prelude's prefixes, which come from appliance/keys.py like every
-- other name.

-- Running work goes on while Redis is full. At maxmemory (noeviction) Redis refuses a script whose first write
-- may add memory (HSET, ZADD, XADD, ...) with OOM, but lets a script that has already written run to its end
-- (Redis 6.2, and 7.x for scripts without flags). The scripts of work already accepted (heartbeats, claims,
-- progress, outcomes, cancels, recovery) start with this write, which adds nothing; submit_job does not, so a
-- full Redis refuses new jobs only.
local function keep_running_when_full()
  redis.call('ZREM', K_LEASES, '')
end

-- Leases count only the time Redis was there to renew them. K_CLOCK holds Redis's own time (TIME: the callers'
-- clocks do not matter) when a script last judged or renewed leases. A holder renews every third of its lease,
-- and idle workers claim every poll interval, so a silence longer than a third of a job's lease means Redis was
-- away (stopped, restarting, unreachable) or nobody was there to renew anything: that job's lease is moved on by
-- the silence beyond that third. Its holder finds the lease as it left it when Redis went away, with the time
-- it had left to renew it or to deliver its outcome; a holder that died meanwhile loses the job within that
-- time after Redis is back. Heartbeats are judged the same way: each registered worker's heartbeat key is moved
-- on by that silence, and one that expired meanwhile (a stop longer than its TTL, or Redis frozen that long) is
-- set again for one lease, so a live worker beats before anyone reports it gone, and a dead one is reported a
-- lease after Redis is back. Called first by every script that expires or renews leases.
local function present()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local last = tonumber(redis.call('GET', K_CLOCK))
  if last and now >= last and now - last < 100 then return end  -- spare the AOF a write per claim
  redis.call('SET', K_CLOCK, now)
  if not last or now - last <= 300 then return end  -- below a third of the shortest lease (1 s)
  local silence, leases = now - last, {}
  local function lease_of(holder)  -- the holder's own lease (WORKER_LEASE_MS of its process), read once each
    local lease = holder and leases[holder]
    if not lease then
      lease = tonumber(holder and redis.call('HGET', P_WORKER .. holder, 'lease_ms')) or LEASE_MS
      if holder then leases[holder] = lease end
    end
    return lease
  end
  for _, job_id in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
    local away = silence - math.floor(lease_of(redis.call('HGET', P_JOB .. job_id, 'worker_id')) / 3)
    if away > 0 then redis.call('ZINCRBY', K_LEASES, away, job_id) end
  end
  for _, worker_id in ipairs(redis.call('SMEMBERS', K_ACTIVE)) do
    local lease = lease_of(worker_id)
    local away = silence - math.floor(lease / 3)
    if away > 0 then
      local beat_key = P_WORKER .. worker_id .. S_HEARTBEAT
      local left = redis.call('PTTL', beat_key)
      if left > 0 then
        redis.call('PEXPIRE', beat_key, left + away)
      elseif left == -2 then
        redis.call('SET', beat_key, NOW_ISO, 'PX', lease)
      end
    end
  end
end

-- A lease deadline `lease_ms` from now, where now is the later of the caller's clock and Redis's (K_CLOCK, as
-- present last set it): a call that waited in Redis's input while it was frozen runs with the clock of its
-- sending, and must not hand out a lease that ran out before it ran.
local function deadline(lease_ms)
  return math.max(NOW_MS, tonumber(redis.call('GET', K_CLOCK)) or 0) + lease_ms
end

-- How long a job waits before its next attempt, having had `retries` retries: exponential backoff with jitter,
-- between half and all of min(RETRY_MAX_MS, RETRY_BASE_MS * 2^retries). The one curve of every retry (a failed
-- attempt, a timeout, a lost worker); `jitter` is a fraction in [0, 1] (ARGV, drawn by the caller).
local function backoff_ms(retries, jitter)
  local step = math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ^ math.min(retries, 40))
  return math.floor(step * (1 + jitter) / 2)
end

-- Append one event to the job's stream and to the appliance-wide stream; returns the job stream entry id.
local function emit(job_id, fields)
  local id = redis.call('XADD', P_PROGRESS .. job_id, 'MAXLEN', '~', PROGRESS_MAXLEN, '*',
    'job_id', job_id, 'updated_at', NOW_ISO, unpack(fields))
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'job_id', job_id, 'updated_at', NOW_ISO,
    unpack(fields))
  return id
end

-- Move a job between status indexes and record the new status, with `fields` (field, value, ...), in one
-- HSET of its hash (each write costs once more in the AOF).
local function set_status(job_id, old, new, seq, fields)
  if old ~= new then
    if old and old ~= '' then redis.call('ZREM', P_STATUS .. old, job_id) end
    redis.call('ZADD', P_STATUS .. new, seq, job_id)
  end
  redis.call('HSET', P_JOB .. job_id, 'status', new, 'updated_at', NOW_ISO, unpack(fields or {}))
end

-- Give a pending job to a worker: out of line, assigned, held under a lease; returns its fields (HGETALL's
-- list), or nil if it was no longer pending (a stale entry in the queue).
-- The shared structures (lease, the worker's set) are written before the job's own record: Redis keeps the
-- writes a script made before a runtime error (a key of the wrong type), and a job must not be left `assigned`
-- in no lease (where recovery would never find it); the record is written last.
local function take(job_id, queue, worker_id, lease_ms)
  local job_key = P_JOB .. job_id
  local job = redis.call('HMGET', job_key, 'status', 'seq', 'attempt')
  if job[1] ~= 'pending' then
    redis.call('ZREM', queue, job_id)
    redis.call('ZREM', K_PENDING, job_id)
    return nil
  end
  redis.call('ZADD', K_LEASES, deadline(lease_ms), job_id)
  redis.call('SADD', P_WORKER .. worker_id .. S_WORKER_JOBS, job_id)
  redis.call('ZREM', queue, job_id)
  redis.call('ZREM', K_PENDING, job_id)
  local attempt = (tonumber(job[3]) or 0) + 1
  set_status(job_id, 'pending', 'assigned', job[2], { 'attempt', attempt, 'worker_id', worker_id,
    'assigned_at', NOW_ISO, 'progress', 0, 'message', '', 'retry_at', '' })
  emit(job_id, { 'event', 'assigned', 'status', 'assigned', 'worker_id', worker_id, 'attempt', attempt,
    'progress', 0 })
  return redis.call('HGETALL', job_key)
end

-- A worker's status as a script sets it, on the events stream (monitors show it as worker_status_changed): the
-- status and job it has now, not as a later read of its record would find them.
local function worker_event(worker_id, old, new, job_id, count)
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', 'worker_status', 'worker_id', worker_id,
    'old_status', old or '', 'status', new, 'current_job_id', job_id, 'current_jobs', count, 'updated_at', NOW_ISO)
end

-- Record on a (registered) worker's hash that it is busy, with `job_id` as its latest job.
local function busy(worker_id, job_id)
  local worker_key = P_WORKER .. worker_id
  local old = redis.call('HGET', worker_key, 'status')
  if old then
    local count = redis.call('SCARD', worker_key .. S_WORKER_JOBS)
    redis.call('HSET', worker_key, 'status', 'busy', 'current_jobs', count, 'last_status_change', NOW_ISO,
      'current_job_id', job_id)
    worker_event(worker_id, old, 'busy', job_id, count)
  end
end

-- A job arrived in `queue` (of `service`): wake a worker. For the service's own queue, one idle worker (one
-- whose last claim emptied this queue and left it free slots; see claim_job) is taken from the idle set and
-- woken alone, so that a job wakes one process, not all; one no longer listening, without a heartbeat or
-- without a free slot now is skipped. Given `job_id`
-- (the job that made the queue non-empty), the job is handed to that worker at once: taken for it here and
-- sent with the wake-up (JSON of its fields), which saves the worker a claim. Busy workers need no wake-up:
-- they claim again as their jobs finish. A requirement class's queue wakes every worker of the service,
-- since only some of them can serve it.
local function wake(service, queue, job_id)
  if queue ~= P_PENDING_SVC .. service then
    redis.call('PUBLISH', P_WAKE .. service, service)
    return
  end
  while true do
    local worker_id = redis.call('SPOP', P_IDLE .. service)
    if not worker_id then return end
    local channel = P_WAKE_WORKER .. worker_id
    local worker = redis.call('HMGET', P_WORKER .. worker_id, 'lease_ms', 'max_concurrent_jobs')
    -- skipped (and so dropped from the idle set): a worker gone quiet, or one a hand-off filled meanwhile
    if redis.call('PUBSUB', 'NUMSUB', channel)[2] > 0
        and redis.call('EXISTS', P_WORKER .. worker_id .. S_HEARTBEAT) == 1
        and redis.call('SCARD', P_WORKER .. worker_id .. S_WORKER_JOBS) < (tonumber(worker[2]) or 1) then
      local lease_ms = job_id and tonumber(worker[1])
      local fields = lease_ms and take(job_id, queue, worker_id, lease_ms)
      if fields then
        busy(worker_id, job_id)
        redis.call('PUBLISH', channel, cjson.encode(fields))
      else
        redis.call('PUBLISH', channel, service)
      end
      return
    end
  end
end

-- Put a job (back) in line at its own score (its priority and original place), in the global view and in
-- its claim queue (the job's `queue` field: jobs:pending:{service}, or a queue for one requirement class).
local function enqueue(job_id, service, queue, score)
  redis.call('ZADD', K_PENDING, score, job_id)
  redis.call('ZADD', queue, score, job_id)
  wake(service, queue)
end

-- Take a job out of every waiting line.
local function dequeue(job_id, queue)
  redis.call('ZREM', K_PENDING, job_id)
  redis.call('ZREM', queue, job_id)
  redis.call('ZREM', K_DELAYED, job_id)
end

-- Bookkeeping for a job that reached a terminal status: each of its keys expires on its own.
local function retire(job_id, status, service)
  local ttl_s = TTL_FAILED
  if status == 'completed' or status == 'cancelled' then ttl_s = TTL_DONE end
  redis.call('ZREM', K_LEASES, job_id)
  redis.call('EXPIRE', P_JOB .. job_id, ttl_s)
  redis.call('EXPIRE', P_PROGRESS .. job_id, ttl_s)
  redis.call('ZADD', K_EXPIRY, NOW_MS + ttl_s * 1000, job_id .. '\t' .. status .. '\t' .. service)
  redis.call('HINCRBY', K_STATS, status, 1)
end

-- Record on the worker's hash how many jobs it still holds (idle when none), if it is still registered.
local function holding(worker_id, worker_key, worker_jobs_key)
  local w = redis.call('HMGET', worker_key, 'status', 'current_job_id')
  if not w[1] then return end
  local left = redis.call('SCARD', worker_jobs_key)
  if left == 0 then
    redis.call('HSET', worker_key, 'current_jobs', 0, 'last_status_change', NOW_ISO, 'status', 'idle',
      'current_job_id', '')
    worker_event(worker_id, w[1], 'idle', '', 0)
  else
    redis.call('HSET', worker_key, 'current_jobs', left, 'last_status_change', NOW_ISO)
    worker_event(worker_id, w[1], w[1], w[2] or '', left)
  end
end

-- Release a worker's hold on a job (worker hash counters and its set of held jobs).
local function unhold(worker_id, worker_key, worker_jobs_key, job_id)
  if redis.call('SREM', worker_jobs_key, job_id) == 1 then holding(worker_id, worker_key, worker_jobs_key) end
end

-- The job's status, seq, service, score, retry_count, max_retries and started_at if `worker_id` holds it
-- under `attempt`; otherwise nil and why ("not_found", or "lost": the job moved on without this worker, and
-- leaves the worker's set of held jobs, `worker_jobs_key`, when given).
local function held(job_id, worker_id, attempt, worker_jobs_key)
  local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'worker_id', 'attempt', 'seq',
    'service_required', 'score', 'retry_count', 'max_retries', 'started_at', 'queue', 'cancel_requested')
  if not job[1] then return nil, 'not_found' end
  if not ACTIVE[job[1]] or job[2] ~= worker_id or job[3] ~= attempt then
    if worker_jobs_key then redis.call('SREM', worker_jobs_key, job_id) end
    return nil, 'lost'
  end
  return { status = job[1], seq = job[4], service = job[5], score = job[6],
    retry_count = tonumber(job[7]) or 0, max_retries = tonumber(job[8]) or 0, started_at = job[9],
    queue = job[10], cancel_requested = job[11] and job[11] ~= '' }
end

-- End a job whose cancel was requested while it ran (its worker stopped, failed or handed it back).
local function end_cancelled(job_id, status, seq, service, worker_id)
  set_status(job_id, status, 'cancelled', seq, { 'error', 'Job cancelled by user', 'cancelled_at', NOW_ISO })
  emit(job_id, { 'event', 'cancelled', 'status', 'cancelled', 'worker_id', worker_id,
    'error', 'Job cancelled by user', 'message', 'Job cancelled by user' })
  retire(job_id, 'cancelled', service)
end

-- Add one to a counter on a worker's hash, if the worker is still registered.
local function count(worker_key, field)
  if redis.call('EXISTS', worker_key) == 1 then redis.call('HINCRBY', worker_key, field, 1) end
end

-- Retire a worker that is gone (its record, heartbeat and set of held jobs), telling monitors at once. One that
-- is alive after all (frozen, cut off) finds no record at its next heartbeat and registers again.
local function lose_worker(worker_id, reason)
  local worker_key = P_WORKER .. worker_id
  redis.call('DEL', worker_key, worker_key .. S_HEARTBEAT, worker_key .. S_WORKER_JOBS)
  redis.call('SREM', K_ACTIVE, worker_id)
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', 'worker_disconnected',
    'worker_id', worker_id, 'reason', reason, 'updated_at', NOW_ISO)
end

-- Jobs whose lease ran out (their worker died, froze, or lost Redis for longer than the lease while Redis was
-- there; see present): each counts a retry, records last_failed_worker and waits its backoff in jobs:delayed
-- like any failed attempt, so a job that keeps killing its worker does not take down one worker after another
-- at once; past max_retries it ends failed ("worker lost"); one whose cancel was requested ends cancelled. A
-- holder that has not beaten for a whole lease is lost: retired at once (lose_worker). `why` says what happened
-- to the worker (default: it stopped renewing). Returns how many leases were handled and the workers retired.
local function recover_expired(limit, why)
  present()
  why = why or 'stopped renewing its lease'
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW_MS, 'LIMIT', 0, limit)
  local lost = {}
  for n, job_id in ipairs(expired) do
    redis.call('ZREM', K_LEASES, job_id)
    local job_key = P_JOB .. job_id
    local j = redis.call('HMGET', job_key, 'status', 'worker_id', 'seq', 'service_required', 'score',
      'retry_count', 'max_retries', 'queue', 'cancel_requested')
    local status, worker_id, seq, service = j[1], j[2], j[3], j[4]
    if ACTIVE[status] then
      local holder = redis.call('HMGET', P_WORKER .. worker_id, 'last_heartbeat_ms', 'lease_ms')
      local beat = tonumber(holder[1])
      if beat and NOW_MS - beat >= (tonumber(holder[2]) or LEASE_MS) then
        lose_worker(worker_id, 'its lease expired: ' .. why)
        lost[#lost + 1] = worker_id
      end
      -- otherwise the job stays in the holder's set: its next heartbeat finds it gone and reports it lost
      local retries, max_retries = tonumber(j[6]) or 0, tonumber(j[7]) or 0
      if j[9] and j[9] ~= '' then
        end_cancelled(job_id, status, seq, service, worker_id)
      elseif retries < max_retries then
        local err = 'worker lost: ' .. worker_id .. ' ' .. why
        local jitter = JITTER  -- spread over the jobs of one call (the golden ratio's fraction apart)
        if n > 1 then jitter = (JITTER + (n - 1) * 0.6180339887) % 1 end
        local due = NOW_MS + backoff_ms(retries, jitter)
        set_status(job_id, status, 'pending', seq, { 'retry_count', retries + 1, 'last_failed_worker', worker_id,
          'worker_id', '', 'error', err, 'failed_at', NOW_ISO, 'progress', 0, 'retry_at', due })
        emit(job_id, { 'event', 'retrying', 'status', 'retrying', 'worker_id', worker_id, 'error', err,
          'message', err, 'retry_count', retries + 1, 'max_retries', max_retries, 'will_retry', 'true',
          'retry_at', due })
        if due > NOW_MS then
          redis.call('ZADD', K_DELAYED, due, job_id)
        else
          enqueue(job_id, service, j[8], j[5])
        end
      else
        local err = 'worker lost: ' .. worker_id .. ' ' .. why .. ', and no retries are left'
        set_status(job_id, status, 'failed', seq, { 'error', err, 'failed_at', NOW_ISO, 'last_failed_worker', worker_id })
        emit(job_id, { 'event', 'failed', 'status', 'failed', 'worker_id', worker_id, 'error', err,
          'message', err, 'retry_count', retries, 'will_retry', 'false', 'failed_at', NOW_ISO })
        retire(job_id, 'failed', service)
      end
    end
  end
  return #expired, lost
end

-- Put up to `limit` retries that are due back in line, each at its own score (priority and place).
local function promote_due(limit)
  for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', NOW_MS, 'LIMIT', 0, limit)) do
    local job = redis.call('HMGET', P_JOB .. job_id, 'service_required', 'score', 'status', 'queue')
    redis.call('ZREM', K_DELAYED, job_id)
    if job[1] and job[3] == 'pending' then enqueue(job_id, job[1], job[4], job[2]) end
  end
end

-- Take a pending job (already out of its claim queue) out of line into `unworkable_key` (a zset with the
-- claim queues' scores, so that it can go back where it was) as `unworkable`, with the reason.
local function make_unworkable(job_id, seq, score, unworkable_key, reason)
  redis.call('ZREM', K_PENDING, job_id)
  redis.call('ZADD', unworkable_key, score, job_id)
  set_status(job_id, 'pending', 'unworkable', seq, { 'unworkable_reason', reason, 'unworkable_at', NOW_ISO })
  emit(job_id, { 'event', 'unworkable', 'status', 'unworkable', 'message', reason, 'error', reason })
end

-- Put up to `limit` of the best jobs of `unworkable_key` back in line, each at its own score and in the claim
-- queue its `queue` field names; members no longer `unworkable` (cancelled meanwhile) are only removed.
-- Returns how many went back.
local function revive(unworkable_key, message, limit)
  local heads = redis.call('ZREVRANGE', unworkable_key, 0, limit - 1, 'WITHSCORES')
  local revived = 0
  for i = 1, #heads, 2 do
    local job_id, score = heads[i], heads[i + 1]
    redis.call('ZREM', unworkable_key, job_id)
    local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'seq', 'service_required', 'queue')
    if job[1] == 'unworkable' then
      set_status(job_id, 'unworkable', 'pending', job[2], { 'unworkable_reason', '', 'unworkable_at', '' })
      emit(job_id, { 'event', 'requeued', 'status', 'pending', 'message', message, 'progress', 0 })
      enqueue(job_id, job[3], job[4], score)
      revived = revived + 1
    end
  end
  return revived
end

-- Services offered by workers. A service counts as offered while a registered worker had it configured
-- within the window (ARGV of the caller, ms), so that a worker restarting does not turn its jobs unworkable.
-- Nil if `service` was offered since `since_ms`, or if no service was (no worker at all: the appliance is
-- starting or its workers are down, which is no judgement on the service; its jobs wait, and say why, see
-- appliance/queue.py); else why its jobs cannot be served, naming the services offered.
local function unoffered(offered_key, service, since_ms)
  local last = tonumber(redis.call('ZSCORE', offered_key, service))
  if last and last >= since_ms then return nil end
  local known = redis.call('ZRANGEBYSCORE', offered_key, since_ms, '+inf')
  if #known == 0 then return nil end
  table.sort(known)
  return "no registered worker offers service '" .. service .. "'; services offered in the last " ..
    math.floor((NOW_MS - since_ms) / 1000) .. 's: ' .. table.concat(known, ', ')
end

-- A registered worker's services, as its register or heartbeat reports them: ARGV[at] = n, then n pairs
-- (service, '' when healthy on it or else its health error); KEYS[unoffered_at ..] = jobs:unoffered:{service} of
-- each service in order. Each counts as offered now (in offered_key, workers:offered); a healthy one as served
-- now (serving_key, workers:serving; its waiting note in unhealthy_key, workers:unhealthy, cleared); an
-- unhealthy one, unless some worker served it within `fresh_ms`, gets the note of why its jobs wait. A batch
-- (1000) of the unworkable jobs of each goes back in line. Returns the index of the ARGV after the pairs, and how
-- many unworkable jobs are left (for the caller to revive with revive_unworkable).
local function offer(worker_id, at, offered_key, serving_key, unhealthy_key, unoffered_at, fresh_ms)
  local n, left = tonumber(ARGV[at]), 0
  for i = 1, n do
    local service, err = ARGV[at + 2 * i - 1], ARGV[at + 2 * i]
    redis.call('ZADD', offered_key, NOW_MS, service)
    if err == '' then
      redis.call('ZADD', serving_key, NOW_MS, service)
      redis.call('HDEL', unhealthy_key, service)
    elseif (tonumber(redis.call('ZSCORE', serving_key, service)) or 0) < NOW_MS - fresh_ms then
      redis.call('HSET', unhealthy_key, service,
        "service '" .. service .. "' is configured on " .. worker_id .. ' but unhealthy: ' .. err)
    end
    local unoffered_key = KEYS[unoffered_at + i - 1]
    if redis.call('ZCARD', unoffered_key) > 0 then
      revive(unoffered_key, 'worker ' .. worker_id .. " offers service '" .. service .. "'", 1000)
      left = left + redis.call('ZCARD', unoffered_key)
    end
  end
  return at + 2 * n + 1, left
end

-- fail_job: record a failed attempt; retry it later (keeping its priority and place) or end it.
-- KEYS[8] worker:{id}:jobs   KEYS[9] worker:{id}
-- ARGV[17] job id  ARGV[18] worker id  ARGV[19] attempt  ARGV[20] error message
-- ARGV[21] 1 if the failure may be retried, else 0   ARGV[22] retry delay (ms, backoff with jitter)
-- ARGV[23] terminal status if it ends: failed, timeout, cancelled
-- A retry happens while retry_count < max_retries; it counts one retry and records last_failed_worker.
-- A job whose cancel was requested meanwhile ends cancelled instead.
-- Returns {"retrying", retry_count, due_ms} or {"ended", status} or {"not_found"} / {"lost"}.
local job_id, worker_id, attempt = ARGV[FIRST_ARG], ARGV[FIRST_ARG + 1], ARGV[FIRST_ARG + 2]
local err, retryable = ARGV[FIRST_ARG + 3], ARGV[FIRST_ARG + 4] == '1'
local delay_ms, final = tonumber(ARGV[FIRST_ARG + 5]), ARGV[FIRST_ARG + 6]
local job, why = held(job_id, worker_id, attempt)
if not job then
  if why == 'lost' then redis.call('SREM', KEYS[FIRST_KEY], job_id) end
  return { why }
end
local job_key = P_JOB .. job_id
unhold(KEYS[FIRST_KEY + 1], KEYS[FIRST_KEY], job_id)
if job.cancel_requested then
  end_cancelled(job_id, job.status, job.seq, job.service, worker_id)
  return { 'ended', 'cancelled' }
end
redis.call('ZREM', K_LEASES, job_id)
if retryable and job.retry_count < job.max_retries then
  local retries = job.retry_count + 1
  local due = NOW_MS + delay_ms
  set_status(job_id, job.status, 'pending', job.seq, { 'retry_count', retries, 'last_failed_worker', worker_id, 'worker_id', '',
    'error', err, 'failed_at', NOW_ISO, 'progress', 0, 'retry_at', due })
  emit(job_id, { 'event', 'retrying', 'status', 'retrying', 'worker_id', worker_id, 'error', err,
    'message', err, 'retry_count', retries, 'max_retries', job.max_retries, 'will_retry', 'true',
    'retry_at', due })
  if delay_ms > 0 then
    redis.call('ZADD', K_DELAYED, due, job_id)
  else
    enqueue(job_id, job.service, job.queue, job.score)
  end
  return { 'retrying', retries, due }
end
set_status(job_id, job.status, final, job.seq, { 'error', err, 'failed_at', NOW_ISO, 'last_failed_worker', worker_id })
if final == 'failed' or final == 'timeout' then
  count(KEYS[FIRST_KEY + 1], 'total_jobs_failed')
end
emit(job_id, { 'event', final, 'status', final, 'worker_id', worker_id, 'error', err, 'message', err,
  'retry_count', job.retry_count, 'will_retry', 'false', 'failed_at', NOW_ISO })
retire(job_id, final, job.service)
return { 'ended', final }

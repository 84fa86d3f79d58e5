-- fail_job: record a failed attempt; retry it later (keeping its priority and place) or end it.
-- KEYS jobs_key      worker:{id}:jobs
-- KEYS worker_key    worker:{id}
-- ARGV job_id
-- ARGV worker_id
-- ARGV attempt
-- ARGV err           error message
-- ARGV retryable     1 if the failure may be retried, else 0
-- ARGV final         terminal status if it ends: failed, timeout, cancelled
-- ARGV details       error details (JSON text, '' for none): stored as error_details and sent with the event
-- A retry happens while retry_count < max_retries; it counts one retry, records last_failed_worker and waits
-- its backoff (backoff_ms in _lib, from the prelude's ARGV) in jobs:delayed, or goes back in line at once when
-- that is 0. Either way the job's `message` becomes the error (not the last progress line). A job whose cancel
-- was requested meanwhile ends cancelled instead.
-- Returns {"retrying", retry_count, due_ms} or {"ended", status} or {"not_found"} / {"lost"}.
keep_running_when_full()
retryable = retryable == '1'
details = details or ''
local job, why = held(job_id, worker_id, attempt, jobs_key)
if not job then return { why } end
if job.cancel_requested then
  end_cancelled(job_id, job.status, job.seq, job.service, worker_id)
  unhold(worker_id, worker_key, jobs_key, job_id)
  return { 'ended', 'cancelled' }
end
redis.call('ZREM', K_LEASES, job_id)
if retryable and job.retry_count < job.max_retries then
  local retries = job.retry_count + 1
  local due = NOW_MS + backoff_ms(job.retry_count, JITTER)
  set_status(job_id, job.status, 'pending', job.seq, { 'retry_count', retries, 'last_failed_worker', worker_id,
    'worker_id', '', 'error', err, 'message', err, 'error_details', details, 'failed_at', NOW_ISO, 'progress', 0,
    'retry_at', due })
  emit(job_id, { 'event', 'retrying', 'status', 'retrying', 'worker_id', worker_id, 'error', err,
    'message', err, 'retry_count', retries, 'max_retries', job.max_retries, 'will_retry', 'true',
    'retry_at', due, 'error_details', details })
  if due > NOW_MS then
    redis.call('ZADD', K_DELAYED, due, job_id)
  else
    enqueue(job_id, job.service, job.queue, job.score)
  end
  unhold(worker_id, worker_key, jobs_key, job_id)
  return { 'retrying', retries, due }
end
set_status(job_id, job.status, final, job.seq, { 'error', err, 'message', err, 'error_details', details,
  'failed_at', NOW_ISO, 'last_failed_worker', worker_id })
if final == 'failed' or final == 'timeout' then
  count(worker_key, 'total_jobs_failed')
end
emit(job_id, { 'event', final, 'status', final, 'worker_id', worker_id, 'error', err, 'message', err,
  'retry_count', job.retry_count, 'will_retry', 'false', 'failed_at', NOW_ISO, 'error_details', details })
retire(job_id, final, job.service)
unhold(worker_id, worker_key, jobs_key, job_id)
return { 'ended', final }

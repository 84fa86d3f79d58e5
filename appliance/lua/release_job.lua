-- release_job: hand a held job back to the queue at its priority and place, without counting a retry
-- (a worker draining on shutdown, or giving back a job it was handed but will not run).
-- KEYS jobs_key      worker:{id}:jobs
-- KEYS worker_key    worker:{id}
-- ARGV job_id
-- ARGV worker_id
-- ARGV attempt
-- ARGV reason
-- A job whose cancel was requested meanwhile ends cancelled instead.
-- Returns {"ok"}, {"cancelled"} or {"not_found"} / {"lost"}.
keep_running_when_full()
local job, why = held(job_id, worker_id, attempt, jobs_key)
if not job then return { why } end
if job.cancel_requested then
  end_cancelled(job_id, job.status, job.seq, job.service, worker_id)
  unhold(worker_id, worker_key, jobs_key, job_id)
  return { 'cancelled' }
end
redis.call('ZREM', K_LEASES, job_id)
set_status(job_id, job.status, 'pending', job.seq, { 'worker_id', '', 'progress', 0 })
emit(job_id, { 'event', 'requeued', 'status', 'pending', 'worker_id', worker_id, 'message', reason,
  'progress', 0 })
enqueue(job_id, job.service, job.queue, job.score)
unhold(worker_id, worker_key, jobs_key, job_id)
return { 'ok' }

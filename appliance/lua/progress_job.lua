-- progress_job: record one progress step of a running job (refused unless the caller still holds it).
-- KEYS jobs_key    worker:{id}:jobs
-- ARGV job_id
-- ARGV worker_id
-- ARGV attempt
-- ARGV percent     0..100
-- ARGV message
-- ARGV step        current step
-- ARGV total       total steps
-- The first step moves the job from assigned to in_progress (with its own "in_progress" event).
-- Returns {"ok", stream entry id} or {"not_found"} / {"lost"}.
keep_running_when_full()
local job, why = held(job_id, worker_id, attempt, jobs_key)
if not job then return { why } end
if job.status == 'assigned' then
  set_status(job_id, 'assigned', 'in_progress', job.seq, { 'started_at', NOW_ISO, 'progress', percent,
    'message', message, 'current_step', step, 'total_steps', total })
  emit(job_id, { 'event', 'in_progress', 'status', 'in_progress', 'worker_id', worker_id, 'progress', percent })
else
  redis.call('HSET', P_JOB .. job_id, 'progress', percent, 'message', message, 'current_step', step,
    'total_steps', total)
end
local id = emit(job_id, { 'event', 'progress', 'status', 'in_progress', 'worker_id', worker_id,
  'progress', percent, 'message', message, 'current_step', step, 'total_steps', total })
return { 'ok', id }

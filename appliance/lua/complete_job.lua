-- complete_job: finish a job with its result (refused unless the caller still holds it).
-- KEYS[8] worker:{id}:jobs   KEYS[9] worker:{id}
-- ARGV[15] job id  ARGV[16] worker id  ARGV[17] attempt  ARGV[18] result (JSON)  ARGV[19] message
-- Idempotent: completing again what this attempt already completed returns ok.
-- Returns {"ok"} or {"not_found"} / {"lost"}.
local job_id, worker_id, attempt = ARGV[FIRST_ARG], ARGV[FIRST_ARG + 1], ARGV[FIRST_ARG + 2]
local result, message = ARGV[FIRST_ARG + 3], ARGV[FIRST_ARG + 4]
local job, why = held(job_id, worker_id, attempt)
if not job then
  -- A retried call (the reply was lost with the connection) finds its own completion: that is success.
  local done = redis.call('HMGET', P_JOB .. job_id, 'status', 'worker_id', 'attempt')
  if done[1] == 'completed' and done[2] == worker_id and done[3] == attempt then return { 'ok' } end
  if why == 'lost' then redis.call('SREM', KEYS[FIRST_KEY], job_id) end
  return { why }
end
local started = job.started_at
if started == false or started == '' then started = NOW_ISO end
set_status(job_id, job.status, 'completed', job.seq, { 'result', result, 'progress', 100, 'message', message,
  'completed_at', NOW_ISO, 'error', '', 'started_at', started })
unhold(KEYS[FIRST_KEY + 1], KEYS[FIRST_KEY], job_id)
count(KEYS[FIRST_KEY + 1], 'total_jobs_completed')
emit(job_id, { 'event', 'completed', 'status', 'completed', 'worker_id', worker_id, 'progress', 100,
  'message', message, 'result', result, 'completed_at', NOW_ISO })
retire(job_id, 'completed', job.service)
return { 'ok' }

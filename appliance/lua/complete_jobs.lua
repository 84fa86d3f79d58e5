-- complete_jobs: finish jobs of one worker with their results (each refused unless the worker still holds it).
-- KEYS jobs_key      worker:{id}:jobs
-- KEYS worker_key    worker:{id}
-- ARGV worker_id
-- ARGV jobs...       four per job: job id, attempt, result (JSON), message
-- A batch is one call: the worker's hash is updated once for all of them (jobs finishing together).
-- Idempotent: completing again what this attempt already completed returns ok.
-- Returns one code per job, in order: "ok", "not_found" or "lost".
keep_running_when_full()
local codes, completed, released = {}, 0, 0
for i = jobs_at, #ARGV, 4 do
  local job_id, attempt, result, message = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local job, why = held(job_id, worker_id, attempt)
  if job then
    local started = job.started_at
    if started == false or started == '' then started = NOW_ISO end
    set_status(job_id, job.status, 'completed', job.seq, { 'result', result, 'progress', 100, 'message', message,
      'completed_at', NOW_ISO, 'error', '', 'started_at', started })
    emit(job_id, { 'event', 'completed', 'status', 'completed', 'worker_id', worker_id, 'progress', 100,
      'message', message, 'result', result, 'completed_at', NOW_ISO })
    retire(job_id, 'completed', job.service)
    completed = completed + 1
    why = 'ok'
  else
    -- A retried call (the reply was lost with the connection) finds its own completion: that is success.
    local done = redis.call('HMGET', P_JOB .. job_id, 'status', 'worker_id', 'attempt')
    if done[1] == 'completed' and done[2] == worker_id and done[3] == attempt then why = 'ok' end
  end
  if why ~= 'not_found' then released = released + redis.call('SREM', jobs_key, job_id) end
  codes[#codes + 1] = why
end
if released > 0 then holding(worker_id, worker_key, jobs_key) end
if completed > 0 and redis.call('EXISTS', worker_key) == 1 then
  redis.call('HINCRBY', worker_key, 'total_jobs_completed', completed)
end
return codes

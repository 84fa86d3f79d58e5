-- cancel_job: cancel a job at once, whatever state its worker is in.
-- KEYS job_key          job:{id}
-- ARGV job_id
-- ARGV cancel_channel   workers filter its messages by worker id
-- ARGV reason
-- A pending job (or one waiting for a retry, or unworkable) leaves every line and ends cancelled. A running one
-- ends cancelled too, and its worker is fenced: the job leaves its set of held jobs and its lease, so whatever the
-- worker writes for that attempt later (progress, result, failure) is refused, even from a worker that was frozen
-- or cut off when the cancel came. The worker is told on the cancel channel and stops the connector; one that
-- missed the message learns it at its next heartbeat (the job is reported lost).
-- Returns {"cancelled"} | {"cancelling", worker_id} (was running) | {"finished", status} | {"not_found"}.
keep_running_when_full()
local job = redis.call('HMGET', job_key, 'status', 'seq', 'service_required', 'worker_id', 'queue')
local status, seq, service, worker_id, queue = job[1], job[2], job[3], job[4], job[5]
if not status then return { 'not_found' } end
if TERMINAL[status] then return { 'finished', status } end
local running = ACTIVE[status] and worker_id and worker_id ~= ''
if not running then dequeue(job_id, queue) end
set_status(job_id, status, 'cancelled', seq, { 'error', reason, 'cancelled_at', NOW_ISO })
if running then
  emit(job_id, { 'event', 'cancelled', 'status', 'cancelled', 'worker_id', worker_id, 'error', reason,
    'message', reason })
else
  emit(job_id, { 'event', 'cancelled', 'status', 'cancelled', 'error', reason, 'message', reason })
end
retire(job_id, 'cancelled', service)
if not running then return { 'cancelled' } end
local worker_key = P_WORKER .. worker_id
unhold(worker_id, worker_key, worker_key .. S_WORKER_JOBS, job_id)
redis.call('PUBLISH', cancel_channel, cjson.encode({ job_id = job_id, worker_id = worker_id }))
return { 'cancelling', worker_id }

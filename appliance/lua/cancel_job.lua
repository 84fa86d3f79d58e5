-- cancel_job: cancel a job. A pending job ends at once; a running one is flagged and its worker is told.
-- KEYS[8] job:{id}
-- ARGV[17] job id   ARGV[18] cancel channel (workers filter by worker id)   ARGV[19] reason
-- Returns {"cancelled"} | {"cancelling", worker_id} | {"finished", status} | {"not_found"}.
local job_key, job_id = KEYS[FIRST_KEY], ARGV[FIRST_ARG]
local cancel_channel, reason = ARGV[FIRST_ARG + 1], ARGV[FIRST_ARG + 2]
local job = redis.call('HMGET', job_key, 'status', 'seq', 'service_required', 'worker_id', 'queue')
local status, seq, service, worker_id, queue = job[1], job[2], job[3], job[4], job[5]
if not status then return { 'not_found' } end
if TERMINAL[status] then return { 'finished', status } end
if ACTIVE[status] then
  redis.call('HSET', job_key, 'cancel_requested', NOW_ISO)
  redis.call('PUBLISH', cancel_channel, cjson.encode({ job_id = job_id, worker_id = worker_id }))
  return { 'cancelling', worker_id }
end
dequeue(job_id, queue)
set_status(job_id, status, 'cancelled', seq, { 'error', reason, 'cancelled_at', NOW_ISO })
emit(job_id, { 'event', 'cancelled', 'status', 'cancelled', 'error', reason, 'message', reason })
retire(job_id, 'cancelled', service)
return { 'cancelled' }

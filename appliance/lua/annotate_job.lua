-- annotate_job: record a running attempt's own fields on its job (a connector's, e.g. comfyui_prompt_id), and
-- optionally emit an event on the job's stream (e.g. "preview"); refused unless the caller still holds the job.
-- KEYS jobs_key       worker:{id}:jobs
-- ARGV job_id
-- ARGV worker_id
-- ARGV attempt
-- ARGV event          event name ('' for none)
-- ARGV fields...      field, value pairs (the caller checks the names: only `<service>_...`)
-- Returns {"ok"} or {"not_found"} / {"lost"}.
keep_running_when_full()
local job, why = held(job_id, worker_id, attempt, jobs_key)
if not job then return { why } end
local fields = {}
for i = fields_at, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then
  redis.call('HSET', P_JOB .. job_id, unpack(fields))
end
if event ~= '' then
  emit(job_id, { 'event', event, 'status', job.status, 'worker_id', worker_id, unpack(fields) })
end
return { 'ok' }

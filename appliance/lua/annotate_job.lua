-- annotate_job: record a running attempt's own fields on its job (a connector's, e.g. comfyui_prompt_id), and
-- optionally emit an event on the job's stream (e.g. "preview"); refused unless the caller still holds the job.
-- KEYS[10] worker:{id}:jobs
-- ARGV[21] job id  ARGV[22] worker id  ARGV[23] attempt  ARGV[24] event name ('' for none)
-- ARGV[25..] field, value pairs (the caller checks the names: only `<service>_...`)
-- Returns {"ok"} or {"not_found"} / {"lost"}.
keep_running_when_full()
local job_id, worker_id, attempt, event = ARGV[FIRST_ARG], ARGV[FIRST_ARG + 1], ARGV[FIRST_ARG + 2],
  ARGV[FIRST_ARG + 3]
local job, why = held(job_id, worker_id, attempt)
if not job then
  if why == 'lost' then redis.call('SREM', KEYS[FIRST_KEY], job_id) end
  return { why }
end
local fields = {}
for i = FIRST_ARG + 4, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then
  redis.call('HSET', P_JOB .. job_id, unpack(fields))
end
if event ~= '' then
  emit(job_id, { 'event', event, 'status', job.status, 'worker_id', worker_id, unpack(fields) })
end
return { 'ok' }

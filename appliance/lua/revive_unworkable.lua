-- revive_unworkable: put the unworkable jobs of a requirement class back in line (a worker that can serve
-- the class registered), each at its own score (priority and original place).
-- KEYS[8] the class's unworkable jobs      zset jobs:unworkable:{class id}
-- ARGV[FIRST_ARG] message for the event   ARGV[FIRST_ARG + 1] at most this many jobs per call
-- Each job goes back to the claim queue named by its `queue` field. Members that are no longer
-- `unworkable` (cancelled meanwhile) are only removed.
-- Returns {jobs revived, jobs still unworkable}.
local unworkable_key = KEYS[FIRST_KEY]
local message, limit = ARGV[FIRST_ARG], tonumber(ARGV[FIRST_ARG + 1])
local heads = redis.call('ZREVRANGE', unworkable_key, 0, limit - 1, 'WITHSCORES')
local revived = 0
for i = 1, #heads, 2 do
  local job_id, score = heads[i], heads[i + 1]
  redis.call('ZREM', unworkable_key, job_id)
  local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'seq', 'service_required', 'queue')
  if job[1] == 'unworkable' then
    set_status(job_id, 'unworkable', 'pending', job[2], { 'unworkable_reason', '', 'unworkable_at', '' })
    emit(job_id, { 'event', 'requeued', 'status', 'pending', 'message', message, 'progress', 0 })
    enqueue(job_id, job[3], job[4], score)
    revived = revived + 1
  end
end
return { revived, redis.call('ZCARD', unworkable_key) }

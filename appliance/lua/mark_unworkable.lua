-- mark_unworkable: move the pending jobs of a requirement class that no registered worker can serve out of
-- line, with status `unworkable` and the reason (they return with revive_unworkable).
-- KEYS[8] the class's claim queue          zset jobs:pending:{service}:req:{class id}
-- KEYS[9] the class's unworkable jobs      zset jobs:unworkable:{class id}, same scores
-- ARGV[FIRST_ARG] reason   ARGV[FIRST_ARG + 1] at most this many jobs per call
-- Members of the queue that are no longer pending are only removed from it.
-- Returns {jobs marked, jobs still in the queue}.
local queue_key, unworkable_key = KEYS[FIRST_KEY], KEYS[FIRST_KEY + 1]
local reason, limit = ARGV[FIRST_ARG], tonumber(ARGV[FIRST_ARG + 1])
local heads = redis.call('ZREVRANGE', queue_key, 0, limit - 1, 'WITHSCORES')
local marked = 0
for i = 1, #heads, 2 do
  local job_id, score = heads[i], heads[i + 1]
  redis.call('ZREM', queue_key, job_id)
  local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'seq')
  if job[1] == 'pending' then
    redis.call('ZREM', K_PENDING, job_id)
    redis.call('ZADD', unworkable_key, score, job_id)
    set_status(job_id, 'pending', 'unworkable', job[2], { 'unworkable_reason', reason, 'unworkable_at', NOW_ISO })
    emit(job_id, { 'event', 'unworkable', 'status', 'unworkable', 'message', reason, 'error', reason })
    marked = marked + 1
  end
end
return { marked, redis.call('ZCARD', queue_key) }

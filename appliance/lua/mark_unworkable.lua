-- mark_unworkable: move the pending jobs of a claim queue that no registered worker can serve out of line,
-- with status `unworkable` and the reason (they return with revive_unworkable): the queue of a requirement
-- class nobody can serve, or a queue of a service nobody offered lately.
-- KEYS[10] the claim queue         zset jobs:pending:{service}:req:{class id} or jobs:pending:{service}
-- KEYS[11] the unworkable jobs     zset jobs:unworkable:{class id} or jobs:unoffered:{service}, same scores
-- for a service nobody offered only:
-- KEYS[12] workers:offered         zset service -> when a worker last offered it (ms)
-- ARGV[FIRST_ARG] reason ('' with KEYS[12]: it names the services offered)
-- ARGV[FIRST_ARG + 1] at most this many jobs per call
-- with KEYS[12] only: ARGV[FIRST_ARG + 2] the service   ARGV[FIRST_ARG + 3] offered window (ms)
-- With KEYS[12], nothing is marked if the service was offered within the window (a worker registered since
-- the caller looked). Members of the queue that are no longer pending are only removed from it.
-- Returns {jobs marked, jobs still in the queue} ({0, 0} when the service is offered).
local queue_key, unworkable_key = KEYS[FIRST_KEY], KEYS[FIRST_KEY + 1]
local reason, limit = ARGV[FIRST_ARG], tonumber(ARGV[FIRST_ARG + 1])
if KEYS[FIRST_KEY + 2] then
  reason = unoffered(KEYS[FIRST_KEY + 2], ARGV[FIRST_ARG + 2], NOW_MS - tonumber(ARGV[FIRST_ARG + 3]))
  if not reason then return { 0, 0 } end
end
local heads = redis.call('ZREVRANGE', queue_key, 0, limit - 1, 'WITHSCORES')
local marked = 0
for i = 1, #heads, 2 do
  local job_id, score = heads[i], heads[i + 1]
  redis.call('ZREM', queue_key, job_id)
  local job = redis.call('HMGET', P_JOB .. job_id, 'status', 'seq')
  if job[1] == 'pending' then
    make_unworkable(job_id, job[2], score, unworkable_key, reason)
    marked = marked + 1
  end
end
return { marked, redis.call('ZCARD', queue_key) }

-- mark_unworkable: move the pending jobs of a claim queue that no registered worker can serve out of line,
-- with status `unworkable` and the reason (they return with revive_unworkable): the queue of a requirement
-- class nobody can serve, or a queue of a service nobody offered lately.
-- KEYS queue_key        the claim queue: zset jobs:pending:{service}:req:{class id} or jobs:pending:{service}
-- KEYS unworkable_key   zset jobs:unworkable:{class id} or jobs:unoffered:{service}, same scores
-- KEYS offered_key?     (a service nobody offered only) workers:offered: service -> when last offered (ms)
-- ARGV reason           ('' with offered_key: it names the services offered)
-- ARGV limit:num        at most this many jobs per call
-- ARGV service?         (with offered_key only) the service
-- ARGV window_ms?       (with offered_key only) offered window (ms)
-- With offered_key, nothing is marked if the service was offered within the window (a worker registered since
-- the caller looked). Members of the queue that are no longer pending are only removed from it.
-- Returns {jobs marked, jobs still in the queue} ({0, 0} when the service is offered).
if offered_key then
  reason = unoffered(offered_key, service, NOW_MS - tonumber(window_ms))
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

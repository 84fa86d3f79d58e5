-- revive_unworkable: put unworkable jobs back in line (a worker that can serve them registered), each at its
-- own score (priority and original place).
-- KEYS unworkable_key   zset jobs:unworkable:{class id} (a requirement class) or jobs:unoffered:{service} (a
-- service no worker offered)
-- ARGV message          message for the event
-- ARGV limit:num        at most this many jobs per call
-- Each job goes back to the claim queue named by its `queue` field. Members that are no longer
-- `unworkable` (cancelled meanwhile) are only removed.
-- Returns {jobs revived, jobs still unworkable}.
local revived = revive(unworkable_key, message, limit)
return { revived, redis.call('ZCARD', unworkable_key) }

-- revive_unworkable: put unworkable jobs back in line (a worker that can serve them registered), each at its
-- own score (priority and original place).
-- KEYS[10] the unworkable jobs     zset jobs:unworkable:{class id} (a requirement class) or
--                                  jobs:unoffered:{service} (a service no worker offered)
-- ARGV[FIRST_ARG] message for the event   ARGV[FIRST_ARG + 1] at most this many jobs per call
-- Each job goes back to the claim queue named by its `queue` field. Members that are no longer
-- `unworkable` (cancelled meanwhile) are only removed.
-- Returns {jobs revived, jobs still unworkable}.
local unworkable_key = KEYS[FIRST_KEY]
local revived = revive(unworkable_key, ARGV[FIRST_ARG], tonumber(ARGV[FIRST_ARG + 1]))
return { revived, redis.call('ZCARD', unworkable_key) }

-- submit_job: create a job and put it in line (recording its requirement class, if it has one).
-- KEYS[10] job:{id}                   hash, must not exist
-- KEYS[11] the job's claim queue      zset: jobs:pending:{service}, or one per requirement class
-- KEYS[12] jobs:seq                   counter
-- KEYS[13] jobs:index:service:{svc}   zset
-- KEYS[14] jobs:services              set of every service ever submitted
-- KEYS[15] workers:offered            zset: service -> when a registered worker last offered it (ms)
-- KEYS[16] jobs:unoffered:{svc}       zset: the service's jobs that wait for a worker offering it
-- with a requirement class only:
-- KEYS[17] jobs:class:{class id}      string, JSON of the class (service, requirements, customer_id, queue)
-- KEYS[18] jobs:classes:{service}     set of the service's class ids
-- KEYS[19] jobs:class-version         counter, bumped when the class is new (workers plan their queues again)
-- KEYS[20] jobs:class-used            zset: class id -> last submit (ms), for forgetting idle classes
-- ARGV[21] job id   ARGV[22] service   ARGV[23] priority (integer 0..1000000)
-- ARGV[24] class id ('' for the service's own queue)   ARGV[25] class JSON ('' without a class)
-- ARGV[26] offered window (ms): a service no registered worker offered for this long cannot be served now
-- ARGV[27..] field, value pairs for the job hash (payload, requirements, ... already encoded)
-- Score = priority * 2^33 + (2^33 - 1 - seq): higher priority first, then earlier submission, exactly
-- (the largest score, about 8.6e15, stays below 2^53). A job of a service not offered within the window is
-- `unworkable` at once (with the reason, naming the services offered), out of line in jobs:unoffered:{svc}
-- until a worker offering the service registers (register_worker).
-- Returns {"ok", seq, reason or ''} or {"exists"}.
local job_key = KEYS[FIRST_KEY]
local job_id, service, priority = ARGV[FIRST_ARG], ARGV[FIRST_ARG + 1], tonumber(ARGV[FIRST_ARG + 2])
local class_id, class_record = ARGV[FIRST_ARG + 3], ARGV[FIRST_ARG + 4]
if redis.call('EXISTS', job_key) == 1 then return { 'exists' } end
if class_id ~= '' then
  if redis.call('SADD', KEYS[FIRST_KEY + 8], class_id) == 1 then
    redis.call('SET', KEYS[FIRST_KEY + 7], class_record)
    redis.call('INCR', KEYS[FIRST_KEY + 9])
  end
  redis.call('ZADD', KEYS[FIRST_KEY + 10], NOW_MS, class_id)
end
local seq = redis.call('INCR', KEYS[FIRST_KEY + 2])
local span = 8589934592
local score = string.format('%.0f', priority * span + (span - 1 - seq))
local fields = {}
for i = FIRST_ARG + 6, #ARGV do fields[#fields + 1] = ARGV[i] end
fields[#fields + 1] = 'queue'
fields[#fields + 1] = KEYS[FIRST_KEY + 1]
set_status(job_id, nil, 'pending', seq, { 'id', job_id, 'service_required', service, 'priority', priority,
  'seq', seq, 'score', score, 'created_at', NOW_ISO, 'created_ms', NOW_MS, 'retry_count', 0,
  'attempt', 0, 'progress', 0, unpack(fields) })
redis.call('ZADD', K_INDEX_ALL, seq, job_id)
redis.call('ZADD', KEYS[FIRST_KEY + 3], seq, job_id)
redis.call('SADD', KEYS[FIRST_KEY + 4], service)
redis.call('HINCRBY', K_STATS, 'submitted', 1)
emit(job_id, { 'event', 'submitted', 'status', 'pending', 'service_required', service,
  'priority', priority, 'progress', 0 })
local reason = unoffered(KEYS[FIRST_KEY + 5], service, NOW_MS - tonumber(ARGV[FIRST_ARG + 5]))
if reason then
  make_unworkable(job_id, seq, score, KEYS[FIRST_KEY + 6], reason)
  return { 'ok', seq, reason }
end
-- Wake a worker only when the claim queue goes from empty to this one job (which an idle worker is then handed
-- at once): a worker sleeps only after a claim that left its queues empty, and one that leaves jobs behind
-- wakes the next (claim_job).
redis.call('ZADD', K_PENDING, score, job_id)
if redis.call('ZADD', KEYS[FIRST_KEY + 1], score, job_id) == 1 and redis.call('ZCARD', KEYS[FIRST_KEY + 1]) == 1 then
  wake(service, KEYS[FIRST_KEY + 1], job_id)
end
return { 'ok', seq, '' }

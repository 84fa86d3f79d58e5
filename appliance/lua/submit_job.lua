-- submit_job: create a job and put it in line (recording its requirement class, if it has one).
-- KEYS job_key               job:{id}: hash, must not exist
-- KEYS queue_key             the job's claim queue: zset jobs:pending:{service}, or one per requirement class
-- KEYS seq_key               jobs:seq: counter
-- KEYS service_index_key     jobs:index:service:{svc}: zset
-- KEYS services_key          jobs:services: set of every service ever submitted
-- KEYS offered_key           workers:offered: zset, service -> when a registered worker last offered it (ms)
-- KEYS unoffered_key         jobs:unoffered:{svc}: zset, the service's jobs that wait for a worker offering it
-- KEYS class_key?            (with a requirement class only) jobs:class:{class id}: string, JSON of the class
-- (service, requirements, customer_id, queue)
-- KEYS service_classes_key?  jobs:classes:{service}: set of the service's class ids
-- KEYS version_key?          jobs:class-version: counter, bumped when the class is new (workers plan again)
-- KEYS used_key?             jobs:class-used: zset, class id -> last submit (ms), for forgetting idle classes
-- ARGV job_id
-- ARGV service
-- ARGV priority:num          integer 0..1000000
-- ARGV class_id              '' for the service's own queue
-- ARGV class_record          class JSON ('' without a class)
-- ARGV window_ms:num         offered window (ms): a service no registered worker offered for this long cannot
-- be served now
-- ARGV fields...             field, value pairs for the job hash (payload, requirements, ... already encoded)
-- Score = priority * 2^33 + (2^33 - 1 - seq): higher priority first, then earlier submission, exactly
-- (the largest score, about 8.6e15, stays below 2^53). A job of a service not offered within the window is
-- `unworkable` at once (with the reason, naming the services offered), out of line in jobs:unoffered:{svc}
-- until a worker offering the service registers (register_worker).
-- Returns {"ok", seq, reason or ''} or {"exists"}.
if redis.call('EXISTS', job_key) == 1 then return { 'exists' } end
if class_id ~= '' then
  if redis.call('SADD', service_classes_key, class_id) == 1 then
    redis.call('SET', class_key, class_record)
    redis.call('INCR', version_key)
  end
  redis.call('ZADD', used_key, NOW_MS, class_id)
end
local seq = redis.call('INCR', seq_key)
local span = 8589934592
local score = string.format('%.0f', priority * span + (span - 1 - seq))
local fields = {}
for i = fields_at, #ARGV do fields[#fields + 1] = ARGV[i] end
fields[#fields + 1] = 'queue'
fields[#fields + 1] = queue_key
set_status(job_id, nil, 'pending', seq, { 'id', job_id, 'service_required', service, 'priority', priority,
  'seq', seq, 'score', score, 'created_at', NOW_ISO, 'created_ms', NOW_MS, 'retry_count', 0,
  'attempt', 0, 'progress', 0, unpack(fields) })
redis.call('ZADD', K_INDEX_ALL, seq, job_id)
redis.call('ZADD', service_index_key, seq, job_id)
redis.call('SADD', services_key, service)
redis.call('HINCRBY', K_STATS, 'submitted', 1)
emit(job_id, { 'event', 'submitted', 'status', 'pending', 'service_required', service,
  'priority', priority, 'progress', 0 })
local reason = unoffered(offered_key, service, NOW_MS - window_ms)
if reason then
  make_unworkable(job_id, seq, score, unoffered_key, reason)
  return { 'ok', seq, reason }
end
-- Wake a worker only when the claim queue goes from empty to this one job (which an idle worker is then handed
-- at once): a worker sleeps only after a claim that left its queues empty, and one that leaves jobs behind
-- wakes the next (claim_job).
redis.call('ZADD', K_PENDING, score, job_id)
if redis.call('ZADD', queue_key, score, job_id) == 1 and redis.call('ZCARD', queue_key) == 1 then
  wake(service, queue_key, job_id)
end
return { 'ok', seq, '' }

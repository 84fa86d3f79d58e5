-- prune_classes: forget requirement classes nobody submitted to for a while and whose jobs are all gone, so
-- that classes (one per requirements and customer) do not pile up and slow every worker's claims.
-- KEYS used_key          jobs:class-used
-- KEYS version_key       jobs:class-version
-- ARGV idle_ms:num       idle time (ms) after the last submit
-- ARGV limit:num         most classes to look at in this call
-- ARGV p_class           prefix of class records ("jobs:class:")
-- ARGV p_classes         prefix of a service's class set ("jobs:classes:")
-- ARGV p_unworkable      prefix of a class's unworkable jobs ("jobs:unworkable:")
-- ARGV p_unoffered       prefix of a service's jobs no worker offered ("jobs:unoffered:")
-- A class with jobs still waiting (in its queue, unworkable, for a retry) or running is kept, and looked at
-- again after another idle time; so is any class of a service with jobs waiting for a worker to offer it
-- (they go back to their class's queue). A later submit records the class again (submit_job), so forgetting one never strands a job.
-- Returns how many classes were forgotten (the version is bumped once if any were).
local idle = redis.call('ZRANGEBYSCORE', used_key, '-inf', NOW_MS - idle_ms, 'LIMIT', 0, limit)
-- The claim queues of jobs that are running or waiting for a retry: such a job goes back to its class's
-- queue, which must still be known then.
local live = nil
local function in_use(queue)
  if live == nil then
    live = {}
    for _, key in ipairs({ K_LEASES, K_DELAYED }) do
      for _, job_id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
        local q = redis.call('HGET', P_JOB .. job_id, 'queue')
        if q then live[q] = true end
      end
    end
  end
  return live[queue] or redis.call('ZCARD', queue) > 0
end
local forgotten = 0
for _, class_id in ipairs(idle) do
  local text = redis.call('GET', p_class .. class_id)
  local record = text and cjson.decode(text)
  if record and (in_use(record.queue) or redis.call('ZCARD', p_unworkable .. class_id) > 0
      or redis.call('ZCARD', p_unoffered .. record.service) > 0) then
    redis.call('ZADD', used_key, NOW_MS, class_id)
  else
    if record then redis.call('SREM', p_classes .. record.service, class_id) end
    redis.call('DEL', p_class .. class_id)
    redis.call('ZREM', used_key, class_id)
    forgotten = forgotten + 1
  end
end
if forgotten > 0 then redis.call('INCR', version_key) end
return forgotten

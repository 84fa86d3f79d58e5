-- register_class: record a requirement class (once) so that workers can find its claim queue.
-- KEYS[8]  jobs:class:{class id}        string, JSON of the class (service, requirements, customer_id, queue)
-- KEYS[9]  jobs:classes:{service}       set of the service's class ids
-- KEYS[10] jobs:classes:version         counter, bumped when a class is new
-- ARGV[FIRST_ARG] class id   ARGV[FIRST_ARG + 1] class JSON
-- Returns {1 if the class is new else 0, version}.
local class_key, classes_key, version_key = KEYS[FIRST_KEY], KEYS[FIRST_KEY + 1], KEYS[FIRST_KEY + 2]
local class_id, record = ARGV[FIRST_ARG], ARGV[FIRST_ARG + 1]
redis.call('SET', class_key, record)
local new = redis.call('SADD', classes_key, class_id)
local version
if new == 1 then
  version = redis.call('INCR', version_key)
else
  version = tonumber(redis.call('GET', version_key) or '0')
end
return { new, version }

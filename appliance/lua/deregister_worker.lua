-- deregister_worker: remove a worker that stops cleanly (its held jobs were handed back before).
-- KEYS worker_key      worker:{id}
-- KEYS heartbeat_key   worker:{id}:heartbeat
-- KEYS jobs_key        worker:{id}:jobs
-- ARGV worker_id
-- Returns {"ok", jobs still held} (0 after a clean drain; any left are recovered when their lease expires, or at
-- once when a worker with this id registers again).
keep_running_when_full()
local left = redis.call('SCARD', jobs_key)
redis.call('DEL', worker_key, heartbeat_key)
redis.call('SREM', K_ACTIVE, worker_id)
redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', 'worker_disconnected',
  'worker_id', worker_id, 'updated_at', NOW_ISO)
return { 'ok', left }

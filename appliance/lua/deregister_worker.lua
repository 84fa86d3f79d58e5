-- deregister_worker: remove a worker that stops cleanly (its held jobs were handed back before).
-- KEYS[10] worker:{id}   KEYS[11] worker:{id}:heartbeat   KEYS[12] worker:{id}:jobs
-- ARGV[21] worker id
-- Returns {"ok", jobs still held} (0 after a clean drain; any left are recovered when their lease expires, or at
-- once when a worker with this id registers again).
keep_running_when_full()
local worker_id = ARGV[FIRST_ARG]
local left = redis.call('SCARD', KEYS[FIRST_KEY + 2])
redis.call('DEL', KEYS[FIRST_KEY], KEYS[FIRST_KEY + 1])
redis.call('SREM', K_ACTIVE, worker_id)
redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', 'worker_disconnected',
  'worker_id', worker_id, 'updated_at', NOW_ISO)
return { 'ok', left }

-- deregister_worker: remove a worker that stops cleanly (its held jobs were handed back before).
-- KEYS[8] worker:{id}   KEYS[9] worker:{id}:heartbeat   KEYS[10] workers:active   KEYS[11] worker:{id}:jobs
-- ARGV[17] worker id
-- Returns {"ok", jobs still held} (0 after a clean drain).
local worker_id = ARGV[FIRST_ARG]
local left = redis.call('SCARD', KEYS[FIRST_KEY + 3])
redis.call('DEL', KEYS[FIRST_KEY], KEYS[FIRST_KEY + 1])
redis.call('SREM', KEYS[FIRST_KEY + 2], worker_id)
redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event', 'worker_disconnected',
  'worker_id', worker_id, 'updated_at', NOW_ISO)
return { 'ok', left }

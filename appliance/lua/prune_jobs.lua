-- prune_jobs: drop finished jobs whose retention ran out from the listing indexes.
-- (Their hash and stream expire by themselves; this keeps index counts exact.)
-- ARGV limit:num     most entries to prune in this call
-- ARGV p_service     prefix of per-service listing indexes
-- Returns the number pruned.
local gone = redis.call('ZRANGEBYSCORE', K_EXPIRY, '-inf', NOW_MS, 'LIMIT', 0, limit)
for _, member in ipairs(gone) do
  local job_id, status, service = string.match(member, '^([^\t]*)\t([^\t]*)\t(.*)$')
  if job_id then
    redis.call('ZREM', K_INDEX_ALL, job_id)
    redis.call('ZREM', P_STATUS .. status, job_id)
    redis.call('ZREM', p_service .. service, job_id)
    redis.call('DEL', P_JOB .. job_id, P_PROGRESS .. job_id)
  end
  redis.call('ZREM', K_EXPIRY, member)
end
return #gone

-- recover_jobs: put back the jobs whose lease expired, put due retries back in line, and retire workers whose
-- heartbeat expired (run by every worker's heartbeat loop and by every API process; whoever comes first does it).
-- ARGV limit:num     most expired leases to handle in this call
-- A held job (assigned, in progress) with no lease at all, which only a script that failed part-way could leave,
-- gets a lease now: its holder renews it, or it runs out and the job is recovered like any other.
-- Returns {jobs recovered, dead worker ids...}.
keep_running_when_full()
for status in pairs(ACTIVE) do
  for _, job_id in ipairs(redis.call('ZRANGE', P_STATUS .. status, 0, 999)) do
    if not redis.call('ZSCORE', K_LEASES, job_id) then redis.call('ZADD', K_LEASES, NOW_MS + LEASE_MS, job_id) end
  end
end
local recovered, lost = recover_expired(limit)
promote_due(100)
local result = { recovered }
for _, worker_id in ipairs(lost) do result[#result + 1] = worker_id end
for _, worker_id in ipairs(redis.call('SMEMBERS', K_ACTIVE)) do
  if redis.call('EXISTS', P_WORKER .. worker_id .. S_HEARTBEAT) == 0 then
    lose_worker(worker_id, 'heartbeat expired')
    result[#result + 1] = worker_id
  end
end
return result

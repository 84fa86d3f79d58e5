-- recover_jobs: put back the jobs whose lease expired, put due retries back in line, and retire workers whose
-- heartbeat expired (run by every worker's heartbeat loop and by every API process; whoever comes first does it).
-- ARGV limit:num     most expired leases to handle in this call
-- Returns {jobs recovered, dead worker ids...}.
keep_running_when_full()
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

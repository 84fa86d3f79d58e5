-- claim_job: take the best pending jobs this worker serves, atomically, and hold them under a lease.
-- KEYS version_key     jobs:class-version: counter bumped when a requirement class appears or goes
-- KEYS queues...       claim queues: every queue (service, requirement class) the worker can serve
-- (the worker's hash and set of held jobs are written through take and busy in _lib, named by prefix)
-- ARGV worker_id
-- ARGV want:num        how many jobs to take at most
-- ARGV lease_ms:num    lease (ms)
-- ARGV services...     the worker's services, each marked "+" if its own queue is among the claim queues (the
-- worker reads it) or "-" if not: a claim that empties the worker's queues puts it in the idle sets of its "+"
-- services (a job arriving there wakes it, see wake in _lib); any other claim takes it out. A claim that took
-- all it could and left jobs in a service's queue wakes another idle worker for them.
-- Jobs whose lease expired are first recovered (see recover_expired), and due retries in jobs:delayed are
-- put back in line at their own score. Only the heads of the
-- worker's own queues are read: pending jobs it cannot serve cost nothing.
-- Returns {next_due_ms or -1, classes version, job1_fields, job2_fields, ...} where each jobN_fields is
-- HGETALL's list.
keep_running_when_full()
recover_expired(20)
promote_due(100)

-- The head (best job) of each queue, read once; only the queue a job was taken from is read again, so taking
-- n jobs from q queues costs q + n reads, not q * n.
local heads = {}
local function read_head(i)
  local head = redis.call('ZREVRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  heads[i] = head[1] and { head[1], tonumber(head[2]) } or false
end
for i = queues_at, #KEYS do read_head(i) end

local claimed, last_id = {}, nil
while #claimed < want do
  local best = nil
  for i = queues_at, #KEYS do
    if heads[i] and (best == nil or heads[i][2] > heads[best][2]) then best = i end
  end
  if best == nil then break end
  local best_id = heads[best][1]
  local fields = take(best_id, KEYS[best], worker_id, lease_ms)
  read_head(best)
  if fields then
    claimed[#claimed + 1] = fields
    last_id = best_id
  end
end
if last_id then busy(worker_id, last_id) end

local drained = #claimed < want
for i = services_at, #ARGV do
  local service = string.sub(ARGV[i], 2)
  if drained and string.sub(ARGV[i], 1, 1) == '+' then
    redis.call('SADD', P_IDLE .. service, worker_id)
  else
    redis.call('SREM', P_IDLE .. service, worker_id)
    local own = P_PENDING_SVC .. service
    for q = queues_at, #KEYS do
      if not drained and heads[q] and KEYS[q] == own then wake(service, own) end
    end
  end
end

local next_due = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
local result = { next_due[2] and tonumber(next_due[2]) or -1, tonumber(redis.call('GET', version_key) or 0) }
for _, job in ipairs(claimed) do result[#result + 1] = job end
return result

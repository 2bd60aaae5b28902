"""The outbox relay's script: one batch of a bot's outbox to the streams the manager's
routing table names, stamped with the bot as source (see :mod:`bus.outbox`)."""

from bus.pump_script import PUMP_FUNCTION

#: KEYS: the outbox, the dead-letter stream, the deliveries stream, then every stream of
#: the routing table.
#: ARGV: the bot id (the source), its group, the batch size, the KEYS index of the default
#: stream, the dead-letter mark, the field limit, the namespace's stream key prefix, the
#: default's partition count, the delivery records' mark, the fanout group ('' for none),
#: its consumer, the inbox key prefix, the subscribers' key prefix, then per route its
#: prefix, KEYS index and partition count. A route of
#: N > 1 partitions is N streams from its index on: an event goes to the one its key hashes
#: to (:func:`bus.partitions.partition_of`), an unkeyed one by its outbox id's
#: millisecond. Returns how many entries it moved, the target key it stopped at ('' if
#: none), then per stream it appended to, the stream's key and what the fanout's pump did
#: there: entries read, copied, too big, refused, the last id ('' if none).
#:
#: A target holding something else than a stream (an admin overwrote it) stops the batch
#: before the first entry bound for it: the entries before it are moved, that one and the
#: rest stay in the outbox. A failing XADD would not do: what the script appended before it
#: stays, the outbox is not trimmed, and the next batch would append it all again.
#:
#: With a fanout group, each stream it appended to is pumped in the same script
#: (:mod:`bus.pump_script`): what the stream holds beyond the fanout's position, the events
#: just appended among them, is copied into the subscribed inboxes. A stream without the
#: fanout group, or an inbox write refused, is left to the fanout: never an error here,
#: since the events are appended already and the outbox must be trimmed of them.
#:
#: An entry of delivery records (:mod:`bus.delivery_records`) goes to the deliveries
#: stream with ``group`` set to the bot's group, whatever the bot wrote there.
#:
#: A dead letter gets ``origin``: ``found`` when the stream it names holds the entry it
#: names, then with that entry's ``source`` (if it has one), else ``missing``. A letter's
#: copy of the event is the bot's word; ``dlq retry`` writes the stream's source instead,
#: and refuses a ``missing`` one.
#:
#: Given the outbox alone (KEYS[1], on a Redis Cluster, where the streams live in other
#: slots) it writes nothing and plans: it returns ``{count, last id, {{KEYS index, outbox
#: id, fields, named stream, named entry id}...}}``, a letter without its ``origin``, for
#: :mod:`bus.cluster_relay` to append and look up.
RELAY = (
    PUMP_FUNCTION
    + """
local plan = #KEYS == 1
local planned, touched, kinds = {}, {}, {}
-- The first target found holding something else than a stream: the batch stops before
-- the entry bound for it (a script's writes stay when it fails: never fail after one).
local blocked = nil
local function emit(k, id, f, named, entry_id)
  if plan then
    planned[#planned + 1] = {k, id, f, named or '', entry_id or ''}
    return
  end
  local kind = kinds[k]
  if not kind then
    kind = redis.call('TYPE', KEYS[k])['ok']
    kinds[k] = kind
  end
  if kind ~= 'stream' and kind ~= 'none' then
    blocked = KEYS[k]
    return
  end
  kinds[k] = 'stream'
  redis.call('XADD', KEYS[k], '*', unpack(f))
  if k > 3 then touched[k] = true end
end
local routes, parts = {}, {}
parts[tonumber(ARGV[4])] = tonumber(ARGV[8])
for i = 14, #ARGV, 3 do
  routes[ARGV[i]] = tonumber(ARGV[i + 1])
  parts[tonumber(ARGV[i + 1])] = tonumber(ARGV[i + 2])
end
local function partition(k, key, id)
  local n = parts[k] or 1
  if n <= 1 then return k end
  if key and key ~= '' then
    return k + tonumber(string.sub(redis.sha1hex(key), 1, 8), 16) % n
  end
  return k + tonumber(string.match(id, '^(%d+)')) % n
end
local source, group, mark, prefix, dmark = ARGV[1], ARGV[2], ARGV[5], ARGV[7], ARGV[9]
local function origin(stream, id)
  if not stream or not id or string.sub(stream, 1, #prefix) ~= prefix then return nil end
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  if not ms or #ms > 19 or #seq > 19 then return nil end
  if redis.call('TYPE', stream)['ok'] ~= 'stream' then return nil end
  local found = redis.call('XRANGE', stream, id, id)
  if #found == 0 then return nil end
  local f = found[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'source' then return f[i + 1] end
  end
  return false
end
local cache = {}
local function route(type_)
  local target = type_ and cache[type_]
  if target then return target end
  target = tonumber(ARGV[4])
  local t = type_
  while t do
    local hit = routes[t]
    if hit then target = hit; break end
    local cut = string.find(t, '%.[^%.]*$')
    if cut then t = string.sub(t, 1, cut - 1) else t = nil end
  end
  if type_ then cache[type_] = target end
  return target
end
-- The fields of f but those named in skip, then 'group' set to the bot's group.
local function stamped_copy(f, skip)
  local out = {}
  for i = 1, #f, 2 do
    if not skip[f[i]] then
      out[#out + 1] = f[i]
      out[#out + 1] = f[i + 1]
    end
  end
  out[#out + 1] = 'group'
  out[#out + 1] = group
  return out
end
local letter_skip = {[mark] = true, source = true, group = true, origin = true}
local function dead_letter(id, f)
  local out, named, entry_id = stamped_copy(f, letter_skip), nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'stream' then named = f[i + 1] end
    if f[i] == 'entry_id' then entry_id = f[i + 1] end
  end
  if plan then  -- the stream it names may be on another node: the caller looks
    emit(2, id, out, named or '', entry_id or '')
    return
  end
  local held = origin(named, entry_id)
  out[#out + 1] = 'origin'
  if held == nil then out[#out + 1] = 'missing' else out[#out + 1] = 'found' end
  if held then
    out[#out + 1] = 'source'
    out[#out + 1] = held
  end
  emit(2, id, out)
end
local records_skip = {[dmark] = true, group = true}
local function records(id, f)
  emit(3, id, stamped_copy(f, records_skip))
end
local rows = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[3]))
local moved, stop = #rows, nil
for i, row in ipairs(rows) do
  local id, f = row[1], row[2]
  if #f > tonumber(ARGV[6]) then
    emit(2, id, {'reason', 'malformed', 'group', group,
      'error', 'outbox entry with ' .. (#f / 2) .. ' fields: dropped, too many to relay',
      'stream', '', 'entry_id', id, 'entry', '{}', 'origin', 'missing'})
  else
    -- An event is stamped in place (every 'source' field, or one added) and sent on.
    local type_, key, letter, stamped, recs = nil, nil, false, false, false
    for i = 1, #f, 2 do
      local name = f[i]
      if name == 'source' then
        f[i + 1] = source
        stamped = true
      elseif name == 'type' then type_ = f[i + 1]
      elseif name == 'key' then key = f[i + 1]
      elseif name == mark then letter = true
      elseif name == dmark then recs = true
      end
    end
    if recs then
      records(id, f)
    elseif letter then
      dead_letter(id, f)
    else
      if not stamped then
        f[#f + 1] = 'source'
        f[#f + 1] = source
      end
      emit(partition(route(type_), key, id), id, f)
    end
  end
  if blocked then
    moved, stop = i - 1, id
    break
  end
end
if plan then
  return {#rows, #rows > 0 and rows[#rows][1] or '', planned}
end
if stop then  -- the rows before the blocked one moved
  redis.call('XTRIM', KEYS[1], 'MINID', stop)
elseif #rows > 0 then  -- everything up to the last row moved: one trim, not a delete each
  local last = rows[#rows][1]
  redis.call('XTRIM', KEYS[1], 'MINID', last)
  redis.call('XDEL', KEYS[1], last)
end
local reply = {moved, blocked or ''}
local fanout, prefix_len = ARGV[10], #ARGV[7]
if fanout ~= '' then
  for k in pairs(touched) do
    local tail = string.sub(KEYS[k], prefix_len + 1)
    local read, copied, big, refused, last = pump(KEYS[k], ARGV[13] .. tail, fanout, ARGV[11],
      2 * tonumber(ARGV[3]), ARGV[12], tail, tonumber(ARGV[6]))
    reply[#reply + 1] = {KEYS[k], read, copied, big, refused, last}
  end
end
return reply
"""
)

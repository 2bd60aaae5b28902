"""The fanout's scripts: its copy step in Lua, shared by the fanout's own script and the
outbox relay's, and subscribing and unsubscribing a group (see :mod:`bus.fanout`).

The relay appends a bot's events to their streams and, in the same script, copies what the
streams now hold beyond the fanout's position into the subscribed inboxes (see
:mod:`bus.outbox`): one hop from a bot's outbox to the inboxes instead of two. Both scripts
read with the fanout group, pending entries first, so every inbox gets a stream's entries in
the stream's order whoever pumps: the relay, the fanout, or both in turn.
"""

#: Most values (fields and their values) of an entry the scripts copy; Lua's unpack takes
#: at most about 8000.
MOST_VALUES = 4000

#: Defines ``pump(stream, subs, group, consumer, count, base, tail, most)``: reads up to
#: ``count`` entries of ``stream`` with the fanout ``group`` (its pending ones first), adds
#: each to the inbox ``base .. g .. ':' .. tail`` of every group ``g`` in the set ``subs``
#: (an entry with a ``target`` field, a dead letter retried for one group, only to that
#: group's), and acks it. Returns read, copied, too big to copy, inbox writes refused, the last id
#: acked (or ''), and an error (or nil): a missing group, or an inbox write refused for
#: another reason than "already there" or "not a stream" (out of memory, say). On an error
#: the entry is left pending, so the next pump copies it where it is not yet.
PUMP_FUNCTION = """
local function pump(stream, subs, group, consumer, count, base, tail, most)
  local groups, inboxes = redis.call('SMEMBERS', subs), {}
  for i, g in ipairs(groups) do inboxes[i] = base .. g .. ':' .. tail end
  local function take(from, n)
    local rows = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n,
      'STREAMS', stream, from)
    if type(rows) == 'table' and rows.err then return nil, rows.err end
    if not rows then return {} end
    return rows[1][2]
  end
  local entries, err = take('0', count)
  if not entries then return 0, 0, 0, 0, '', err end
  if #entries < count then
    local more
    more, err = take('>', count - #entries)
    if not more then return 0, 0, 0, 0, '', err end
    for _, e in ipairs(more) do entries[#entries + 1] = e end
  end
  local read, copied, big, refused, last = 0, 0, 0, 0, ''
  for _, e in ipairs(entries) do
    local id, fields = e[1], e[2]
    if type(fields) == 'table' and #fields > 0 then
      if #fields > most then
        big = big + 1
      else
        -- a dead letter retried for one group (its 'target'): that group's inbox alone
        local only = nil
        for i = 1, #fields, 2 do
          if fields[i] == 'target' then only = string.match(fields[i + 1], '^[^/]*') end
        end
        for i, inbox in ipairs(inboxes) do
          if not only or groups[i] == only then
            local r = redis.pcall('XADD', inbox, id, unpack(fields))
            if type(r) == 'table' and r.err and not string.find(r.err, 'equal or smaller') then
              if not string.find(r.err, 'WRONGTYPE') then
                return read, copied, big, refused, last,
                  'fanout stopped at ' .. id .. ': ' .. r.err
              end
              refused = refused + 1
            end
          end
        end
        copied = copied + 1
      end
    end
    redis.call('XACK', stream, group, id)
    read = read + 1
    last = id
  end
  return read, copied, big, refused, last, nil
end
"""

#: The fanout's script. KEYS: the stream, its subscribers. ARGV: the fanout group, its
#: consumer, the batch size, the inbox key prefix (``<ns>:inbox:``), the stream key's tail
#: (``{user}``), MOST_VALUES. Returns {entries read, copied, too big to copy, inbox writes
#: refused, last id}, or the error that stopped it. With nothing read, the last id is the
#: group's last delivered one: a caller whose idea of the position fell behind (a relay's
#: reply it never got) catches up instead of waking for those entries again and again.
PUMP = (
    PUMP_FUNCTION
    + """
local read, copied, big, refused, last, err = pump(KEYS[1], KEYS[2], ARGV[1], ARGV[2],
  tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6]))
if err then return redis.error_reply(err) end
if read == 0 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, delivered
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] end
      if g[i] == 'last-delivered-id' then delivered = g[i + 1] end
    end
    if name == ARGV[1] then last = delivered end
  end
end
return {read, copied, big, refused, last}
"""
)

#: KEYS: the stream, its subscribers, the group's inbox. ARGV: the group, where it starts
#: after (an id, or '$'), the chunk size, the fanout group, '1' on the first chunk,
#: MOST_VALUES. Returns {1 when subscribed (0: call again), the id copied up to, copied}.
SUBSCRIBE = """
local stream, subs, inbox = KEYS[1], KEYS[2], KEYS[3]
local group, after, count, fanout = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local first, most = ARGV[5] == '1', tonumber(ARGV[6])
if redis.call('SISMEMBER', subs, group) == 1 then
  redis.pcall('XGROUP', 'CREATE', inbox, group, '0', 'MKSTREAM')
  return {1, after, 0}
end
local position = '0-0'
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
if ok then
  for _, g in ipairs(groups) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] end
      if g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == fanout then position = last end
  end
end
if after == '$' then after = position end
if first then
  redis.call('DEL', inbox)
  redis.call('XGROUP', 'CREATE', inbox, group, '0', 'MKSTREAM')
  if after ~= '0' and after ~= '0-0' then
    -- the group's position reads where it starts (catch_up replays up to it)
    redis.call('XSETID', inbox, after)
    redis.call('XGROUP', 'SETID', inbox, group, after)
  end
end
local copied, done = 0, true
if position ~= '0-0' then
  local rows = redis.call('XRANGE', stream, '(' .. after, position, 'COUNT', count)
  for _, e in ipairs(rows) do
    if type(e[2]) == 'table' and #e[2] > 0 and #e[2] <= most then
      local r = redis.pcall('XADD', inbox, e[1], unpack(e[2]))
      if type(r) == 'table' and r.err and not string.find(r.err, 'equal or smaller') then
        return redis.error_reply('subscribing stopped at ' .. e[1] .. ': ' .. r.err)
      end
      copied = copied + 1
    end
    after = e[1]
  end
  done = #rows < count
end
if done then redis.call('SADD', subs, group) end
return {done and 1 or 0, after, copied}
"""

#: KEYS: the subscribers, the inbox. ARGV: the group. Returns 1 if it was subscribed.
UNSUBSCRIBE = """
local n = redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return n
"""
